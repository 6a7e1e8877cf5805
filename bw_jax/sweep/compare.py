"""Multi-seed comparisons of training configs on the sweep machinery (`python -m bw_jax.sweep compare run`).

A compare file (`configs/sweeps/compare_*.py`) starts from `base_compare_config()` and names *arms*, each a
label and training-config overrides, and *seeds*: every arm trains once with every seed (`config.seed`, which
seeds the initialisation, the data order, the augmentation and dropout; bw_jax/train/loop.py). The per-run length
(`trial_budget`) is the same for every arm.

How it runs: the file becomes a sweep (`sweep_config`) whose search space is `seed` and every key an arm
overrides, each a categorical of the values the arms use, with a budget of len(arms) × len(seeds) trials and
no pruner. `RunSampler` gives budget slot k the values of run k (`run_order`). The storage hands out slot
numbers under a lock (bw_jax/sweep/study.py), so every (arm, seed) trains exactly once over any number of
workers; a dead worker's run is queued again with the same values and resumes from its checkpoint; starting
`run` again completes whatever is missing. `compare_report.py` turns the study into the report.
"""

import ast
import difflib
import os
import platform
import socket
from typing import Any, Sequence

import ml_collections
import numpy as np
import optuna

from bw_jax.checks import is_positive_int
from bw_jax.train.config.validation import config_value, unknown_keys, validate_config
from bw_jax.sweep.space import (BUDGET_KEYS, base_sweep_config, config_reference, flatten_space,
                                is_config_leaf, trial_config)
from bw_jax.sweep.study import budget_slot, record_differences

SEED_KEY = 'seed'
SHARED_KEYS = ('study_name', 'train', 'trial_budget', 'heartbeat_interval', 'grace_period', 'max_retry')


def base_compare_config() -> ml_collections.ConfigDict:
  """Every compare key with its default; `check_compare_config` rejects any other."""
  sweep = base_sweep_config()
  config = ml_collections.ConfigDict({key: sweep[key] for key in SHARED_KEYS})  # As in a sweep file.
  config.study_name = 'compare'
  # ('label: key=value, key=value', …): the overrides of each arm on `train` (values as Python literals; a
  # bare word is a string, so `model.bw.method=zca` works).
  config.arms = ()
  config.baseline = ''  # The arm every other is compared with; '' is the first arm.
  config.seeds = (0, 1, 2, 3, 4)  # Every arm trains once with each; the same seeds pair the runs.
  config.target_accuracy = 0.8  # The report counts the steps each run took to reach this eval accuracy.
  return config


def learning_rate_pilot(study: ml_collections.ConfigDict, arms: dict[str, str], rates: Sequence[float],
                        seed: int, baseline: str) -> ml_collections.ConfigDict:
  """A copy of a study that runs every arm ({label: overrides without the rate}) with every learning rate on
  one seed: arms `label@rate`, baseline `baseline@rate` at the middle rate. Its report's "Best variant per
  arm" table names each arm's rate, chosen the same way for every arm."""
  pilot = ml_collections.ConfigDict(study.to_dict())
  pilot.study_name = f'{study.study_name}_lr'
  pilot.arms = tuple(f'{label}@{rate}: {overrides}, learning_rate={rate}'
                     for label, overrides in arms.items() for rate in rates)
  pilot.baseline = f'{baseline}@{rates[len(rates) // 2]}'
  pilot.seeds = (seed,)
  return pilot


def parse_value(text: str) -> Any:
  """'0.4' → 0.4, 'None' → None, 'True' → True, "'zca'" or 'zca' → 'zca'."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
  """'bn: model.mbconv_type=0, model.head_type=1' → ('bn', {'model.mbconv_type': 0, 'model.head_type': 1})."""
  label, colon, rest = text.partition(':')
  label = label.strip()
  if not colon or not label or any(c.isspace() or c in ',=' for c in label):
    raise ValueError(f"arm {text!r}: write 'label: key=value, key=value' (a label without spaces, a colon, "
                     "then the training-config overrides; none for the train config as it is).")
  overrides = {}
  for item in filter(None, (part.strip() for part in rest.split(','))):
    key, equals, value = item.partition('=')
    if not equals or not key.strip() or not value.strip():
      raise ValueError(f"arm {label!r}: {item!r} is not 'key=value'.")
    if key.strip() in overrides:
      raise ValueError(f'arm {label!r} sets {key.strip()!r} twice.')
    overrides[key.strip()] = parse_value(value.strip())
  return label, overrides


def override_errors(label: str, overrides: dict[str, Any], reference: ml_collections.ConfigDict) -> list[str]:
  """Keys an arm may not set: unknown ones (with the nearest key), the seed and the run length."""
  leaves = list(flatten_space(reference.to_dict()))
  errors = []
  for key in overrides:
    if key == SEED_KEY:
      errors.append(f"arm {label!r} sets 'seed'; every arm runs with each of `seeds`.")
    elif key in BUDGET_KEYS:
      errors.append(f"arm {label!r} sets {key!r}; the run length is `trial_budget`, the same for every arm.")
    elif not is_config_leaf(reference, key):
      close = difflib.get_close_matches(key, leaves, n=1)
      errors.append(f"arm {label!r}: {key!r} is not a training config key" +
                    (f" (did you mean '{close[0]}'?)" if close else '') + '.')
  return errors


def arm_params(compare: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{label: {key: value}} over the union of the overridden keys: an arm that leaves a key alone has the
  value of `train`, so every arm names all of them."""
  arms = dict(parse_arm(text) for text in compare.arms)
  keys = list(dict.fromkeys(key for overrides in arms.values() for key in overrides))
  return {label: {key: overrides.get(key, config_value(compare.train, key)) for key in keys}
          for label, overrides in arms.items()}


def baseline_arm(compare: ml_collections.ConfigDict) -> str:
  return compare.baseline or parse_arm(compare.arms[0])[0]


def run_order(labels: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
  """Seed after seed; within a seed, the arms in a seeded random order. A study stopped early holds
  complete seeds (pairs for every arm), and no arm always shares the machine with the same neighbour."""
  order = []
  for index, seed in enumerate(seeds):
    order += [(labels[i], seed) for i in np.random.RandomState(index).permutation(len(labels))]
  return order


def sweep_config(compare: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sweep that runs the comparison: search space `seed` and the overridden keys, one trial per run."""
  params = arm_params(compare)
  sweep = base_sweep_config()
  for key in SHARED_KEYS:
    sweep[key] = compare[key]
  space: dict[str, Any] = {SEED_KEY: ('categorical', tuple(compare.seeds))}
  for key in next(iter(params.values()), {}):
    space[key] = ('categorical', tuple(dict.fromkeys(arm[key] for arm in params.values())))
  nested: dict[str, Any] = {}
  for key, spec in space.items():
    *groups, leaf = key.split('.')
    node = nested
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = spec
  sweep.search_space = ml_collections.ConfigDict(nested)
  sweep.n_trials = len(params) * len(compare.seeds)
  sweep.objective, sweep.pruner = 'eval_accuracy', 'none'  # A pruned run would bias its arm's mean.
  return sweep


def compare_setting_errors(compare: ml_collections.ConfigDict) -> list[str]:
  """Unknown keys, arms, baseline, seeds and target; nothing about the training config itself."""
  top = lambda c: ml_collections.ConfigDict({k: v for k, v in c.items() if k != 'train'})
  errors = unknown_keys(top(compare), top(base_compare_config()))
  if not compare.get('arms'):
    return errors + ["arms is empty: name at least one, e.g. ('bn: model.mbconv_type=0, model.head_type=1',)."]
  labels, reference = [], config_reference(compare.train)
  for text in compare.arms:
    try:
      label, overrides = parse_arm(text)
    except ValueError as e:
      errors.append(str(e))
      continue
    labels.append(label)
    errors += override_errors(label, overrides, reference)
  if len(set(labels)) != len(labels):
    errors.append(f'arm labels must be distinct; got {labels}.')
  if compare.get('baseline') and compare.baseline not in labels:
    errors.append(f'baseline={compare.baseline!r} is not an arm; the arms are {labels}.')
  seeds = list(compare.get('seeds') or ())
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
    errors.append(f'seeds={seeds!r} must be a non-empty tuple of non-negative integers.')
  elif len(set(seeds)) != len(seeds):
    errors.append(f'seeds must be distinct; got {seeds}.')
  target = compare.get('target_accuracy')
  if not isinstance(target, (int, float)) or not 0 < target <= 1:
    errors.append(f'target_accuracy={target!r} must lie in (0, 1].')
  for name in ('heartbeat_interval', 'grace_period'):
    if not is_positive_int(compare.get(name)):
      errors.append(f'{name}={compare.get(name)!r} must be a positive integer.')
  return errors


def check_compare_config(compare: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """Raises a ValueError listing everything wrong before any run starts; returns `arm_params`."""
  errors = compare_setting_errors(compare)
  if not errors:
    params = arm_params(compare)
    duplicates = [a for i, a in enumerate(params) if params[a] in [params[b] for b in list(params)[:i]]]
    errors += [f'arm {a!r} has the same config as an earlier arm.' for a in duplicates]
    for label, values in params.items():  # Values that pass alone may still clash together.
      try:
        validate_config(trial_config(compare, {**values, SEED_KEY: compare.seeds[0]}))
      except (ValueError, TypeError) as e:
        errors.append(f'arm {label!r}: {e}')
  if errors:
    raise ValueError('Invalid compare config:\n  ' + '\n  '.join(errors))
  return params


def compare_record(compare: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the report needs beyond the sweep record, kept in the study: the arms' values, baseline, seeds,
  target and the run order (which `RunSampler` follows)."""
  params = arm_params(compare)
  return {'arms': params, 'arm_order': list(params), 'baseline': baseline_arm(compare),
          'seeds': list(compare.seeds), 'target_accuracy': float(compare.target_accuracy),
          'runs': [list(run) for run in run_order(list(params), list(compare.seeds))]}


def join_compare_record(study: optuna.Study, compare: ml_collections.ConfigDict) -> dict[str, Any]:
  """Stores the record in a new study; refuses a file whose arms, seeds or order differ from the study's."""
  current = compare_record(compare)
  recorded = study.user_attrs.get('compare')
  if recorded is None:
    study.set_user_attr('compare', current)
  elif recorded != current:
    raise ValueError(f"Study '{study.study_name}' was started from another compare file:\n  " +
                     '\n  '.join(record_differences(recorded, current)[:20]) +
                     '\nUse the same file, or another --dir / study_name for a new comparison.')
  return current


def machine_record() -> tuple[str, dict[str, Any]]:
  """(user-attribute name, what a worker's machine is): the report says where the runs trained."""
  import jax
  device = jax.devices()[0]
  return f'machine {socket.gethostname()}', {
      'cpus': os.cpu_count(), 'platform': platform.platform(terse=True),
      'devices': f'{jax.device_count()} × {device.device_kind}'}


def run_params(record: dict[str, Any], slot: int) -> dict[str, Any]:
  """The config values of budget slot `slot`: its arm's and its seed."""
  label, seed = record['runs'][slot]
  return {**record['arms'][label], SEED_KEY: seed}


class RunSampler(optuna.samplers.RandomSampler):
  """Budget slot k (bw_jax/sweep/study.py) takes the values of run k of the compare record; a retry keeps
  its original's values (Optuna copies them), so it never reaches the sampler."""

  def __init__(self, record: dict[str, Any]):
    super().__init__(seed=0)
    self._record = record

  def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                         param_distribution: optuna.distributions.BaseDistribution) -> Any:
    slot = budget_slot(study.get_trials(deepcopy=False), trial)
    if slot >= len(self._record['runs']):  # The worker drops surplus trials before they sample.
      raise RuntimeError(f'trial {trial.number} has slot {slot}, beyond the {len(self._record["runs"])} runs')
    return run_params(self._record, slot)[param_name]


def arm_of(params: dict[str, Any], record: dict[str, Any]) -> str | None:
  """The label of the arm whose values `params` (a trial's, with its seed) has, or None."""
  values = {k: v for k, v in params.items() if k != SEED_KEY}
  return next((label for label, arm in record['arms'].items() if arm == values), None)
