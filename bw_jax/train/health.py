"""BW health of a trained state: per layer, the worst condition number of the running covariance and
the fallback / skipped-update counters; the eval line's summary and the `bw_max_fallbacks` stop."""

from typing import Any

import flax
import jax
import numpy as np


def bw_health(batch_stats: Any, counters: Any) -> dict[str, float]:
  """Per BW layer: the largest condition number over its running covariance groups (`batch_stats`), and
  its counters (the `bw_health` collection).

  Returns {'<layer path>/cov_condition': float, '<path>/fallbacks': int, '<path>/skipped_updates': int}.
  """
  health = {}
  flat = lambda tree: flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)), sep='/')
  for key, value in flat(batch_stats).items():
    if key.endswith('/cov'):
      w = np.linalg.eigvalsh(np.asarray(value, np.float64))  # (G, g) ascending
      smallest = np.maximum(w[:, 0], np.finfo(np.float64).tiny)
      health[f'{key[:-len("/cov")]}/cov_condition'] = float(np.max(w[:, -1] / smallest))
  health.update({key: int(value) for key, value in flat(counters).items()})  # float32 counts, exact
  return health


class BWHealthError(RuntimeError):
  """More BW fallbacks than `config.bw_max_fallbacks` allows (the message says what to change)."""


def bw_totals(health: dict[str, float]) -> tuple[int, float | None]:
  """(fallbacks summed over the BW layers, the worst condition number) of `bw_health`; (0, None) without BW."""
  fallbacks = sum(v for k, v in health.items() if k.endswith('/fallbacks'))
  worst = max((v for k, v in health.items() if k.endswith('/cov_condition')), default=None)
  return fallbacks, worst


def bw_health_report(health: dict[str, float], previous_fallbacks: int, max_fallbacks: int
                     ) -> tuple[str, str | None]:
  """The console text of `bw_health` ('' without BW layers) and a warning when the fallbacks grew since
  `previous_fallbacks`; BWHealthError when they exceed `max_fallbacks` (−1: no limit)."""
  fallbacks, worst = bw_totals(health)
  if worst is None:
    return '', None
  if 0 <= max_fallbacks < fallbacks:
    raise BWHealthError(
        f'{fallbacks} BW fallbacks exceed config.bw_max_fallbacks={max_fallbacks} (worst condition number '
        f'{worst:.3g}): the whitening went singular. Raise config.model.bw.epsilon, lower the learning rate or '
        'use smaller groups (model.bw.group_size); the checkpoints are kept.')
  warning = None
  if fallbacks > previous_fallbacks:
    warning = (f'BW fallbacks grew from {previous_fallbacks} to {fallbacks} since the last eval (worst '
               f'condition number {worst:.3g}): some whitening factorisations failed and fell back. If this '
               'keeps growing, raise config.model.bw.epsilon; config.bw_max_fallbacks stops such a run.')
  return f'BW: fallbacks {fallbacks}, worst condition number {worst:.3g}', warning
