"""A sweep worker: pulls trials of a study and trains each in its own workdir until the budget is spent.

A worker that dies stops its heartbeat; any worker then marks its trial failed and queues a retry with the
same values, which trains in the same workdir `DIR/trials/NNNN` and so resumes from its checkpoint. A trial
whose loss went non-finite fails and keeps its slot: that is a result of its values, not an accident.
"""

import contextlib
import dataclasses
import fcntl
import os
import socket
import time
import traceback
from typing import Any, Callable, Iterator
import warnings

import ml_collections
import optuna
from optuna.trial import FrozenTrial, TrialState

from bw_jax.train.formatting import format_seconds
from bw_jax.sweep.space import BLOCK_KEYS, display_order, suggest, trial_config
from bw_jax.train.config.validation import config_value
from bw_jax.sweep.study import (FINISHED, RetryOnce, budget_done, budget_slot, can_start, default_storage,
                                finished_count, is_retry, is_surplus, original_number)


class SurplusTrial(Exception):
  """Two workers opened the last slot at once; the later trial (this one) is dropped before training."""


class Preempted(Exception):
  """SIGTERM stopped training after a checkpoint; the trial is queued again."""


def trial_workdir(directory: str, trial: FrozenTrial) -> str:
  return os.path.join(directory, 'trials', f'{original_number(trial):04d}')


@contextlib.contextmanager
def workdir_lock(workdir: str, owner: str, log: Callable[[str], None], timeout: float | None = None,
                 poll_seconds: float = 1.0) -> Iterator[None]:
  """Holds `workdir/.lock` (an flock, which the kernel drops when its process dies) while a trial trains
  there, so that two processes never train in one workdir: a worker whose heartbeat went stale while it
  still trains would otherwise share it with the retry. A second taker says who holds it and waits
  (TimeoutError after `timeout` seconds, when given)."""
  with open(os.path.join(workdir, '.lock'), 'a+') as f:
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = False
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        if not waiting:
          log(f'Trial workdir {workdir} is in use by {holder} (a worker still training it although its '
              'heartbeat went stale); waiting for it to finish before resuming from its checkpoint.')
          waiting = True
        if deadline is not None and time.monotonic() > deadline:
          raise TimeoutError(f'{workdir} is still locked by {holder} after {timeout} s.') from None
        time.sleep(poll_seconds)
    f.seek(0)
    f.truncate()
    f.write(owner + '\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_divergence(error: BaseException) -> bool:
  """A non-finite loss (`bw_jax.train.loop.check_finite`) or too many BW fallbacks (`config.bw_max_fallbacks`):
  results of the trial's values, not accidents to retry."""
  from bw_jax.train import loop as train
  from bw_jax.train import health  # Already loaded by the trial that raised `error`.
  return isinstance(error, (train.NonFiniteLossError, health.BWHealthError))


@dataclasses.dataclass
class Worker:
  """One `run` process: pulls trials of `study` until the budget of `n_trials` slots is spent."""
  sweep: ml_collections.ConfigDict
  space: dict[str, tuple]
  directory: str
  study: optuna.Study
  n_trials: int
  storage: str
  name: str = dataclasses.field(default_factory=lambda: f'{socket.gethostname()}:{os.getpid()}')
  ran: int = 0
  crash: str | None = None
  report_command: str = 'report'  # `python -m bw_jax.sweep <this> --dir=…` ends the final summary.

  @property
  def heartbeat(self) -> bool:
    """RDB storages (a URL) keep heartbeats and retry dead workers' trials; journal files do not."""
    return '://' in self.storage

  def objective(self, trial: optuna.Trial) -> float:
    """Trains one trial in its workdir (resuming a retried one) and returns the objective."""
    trials = self.study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == trial.number)
    if budget_slot(trials, frozen) >= self.n_trials:
      trial.set_user_attr('surplus', True)
      raise SurplusTrial(f'trial {trial.number} is beyond the budget of {self.n_trials}')
    params = suggest(trial, self.space)
    config = trial_config(self.sweep, params)
    workdir = trial_workdir(self.directory, frozen)
    os.makedirs(workdir, exist_ok=True)
    for key in BLOCK_KEYS:  # The report groups by block types even when the search space fixes them.
      trial.set_user_attr(key, config_value(config, key))
    for key in ('outcome', 'error'):  # A retry starts with the attributes of the attempt it replaces.
      trial.set_user_attr(key, None)
    trial.set_user_attr('worker', self.name)
    trial.set_user_attr('workdir', workdir)
    with workdir_lock(workdir, self.name, lambda line: print(line, flush=True)):
      return self.train(trial, config, workdir, frozen.user_attrs.get('eval_history'))

  def train(self, trial: optuna.Trial, config: ml_collections.ConfigDict, workdir: str,
            eval_history: list | None) -> float:
    """Trains the trial's `config` in `workdir`, which this process holds (`workdir_lock`); `eval_history` is
    the attempt's recorded evals (a retry's are its original's)."""
    from bw_jax.train import loop as train  # Imported here: `report` and `promote` need no JAX.
    from bw_jax.train.checkpoints import latest_checkpoint_step
    from bw_jax.train.plan import resolve_plan
    trial.set_user_attr('resumed_from_step', latest_checkpoint_step(workdir))
    plan = resolve_plan(config)
    last_step, metric = plan.num_train_steps, self.sweep.objective.replace('eval_', '')

    # [[step, accuracy, loss], …] of every periodic eval (the compare report's learning curves); a retry
    # starts with its original's list, and evals it repeats after resuming replace the earlier ones.
    history = [list(h) for h in eval_history or []]

    def on_eval(step: int, metrics: dict[str, float]) -> None:
      history[:] = [h for h in history if h[0] < step] + [[step, metrics['accuracy'], metrics['loss']]]
      trial.set_user_attr('eval_history', history)
      trial.set_user_attr('eval_accuracy', metrics['accuracy'])
      trial.set_user_attr('eval_loss', metrics['loss'])
      trial.set_user_attr('step', step)
      if step < last_step:
        trial.report(metrics[metric], step)
        if trial.should_prune():
          raise optuna.TrialPruned(f'eval {metric} {metrics[metric]:.4f} at step {step}')

    start = time.perf_counter()
    try:
      with open(os.path.join(workdir, 'train.log'), 'a') as log, contextlib.redirect_stdout(log):
        summary = train.train_plan(plan, workdir, on_eval=on_eval)
    except optuna.TrialPruned:
      trial.set_user_attr('seconds', time.perf_counter() - start)
      raise
    except Exception as e:  # Failed: Optuna records FAIL; `run_one` decides whether to retry.
      trial.set_user_attr('seconds', time.perf_counter() - start)
      trial.set_user_attr('error', str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
      trial.set_user_attr('outcome', 'diverged' if is_divergence(e) else 'crashed')
      self.crash = None if is_divergence(e) else traceback.format_exc()
      raise
    trial.set_user_attr('seconds', time.perf_counter() - start)
    if summary.get('preempted'):
      trial.set_user_attr('outcome', 'preempted')
      stopped = f"{summary['signal']} at step {summary['step']}"
      trial.set_user_attr('error', stopped)
      raise Preempted(stopped)
    for key in ('eval_accuracy', 'eval_loss', 'step', 'train_images_per_sec', 'bw_fallbacks', 'num_classes',
                'train_examples', 'eval_examples'):  # The data's sizes and classes: the report's flags, promote.
      trial.set_user_attr(key, summary[key])
    return summary[self.sweep.objective]

  def run_one(self) -> FrozenTrial | None:
    """One trial through `study.optimize` (which keeps its heartbeat); a crashed, preempted or interrupted
    trial is queued again. Returns the finished trial (None when it was surplus)."""
    numbers: list[int] = []

    def objective(trial: optuna.Trial) -> float:
      numbers.append(trial.number)
      return self.objective(trial)

    try:
      self.study.optimize(objective, n_trials=1, catch=(Exception,))
    except BaseException:  # KeyboardInterrupt: Optuna marked the trial failed; queue it for another worker.
      if numbers:
        self.requeue(self.study.get_trials(deepcopy=False)[numbers[0]])
      raise
    if not numbers:
      return None
    trial = self.study.get_trials(deepcopy=False)[numbers[0]]
    if is_surplus(trial):
      return None
    if trial.user_attrs.get('outcome') in ('crashed', 'preempted'):
      self.requeue(trial)
    self.ran += 1
    return trial

  def requeue(self, trial: FrozenTrial) -> None:
    if trial.state == TrialState.FAIL and self.heartbeat:
      RetryOnce(self.sweep.max_retry)(self.study, trial)

  def fail_stale_trials(self) -> None:
    if self.heartbeat:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(self.study)

  def run(self, log: Callable[[str], None] = print) -> None:
    """Pulls trials until the budget is spent; waits while other workers' trials run, since one of them may
    die and need a retry (journal storages have no heartbeat, so there it leaves instead)."""
    start, crashes = time.perf_counter(), 0
    while True:
      self.fail_stale_trials()
      trials = self.study.get_trials(deepcopy=False)
      if budget_done(trials, self.n_trials):
        break
      if not can_start(trials, self.n_trials):
        if not self.heartbeat:
          break
        time.sleep(self.sweep.heartbeat_interval)
        continue
      trial = self.run_one()
      if trial is None:
        continue
      log(progress_line(trial, self.study, self.n_trials, self.space))
      if trial.user_attrs.get('outcome') == 'preempted':
        log(f"{trial.user_attrs['error']}: the trial was checkpointed and queued again; this worker stops.")
        return
      crashes = crashes + 1 if trial.user_attrs.get('outcome') == 'crashed' else 0
      if self.crash:
        log(self.crash)
        self.crash = None
      if crashes >= 3:
        raise RuntimeError(f'{crashes} trials in a row crashed in this worker (tracebacks above, errors in '
                           f'the report); fix the cause and start `run` again: their retries are queued.')
    report = f'python -m bw_jax.sweep {self.report_command} --dir={self.directory}'
    if self.storage != default_storage(self.directory):
      report += ' --storage=URL'
    log(final_summary(self.study, self.n_trials, self.ran, time.perf_counter() - start) + f'\nReport: {report}')


def format_params(params: dict[str, Any]) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())


def progress_line(trial: FrozenTrial, study: optuna.Study, n_trials: int, space: dict[str, tuple]) -> str:
  """'[3/16] trial 5 COMPLETE eval_accuracy 0.8123 in 0:02:13 (worker) key=value …' for a finished trial."""
  done = finished_count(study.get_trials(deepcopy=False))
  attrs = trial.user_attrs
  outcome = trial.state.name
  if trial.state == TrialState.FAIL:
    outcome += f" ({attrs.get('outcome') or 'failed'}: {attrs.get('error') or ''})"
  accuracy = attrs.get('eval_accuracy')
  metric = f'eval_accuracy {accuracy:.4f}' if accuracy is not None else 'no eval'
  retry = f' retry of {original_number(trial)},' if is_retry(trial) else ''
  resumed = attrs.get('resumed_from_step')
  resumed = f' resumed at step {resumed},' if resumed else ''
  return (f'[{done}/{n_trials}] trial {trial.number}{retry}{resumed} {outcome} {metric} in '
          f"{format_seconds(attrs.get('seconds'))} ({attrs.get('worker')}) "
          f'{format_params({k: trial.params[k] for k in display_order(list(space)) if k in trial.params})}')


def final_summary(study: optuna.Study, n_trials: int, ran: int, seconds: float) -> str:
  trials = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
  counts = {s: sum(t.state == s for t in trials) for s in FINISHED}
  lines = [f"Sweep '{study.study_name}': {finished_count(trials)}/{n_trials} trials finished "
           f'({counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, '
           f'{counts[TrialState.FAIL]} failed or retried); this worker ran {ran} in {format_seconds(seconds)}.']
  if counts[TrialState.COMPLETE]:
    best = study.best_trial
    lines.append(f'Best: trial {best.number}, {study.user_attrs["sweep"]["objective"]} {best.value:.4f}: '
                 f'{format_params({k: best.params[k] for k in display_order(list(best.params))})}')
  return '\n'.join(lines)
