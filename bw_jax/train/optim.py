"""The optimizer and the learning-rate schedule of a run: warm-up, cosine or staircase decay (`Schedule`, whose
lengths the run's plan resolves), weight decay on kernels only, and the rates as arguments of a compiled step
(`optimizer_from_rates`)."""

import dataclasses
from typing import Any

import jax
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The learning-rate schedule but its peak (a run's `Plan.schedule`; the peak is an argument of the train
  step): linear warm-up from 0 over `warmup_steps`, then 'cosine' to 0 over `decay_steps`, or 'exponential':
  × `decay_rate` every `decay_steps` (a staircase)."""
  kind: str
  warmup_steps: int
  decay_steps: int
  decay_rate: float | None = None  # 'exponential' only.


def peak_learning_rate(learning_rate: float, global_batch: int) -> float:
  """`learning_rate` is per 256 images: linear scaling to the global batch."""
  return learning_rate * global_batch / 256


def learning_rate_fn(schedule: Schedule, peak: Any) -> optax.Schedule:
  """`schedule` rising to `peak` (a number, or a traced scalar: see `optimizer_from_rates`)."""
  if schedule.kind == 'cosine':
    decay = optax.cosine_decay_schedule(peak, schedule.decay_steps)
  else:
    decay = optax.exponential_decay(peak, schedule.decay_steps, schedule.decay_rate, staircase=True)
  if schedule.warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, schedule.warmup_steps), decay],
                              [schedule.warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for conv / dense kernels (ndim > 1); normalisation parameters and biases (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: Any, learning_rate_fn: optax.Schedule, weight_decay: Any
                     ) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer` (with `config.momentum`); weight decay is L2 added to the gradient (as
  in TF's EfficientNet) except for adamw, where it is decoupled."""
  if config.optimizer == 'adamw':
    return optax.adamw(learning_rate_fn, b1=config.momentum, weight_decay=weight_decay,
                       mask=decay_mask)
  if config.optimizer == 'rmsprop_tf':
    # TF1 semantics: the squared-gradient average starts at 1, not 0, and ε sits inside the square root.
    base = optax.rmsprop(learning_rate_fn, decay=0.9, eps=1e-3, momentum=config.momentum,
                         initial_scale=1.0, eps_in_sqrt=True)
  else:
    base = optax.sgd(learning_rate_fn, momentum=config.momentum if config.momentum > 0 else None,
                     nesterov=config.optimizer == 'nesterov')
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)


def optimizer_rates(peak: float, weight_decay: float) -> dict[str, np.float32]:
  """The rates the train step takes as arguments: the peak learning rate (for the global batch) and the
  weight decay, as float32 scalars (the values a constant of the program would round to)."""
  return {'learning_rate': np.float32(peak), 'weight_decay': np.float32(weight_decay)}


def optimizer_from_rates(config: Any, schedule: Schedule, rates: dict[str, Any]
                         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) of `config` with `rates` (`optimizer_rates`' keys) in place of its own: built
  inside the train step from traced rates, so that runs differing only in them share one compiled step. The
  optimizer state's structure does not depend on the rates: `create_optimizer(config, …)` initialises it."""
  rate_fn = learning_rate_fn(schedule, rates['learning_rate'])
  return create_optimizer(config, rate_fn, weight_decay=rates['weight_decay']), rate_fn
