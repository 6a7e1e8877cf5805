"""Sweep workers racing for the same dead trials, without training: exactly one retry per dead trial, each
retry run by one worker, and one process at a time in a trial's workdir (SQLite and PostgreSQL).

Each round sets up a fresh study whose first DEAD trials are RUNNING with a heartbeat from long ago (their
worker was killed); WORKERS processes, released together by a barrier, each do what a restarted
`python -m bw_jax.sweep run` does first: fail the stale trials (queueing retries) and ask for a trial.
"""

import collections
import datetime
import fcntl
import multiprocessing
import os

import optuna
from optuna.storages._rdb import models
from optuna.trial import TrialState
import pytest
import sqlalchemy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bw_jax.train.config.files import load_config_file  # noqa: E402
from bw_jax.sweep import study as sweep_study  # noqa: E402
from bw_jax.sweep import worker as sweep_worker  # noqa: E402
from exec_dying_with_parent import die_with_parent  # noqa: E402

SMOKE_SWEEP = os.path.join(REPO, 'configs', 'sweeps', 'smoke.py')
ROUNDS, WORKERS, DEAD = 15, 3, 4
LONG_AGO = datetime.datetime(2000, 1, 1)


def round_sweep(number: int):
  sweep = load_config_file(SMOKE_SWEEP)
  sweep.study_name = f'race{number}'
  return sweep


def set_up_round(storage_url: str, number: int) -> None:
  """A study whose trials 0 … DEAD − 1 are RUNNING with a stale heartbeat."""
  sweep = round_sweep(number)
  study = sweep_study.open_study(sweep, {}, storage_url)
  storage = study._storage._backend  # Optuna wraps an RDBStorage in a cache.
  ids = [study.ask()._trial_id for _ in range(DEAD)]
  with storage.engine.begin() as connection:
    connection.execute(sqlalchemy.insert(models.TrialHeartbeatModel),
                       [{'trial_id': i, 'heartbeat': LONG_AGO} for i in ids])


def restarted_worker(storage_url: str, directory: str, start, done, asked) -> None:
  """One restarted worker per round: fail stale trials (queueing their retries), then ask for a trial."""
  die_with_parent()
  storage = sweep_study.create_storage(storage_url, round_sweep(0))
  for number in range(ROUNDS):
    sweep = round_sweep(number)
    start.wait()
    study = optuna.load_study(study_name=sweep.study_name, storage=storage)
    sweep_worker.Worker(sweep, {}, directory, study, DEAD, storage_url).fail_stale_trials()
    asked.put((number, study.ask().number))
    done.wait()


@pytest.mark.filterwarnings('ignore:Heartbeat of storage is supposed to be used with Study.optimize')
def race(storage_url: str, directory: str) -> None:
  context = multiprocessing.get_context('spawn')
  start, done, asked = context.Barrier(WORKERS + 1), context.Barrier(WORKERS + 1), context.Queue()
  workers = [context.Process(target=restarted_worker, args=(storage_url, directory, start, done, asked),
                             daemon=True) for _ in range(WORKERS)]
  for worker in workers:
    worker.start()
  try:
    problems = []
    for number in range(ROUNDS):
      set_up_round(storage_url, number)
      start.wait(timeout=120)
      done.wait(timeout=120)
      popped = [asked.get(timeout=10)[1] for _ in range(WORKERS)]
      study = optuna.load_study(study_name=f'race{number}', storage=sweep_study.create_storage(storage_url))
      trials = study.get_trials(deepcopy=False)
      retries = collections.Counter(sweep_study.original_number(t) for t in trials if sweep_study.is_retry(t))
      states = [trials[n].state for n in range(DEAD)]
      if retries != {n: 1 for n in range(DEAD)} or states != [TrialState.FAIL] * DEAD:
        problems.append(f'round {number}: retries per dead trial {dict(retries)}, states {states}')
      # A worker whose claims all lost may ask before the winner has queued the retries and get a fresh
      # trial: that is fine; two workers getting one trial is not.
      if len(set(popped)) != WORKERS:
        problems.append(f'round {number}: the workers asked and got trials {popped}')
    assert not problems, '\n'.join(problems)
  finally:
    for worker in workers:
      worker.kill()
      worker.join()


@pytest.mark.slow
def test_restarted_workers_queue_one_retry_per_dead_trial_on_sqlite(tmp_path):
  race(sweep_study.default_storage(str(tmp_path)), str(tmp_path))


@pytest.mark.slow
def test_restarted_workers_queue_one_retry_per_dead_trial_on_postgresql(postgres_url, tmp_path):
  race(postgres_url, str(tmp_path))


def test_a_trial_workdir_takes_one_process_at_a_time(tmp_path):
  """While another process holds DIR/trials/NNNN/.lock, a second worker waits and says who holds it."""
  workdir = tmp_path / 'trials' / '0007'
  workdir.mkdir(parents=True)
  with open(workdir / '.lock', 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write('otherhost:1234\n')
    held.flush()
    lines = []
    with pytest.raises(TimeoutError, match=r'trials/0007 .*otherhost:1234'):
      with sweep_worker.workdir_lock(str(workdir), 'me:1', lines.append, timeout=0.5):
        pass
    assert len(lines) == 1 and 'otherhost:1234' in lines[0] and 'waiting' in lines[0]
  with sweep_worker.workdir_lock(str(workdir), 'me:1', lines.append, timeout=0.5):
    with open(workdir / '.lock') as f:
      assert f.read() == 'me:1\n'
    with pytest.raises(TimeoutError):
      with sweep_worker.workdir_lock(str(workdir), 'me:2', lines.append, timeout=0.2):
        pass
