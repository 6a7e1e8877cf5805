"""A sweep file and its search space: the one list of sweep keys (`base_sweep_config`), checking (every key
a training config key, every value one the code accepts), drawing a trial's values and building its
training config.

A sweep file (`configs/sweeps/*.py`) starts from `base_sweep_config()` and overrides what differs. A
search-space spec is a tuple:
  ('categorical', (choice, ...))   choices: None, bool, int, float or str
  ('float', low, high)             uniform;  ('log_float', low, high): uniform in log(value)
  ('int', low, high)               inclusive; ('log_int', low, high): uniform in log(value)
"""

import copy
from typing import Any, Sequence

import ml_collections
import optuna

from bw_jax.checks import check_choice, is_positive_int
from bw_jax.train.config.rules import InPrograms
from bw_jax.train.config.schema import keys_where
from bw_jax.train.config.validation import (base_config, config_reference, unknown_keys,
                                            validate_config)

SPEC_KINDS = ('categorical', 'float', 'log_float', 'int', 'log_int')
SPEC_FORMS = ("('categorical', (choice, ...)), ('float' | 'log_float', low, high) or "
              "('int' | 'log_int', low, high)")
OBJECTIVES = {'eval_accuracy': 'maximize', 'eval_loss': 'minimize'}
SAMPLERS = ('random', 'qmc')
PRUNERS = ('none', 'median')
BLOCK_KEYS = ('model.stem_type', 'model.mbconv_type', 'model.head_type')
BUDGET_KEYS = ('num_epochs', 'num_train_steps')
# Training keys that change the global batch or the schedule's lengths (the key table's DERIVED), but the budget.
SCHEDULE_KEYS = tuple(k for k in keys_where(programs=InPrograms.DERIVED) if k not in BUDGET_KEYS)


def base_sweep_config() -> ml_collections.ConfigDict:
  """Every sweep key with its default; `check_sweep_config` rejects any other."""
  config = ml_collections.ConfigDict()
  config.study_name = 'sweep'  # Optuna study name: several sweeps can share one storage.
  config.train = base_config()  # Every trial's training config before its budget and sampled values.
  # Each trial's length; overrides train.num_epochs / num_train_steps (num_train_steps > 0 wins).
  config.trial_budget = ml_collections.ConfigDict({'num_epochs': 1.0, 'num_train_steps': -1})
  # Nested like the training config: search_space.model.bw.method = ('categorical', ('cholesky', 'zca')).
  config.search_space = ml_collections.ConfigDict()
  # Categorical search-space keys whose combinations are taken in turn (a seeded shuffle of their product,
  # repeated), so that every combination gets trials; the other keys are drawn at random. () for none.
  config.stratify = ()
  config.objective = 'eval_accuracy'  # Maximised; 'eval_loss' is minimised.
  config.n_trials = 20  # The sweep's total budget, over all workers (`run --n-trials` overrides).
  config.sampler = 'random'  # 'random' (seeded per trial) or 'qmc' (scrambled Sobol; no stratify).
  config.seed = 0  # The sampler's: trial k draws the same values in every run and every worker.
  config.pruner = 'none'  # 'none' or 'median': stop a trial whose eval is below the median of the others'.
  config.pruner_startup_trials = 5  # 'median': prune nothing until this many trials have finished …
  config.pruner_warmup_steps = 0  # … nor before this training step.
  # A worker records a heartbeat every heartbeat_interval seconds; a running trial without one for
  # grace_period seconds is marked failed and queued again (same values, same workdir: it resumes).
  config.heartbeat_interval = 60
  config.grace_period = 300
  config.max_retry = 3  # How many times one trial is queued again after its worker died or it crashed.
  return config


def flatten_space(space: Any, prefix: str = '') -> dict[str, Any]:
  """{'learning_rate': spec, 'model.bw.method': spec, …}: the leaves of a nested search space (ConfigDict keeps
  keys sorted)."""
  flat = {}
  for key, value in space.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update(flatten_space(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return flat


def display_order(keys: Sequence[str]) -> list[str]:
  """The block types first (stem, MBConv, head), then the other keys as given."""
  return [k for k in BLOCK_KEYS if k in keys] + [k for k in keys if k not in BLOCK_KEYS]


def spec_errors(key: str, spec: Any) -> list[str]:
  """What is wrong with one search-space spec (nothing when it is well formed)."""
  if not isinstance(spec, (tuple, list)) or not spec or spec[0] not in SPEC_KINDS:
    return [f'search_space.{key}={spec!r} is not a spec; write {SPEC_FORMS}.']
  kind, args = spec[0], tuple(spec[1:])
  if kind == 'categorical':
    if len(args) != 1 or not isinstance(args[0], (tuple, list)) or not args[0]:
      return [f"search_space.{key}: 'categorical' takes one non-empty tuple of choices, got {args!r}."]
    bad = [c for c in args[0] if c is not None and not isinstance(c, (bool, int, float, str))]
    if bad or len(set(map(repr, args[0]))) != len(args[0]):
      return [f'search_space.{key}: choices must be distinct None, bool, int, float or str; got {args[0]!r}.']
    return []
  numbers_ok = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
  if not numbers_ok or not args[0] < args[1]:
    return [f"search_space.{key}: {kind!r} takes (low, high) with low < high, got {args!r}."]
  if kind.endswith('int') and not all(isinstance(a, int) for a in args):
    return [f"search_space.{key}: {kind!r} takes integer bounds, got {args!r}."]
  if kind.startswith('log') and args[0] <= 0:
    return [f"search_space.{key}: {kind!r} needs low > 0, got {args[0]!r}."]
  return []


def candidate_values(spec: tuple) -> list[Any]:
  """The values a spec can produce that validation tries: every choice, or both bounds."""
  return list(spec[1]) if spec[0] == 'categorical' else [spec[1], spec[2]]


def with_values(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with {'model.bw.method': 'zca', …} set (types are checked by ConfigDict)."""
  config = copy.deepcopy(config)
  config.update_from_flattened_dict(values)
  return config


def is_config_leaf(reference: ml_collections.ConfigDict, key: str) -> bool:
  node = reference
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def space_key_errors(space: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> list[str]:
  """Search-space keys that are not single training config keys, each named, with the nearest key."""
  errors = [f'search_space: {e}' for e in unknown_keys(space, reference)]
  for key in flatten_space(space):
    node, parts = reference, key.split('.')
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        errors.append(f"search_space.{key}: '{'.'.join(parts[:depth])}' is one config key, not a group.")
        break
      node = node.get(part)
    else:
      if isinstance(node, ml_collections.ConfigDict):
        errors.append(f"search_space.{key} is a group of config keys ({', '.join(sorted(node))}), not one.")
      elif key in BUDGET_KEYS:
        errors.append(f'search_space.{key}: the training length is the trial budget; set trial_budget.{key}.')
  return errors


def space_value_errors(flat: dict[str, tuple], train: ml_collections.ConfigDict) -> list[str]:
  """Each choice (or bound) set alone on `train` and validated: the training code names what is allowed."""
  errors = []
  for key, spec in flat.items():
    for value in candidate_values(spec):
      try:
        validate_config(with_values(train, {key: value}))
      except (ValueError, TypeError) as e:
        errors.append(f'search_space.{key} = {value!r}: {e}')
  return errors


def sweep_setting_errors(sweep: ml_collections.ConfigDict, flat: dict[str, tuple]) -> list[str]:
  """The sweep's own keys (not the search space): names, choices and counts."""
  reference = base_sweep_config()
  top = lambda c: ml_collections.ConfigDict({k: v for k, v in c.items() if k not in ('train', 'search_space')})
  errors = unknown_keys(top(sweep), top(reference))
  for name, allowed in (('objective', tuple(OBJECTIVES)), ('sampler', SAMPLERS), ('pruner', PRUNERS)):
    try:
      check_choice(name, sweep.get(name), allowed)
    except ValueError as e:
      errors.append(str(e))
  for name in ('n_trials', 'heartbeat_interval', 'grace_period'):
    if not is_positive_int(sweep.get(name)):
      errors.append(f'{name}={sweep.get(name)!r} must be a positive integer.')
  for key in sweep.get('stratify', ()):
    if key not in flat or flat[key][0] != 'categorical':
      errors.append(f"stratify names {key!r}, which is not a 'categorical' search-space key.")
  if sweep.get('stratify') and sweep.get('sampler') == 'qmc':
    errors.append("stratify works with sampler='random' only (QMC draws every key from its own sequence).")
  return errors


def check_sweep_config(sweep: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Raises a ValueError listing everything wrong before any trial starts; returns the flat search space."""
  flat = flatten_space(sweep.get('search_space', ml_collections.ConfigDict()))
  errors = sweep_setting_errors(sweep, flat)
  if not flat:
    errors.append('search_space is empty: add at least one key (bw_jax/sweep/space.py shows the forms).')
  reference = config_reference(sweep.train)
  errors += space_key_errors(sweep.search_space, reference)
  errors += [e for key, spec in flat.items() for e in spec_errors(key, spec)]
  try:
    train = trial_config(sweep, {})
    validate_config(train)
  except (ValueError, TypeError) as e:
    errors.append(f'train (with trial_budget): {e}')
  else:
    valid = {k: spec for k, spec in flat.items()
             if is_config_leaf(reference, k) and k not in BUDGET_KEYS and not spec_errors(k, spec)}
    errors += space_value_errors(valid, train)
  if errors:
    raise ValueError('Invalid sweep config:\n  ' + '\n  '.join(errors))
  return flat


def schedule_errors(sweep: ml_collections.ConfigDict, flat: dict[str, tuple], counts: Any) -> list[str]:
  """Where a trial's warm-up or decay cannot complete within the trial budget on data holding `counts`
  (`bw_jax.train.plan.DataCounts`): the trial config as is, and each value of a searched SCHEDULE_KEYS key on
  it, planned as the trial would be (`plan_for`)."""
  from bw_jax.train.plan import plan_for  # JAX: only `run` calls this.
  train = trial_config(sweep, {})
  cases = [('train (with trial_budget)', {})]
  cases += [(f'search_space.{key} = {value!r}', {key: value})
            for key, spec in flat.items() if key in SCHEDULE_KEYS for value in candidate_values(spec)]
  errors = []
  for label, values in cases:
    try:
      errors += [f'{label}: {problem}' for problem in plan_for(with_values(train, values), counts).problems()]
    except ValueError as e:  # The data cannot hold the trial (a batch larger than the split).
      errors.append(f'{label}: {e}')
  return errors


def check_trial_schedules(sweep: ml_collections.ConfigDict, flat: dict[str, tuple]) -> None:
  """Raises a ValueError, before any trial trains, when a trial's learning-rate schedule cannot run its course
  (`schedule_errors`); counts the data that the trials will read (the data must be there)."""
  from bw_jax.train.plan import count_data
  errors = schedule_errors(sweep, flat, count_data(trial_config(sweep, {})))
  if errors:
    raise ValueError('The learning-rate schedule cannot complete within a trial:\n  ' + '\n  '.join(errors))


def trial_config(sweep: ml_collections.ConfigDict, params: dict[str, Any]) -> ml_collections.ConfigDict:
  """The training config of one trial: `train`, then the trial budget, then the trial's values."""
  return with_values(sweep.train, {**sweep.trial_budget.to_dict(), **params})


def suggest(trial: optuna.Trial, space: dict[str, tuple]) -> dict[str, Any]:
  """The trial's value for every search-space key; Optuna parameter names are the full config keys."""
  params = {}
  for key, (kind, *args) in space.items():
    if kind == 'categorical':
      params[key] = trial.suggest_categorical(key, list(args[0]))
    elif kind in ('float', 'log_float'):
      params[key] = trial.suggest_float(key, args[0], args[1], log=kind == 'log_float')
    else:
      params[key] = trial.suggest_int(key, args[0], args[1], log=kind == 'log_int')
  return params
