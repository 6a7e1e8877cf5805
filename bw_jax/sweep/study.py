"""The Optuna side of a sweep: budget slots, the sampler, the pruner, and the storage and study that all
workers share (`bw_jax.sweep`).

The budget is counted in slots: fresh trials (not retries) in the order of their numbers, which the storage
hands out under a lock, so every worker agrees that the first `n_trials` fresh trials are the budget, and a
later one (two workers asked at once) is dropped before it trains. A retry (a trial whose worker died,
queued again by `RetryHeartbeatStaleTrialCallback` with the same values) takes its original's slot.
"""

import bisect
import copy
import datetime
import itertools
import json
import os
import time
from typing import Any, Sequence
import warnings
import zlib

import ml_collections
import numpy as np
import optuna
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
import sqlalchemy

from bw_jax.train.config.validation import with_global_batch_size
from bw_jax.sweep.space import OBJECTIVES

# What defines the experiment: a worker whose sweep file differs here from the study's record is refused.
EXPERIMENT_KEYS = ('train', 'trial_budget', 'search_space', 'stratify', 'objective', 'sampler', 'seed')
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RETRY_CLAIM = 'bw_jax:retry_queued'  # System attribute of a failed trial whose retry has been queued.


def original_number(trial: FrozenTrial) -> int:
  """The number of the first attempt of the trial that `trial` retries (RetryHeartbeatStaleTrialCallback's
  'failed_trial'), else `trial.number`."""
  return trial.system_attrs.get('failed_trial', trial.number)


def is_retry(trial: FrozenTrial) -> bool:
  return 'failed_trial' in trial.system_attrs


def fresh_numbers(trials: Sequence[FrozenTrial]) -> list[int]:
  """Numbers of the trials that are not retries, ascending: their order is the order of budget slots."""
  return sorted(t.number for t in trials if not is_retry(t))


def budget_slot(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int:
  """0, 1, … for the fresh trials in number order; a retry has its original's slot. ≥ n_trials: surplus."""
  return bisect.bisect_left(fresh_numbers(trials), original_number(trial))


def can_start(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
  """True while a slot is unopened or a retry waits."""
  return len(fresh_numbers(trials)) < n_trials or any(t.state == TrialState.WAITING for t in trials)


def budget_done(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
  """Every slot opened and nothing running or waiting (a running trial may still die and need a retry)."""
  pending = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
  return len(fresh_numbers(trials)) >= n_trials and not pending


def is_surplus(trial: FrozenTrial) -> bool:
  return bool(trial.user_attrs.get('surplus'))


def finished_count(trials: Sequence[FrozenTrial]) -> int:
  """Finished trials that count against the budget: not surplus, and not failures that were retried."""
  retried = {t.system_attrs['failed_trial'] for t in trials if is_retry(t)}
  retried |= {n for t in trials for n in t.system_attrs.get('retry_history', [])}
  return sum(t.state in FINISHED and not is_surplus(t) and t.number not in retried for t in trials)


def stratified_combinations(strata: dict[str, Sequence[Any]], seed: int) -> list[dict[str, Any]]:
  """Every combination of the strata's choices once, in a seeded random order: slot k takes entry k mod len."""
  combinations = [dict(zip(strata, values)) for values in itertools.product(*strata.values())]
  return [combinations[i] for i in np.random.RandomState(seed).permutation(len(combinations))]


class SweepSampler(optuna.samplers.RandomSampler):
  """Optuna's RandomSampler, seeded per draw by (seed, budget slot, parameter name): workers that share a
  seed still draw different trials, a sweep run twice draws the same ones, and stratified keys cycle through
  `stratified_combinations` by slot."""

  def __init__(self, seed: int, strata: dict[str, Sequence[Any]] | None = None):
    super().__init__(seed)
    self._seed = seed
    self._combinations = stratified_combinations(strata or {}, seed)

  def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                         param_distribution: optuna.distributions.BaseDistribution) -> Any:
    slot = budget_slot(study.get_trials(deepcopy=False), trial)
    combination = self._combinations[slot % len(self._combinations)]
    if param_name in combination:
      return combination[param_name]
    seed = np.random.SeedSequence([self._seed, slot, zlib.crc32(param_name.encode())]).generate_state(1)[0]
    return optuna.samplers.RandomSampler(seed=int(seed)).sample_independent(
        study, trial, param_name, param_distribution)


def create_sampler(sweep: ml_collections.ConfigDict, space: dict[str, tuple]) -> optuna.samplers.BaseSampler:
  strata = {key: list(space[key][1]) for key in sweep.stratify}
  if sweep.sampler == 'qmc':  # Scrambled Sobol; its position in the sequence is kept in the study.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      return optuna.samplers.QMCSampler(scramble=True, seed=sweep.seed,
                                        independent_sampler=SweepSampler(sweep.seed))
  return SweepSampler(sweep.seed, strata)


def create_pruner(sweep: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  if sweep.pruner == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                       n_warmup_steps=sweep.pruner_warmup_steps)
  return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------------------------------------
# Storage and study


class ClaimingRDBStorage(optuna.storages.RDBStorage):
  """Optuna's RDBStorage whose trial state changes are atomic claims on SQLite too.

  Optuna checks a trial's state with SELECT … FOR UPDATE, then writes it; SQLite ignores FOR UPDATE, so two
  restarted workers could both see a dead trial RUNNING, both fail it and both queue a retry, or both take
  one WAITING retry and train it together. Here the check and the write are one conditional UPDATE
  (`… WHERE state IN (expected)`), which the database applies under its write lock (SQLite's file lock,
  PostgreSQL's row lock): exactly one caller changes the state, the others see it already changed.
  """

  def set_trial_state_values(self, trial_id: int, state: TrialState,
                             values: Sequence[float] | None = None) -> bool:
    """As RDBStorage's: False when asked for RUNNING of a trial that is no longer WAITING;
    UpdateFinishedTrialError when the trial is already finished (another worker got there first)."""
    expected = [TrialState.WAITING] if state == TrialState.RUNNING else [TrialState.RUNNING, TrialState.WAITING]
    now = datetime.datetime.now()
    changes = {'state': state, **({'datetime_start': now} if state == TrialState.RUNNING else {}),
               **({'datetime_complete': now} if state.is_finished() else {})}
    with _create_scoped_session(self.scoped_session) as session:
      trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
      self.check_trial_is_updatable(trial_id, trial.state)
      for objective, value in enumerate(values or ()):
        self._set_trial_value_without_commit(session, trial, objective, value)
      session.flush()
      claim = (sqlalchemy.update(models.TrialModel)
               .where(models.TrialModel.trial_id == trial_id, models.TrialModel.state.in_(expected))
               .values(**changes).execution_options(synchronize_session=False))
      if session.execute(claim).rowcount == 1:
        return True
      session.rollback()  # The values written above belong to a trial someone else changed.
      current = session.scalar(sqlalchemy.select(models.TrialModel.state)
                               .where(models.TrialModel.trial_id == trial_id))
      self.check_trial_is_updatable(trial_id, current)
      return False


def claim_retry(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
  """True for the one caller that may queue the retry of failed trial `trial_id`: the claim is an insert of
  a system attribute that the (trial, key) unique constraint admits once, on SQLite and PostgreSQL alike."""
  backend = getattr(storage, '_backend', storage)  # Optuna wraps an RDBStorage in a cache.
  try:
    with backend.engine.begin() as connection:
      connection.execute(sqlalchemy.insert(models.TrialSystemAttributeModel).values(
          trial_id=trial_id, key=RETRY_CLAIM, value_json=json.dumps(True)))
  except sqlalchemy.exc.IntegrityError:
    return False
  return True


class RetryOnce:
  """Optuna's RetryHeartbeatStaleTrialCallback, queueing at most one retry per failed trial however many
  workers (or paths of one worker: stale trials, its own crash, Ctrl-C) call it."""

  def __init__(self, max_retry: int):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    if claim_retry(study._storage, trial._trial_id):
      trial = copy.copy(trial)  # The retry inherits the system attributes: not this trial's claim.
      trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != RETRY_CLAIM}
      self._retry(study, trial)


def default_storage(directory: str) -> str:
  return 'sqlite:///' + os.path.abspath(os.path.join(directory, 'study.db'))


def create_storage(target: str, sweep: ml_collections.ConfigDict | None = None) -> optuna.storages.BaseStorage:
  """An RDB storage for a URL (`sqlite:///…`, `postgresql://…`), with heartbeats and retries when `sweep` is
  given; a journal file for any other string (Optuna's journal has no heartbeat: dead workers' trials stay
  'RUNNING' there, so use it only where workers are not killed)."""
  if '://' not in target:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(target))
  # SQLite: wait for the file lock instead of failing when workers write at once. Servers: drop dead links.
  engine_kwargs = {'connect_args': {'timeout': 120}} if target.startswith('sqlite') else {'pool_pre_ping': True}
  if sweep is None:
    return ClaimingRDBStorage(target, engine_kwargs=engine_kwargs)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    return ClaimingRDBStorage(
        target, engine_kwargs=engine_kwargs, heartbeat_interval=sweep.heartbeat_interval,
        grace_period=sweep.grace_period, heartbeat_stale_trial_callback=RetryOnce(sweep.max_retry))


def experiment_record(sweep: ml_collections.ConfigDict) -> dict[str, Any]:
  """The EXPERIMENT_KEYS of `sweep` as JSON values; the data directory may differ between machines."""
  values = {k: sweep[k] for k in EXPERIMENT_KEYS}
  values['train'] = with_global_batch_size(values['train'])  # The batch the trials train with here.
  record = json.loads(json.dumps({k: v.to_dict() if hasattr(v, 'to_dict') else v for k, v in values.items()}))
  record['train']['dataset'].pop('data_dir', None)
  return record


def record_differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = '') -> list[str]:
  """Dotted keys whose values differ between two nested dicts."""
  keys = sorted(set(recorded) | set(current))
  out = []
  for key in keys:
    a, b = recorded.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += record_differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key}: study has {a!r}, this file {b!r}')
  return out


def open_study(sweep: ml_collections.ConfigDict, space: dict[str, tuple], storage: str) -> optuna.Study:
  """Creates the study or joins it; refuses a sweep file that differs from the one the study started with."""
  for attempt in range(5):  # Workers that start together may race to create the tables.
    try:
      study = optuna.create_study(
          study_name=sweep.study_name, storage=create_storage(storage, sweep),
          sampler=create_sampler(sweep, space), pruner=create_pruner(sweep),
          direction=OBJECTIVES[sweep.objective], load_if_exists=True)
      break
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
      if attempt == 4:
        raise unreadable_storage(storage, e) from e
      time.sleep(1 + attempt)
  current = experiment_record(sweep)
  recorded = study.user_attrs.get('sweep')
  if recorded is None:
    study.set_user_attr('sweep', current)
  elif recorded != current:
    raise ValueError(f"Study '{sweep.study_name}' in {storage} was started from another sweep file:\n  " +
                     '\n  '.join(record_differences(recorded, current)[:20]) +
                     '\nUse the same file, or another --dir / study_name for a new sweep.')
  return study


def load_study(directory: str, storage: str | None, study_name: str | None) -> optuna.Study:
  """The sweep's study (the only one in the storage unless `study_name` is given), for report / promote."""
  target = storage or default_storage(directory)
  path = os.path.join(directory, 'study.db')
  if target == default_storage(directory):
    if not os.path.exists(path):
      raise ValueError(f'No sweep in {directory!r}: {path} does not exist '
                       '(pass --storage for a PostgreSQL or journal storage).')
    if os.path.getsize(path) == 0:
      raise ValueError(f'{path} is empty (0 bytes): no sweep was written there, or the file was truncated.')
  try:
    backend = create_storage(target)
    names = optuna.get_all_study_names(backend)
  except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
    raise unreadable_storage(target, e) from e
  if study_name is None:
    if len(names) != 1:
      raise ValueError(f'{target} holds studies {names}; choose one with --study-name.')
    study_name = names[0]
  elif study_name not in names:
    raise ValueError(f'{target} has no study {study_name!r}; it holds {names}.')
  study = optuna.load_study(study_name=study_name, storage=backend)
  if 'sweep' not in study.user_attrs:
    raise ValueError(f"Study {study_name!r} in {target} was not written by `python -m bw_jax.sweep run`.")
  return study


def unreadable_storage(target: str, error: Exception) -> ValueError:
  """One line naming the storage that the database driver could not read, and the driver's reason."""
  cause = error.__cause__ or error
  reason = str(getattr(cause, 'orig', None) or cause).splitlines()[0]
  return ValueError(f'{target} cannot be read ({reason}); if it is a damaged study.db, move it away and '
                    'start the sweep again, or restore a copy.')
