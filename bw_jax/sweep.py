"""Hyper-parameter random search with Optuna: `python -m bw_jax.sweep run | report | promote` (DESIGN.md §4).

  run      --config=configs/sweep_X.py --dir=DIR [--storage=URL] [--n-trials=N]
  report   --dir=DIR [--storage=URL] [--out=DIR/report]
  promote  --dir=DIR [--storage=URL] --top-k=K --base=configs/imagenet.py --out=OUT

A sweep file (`configs/sweep_*.py`, keys in `configs/sweep_base.py`; `sweep_config.py`) holds every trial's
training config, the per-trial budget, the search space and the objective. `run` may be started any number
of times, on any number of machines, against one storage (`DIR/study.db` by default; a PostgreSQL URL for
many machines; `sweep_study.py`): each process pulls trials until `n_trials` budget slots have finished,
over all processes. A worker that dies stops its heartbeat; any worker then marks its trial failed and
queues a retry with the same values, which trains in the same workdir `DIR/trials/NNNN` and so resumes from
its checkpoint. A trial whose loss went non-finite fails and keeps its slot: that is a result of its values,
not an accident. `report` and `promote` are in `sweep_report.py`.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence
import warnings

import ml_collections
import optuna
from optuna.trial import FrozenTrial, TrialState

from bw_jax.sweep_config import (BLOCK_KEYS, check_sweep_config, config_value, display_order, load_config_file,
                                 suggest, trial_config)
from bw_jax.sweep_study import (FINISHED, budget_done, budget_slot, can_start, default_storage, finished_count,
                                is_retry, is_surplus, load_study, open_study, original_number)


class SurplusTrial(Exception):
  """Two workers opened the last slot at once; the later trial (this one) is dropped before training."""


class Preempted(Exception):
  """SIGTERM stopped training after a checkpoint; the trial is queued again."""


def trial_workdir(directory: str, trial: FrozenTrial) -> str:
  return os.path.join(directory, 'trials', f'{original_number(trial):04d}')


def latest_checkpoint_step(workdir: str) -> int | None:
  """The step of the newest finished checkpoint in `workdir/checkpoints` (Orbax names them by step)."""
  path = os.path.join(workdir, 'checkpoints')
  steps = [int(name) for name in os.listdir(path) if name.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=None)


def is_divergence(error: BaseException) -> bool:
  """The non-finite loss error of `bw_jax.train.check_finite`: a result of the trial's values."""
  from bw_jax import train  # Already loaded by the trial that raised `error`.
  return isinstance(error, train.NonFiniteLossError)


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
    trial.set_user_attr('resumed_from_step', latest_checkpoint_step(workdir))
    from bw_jax import train  # Imported here: `report` and `promote` need no JAX.
    last_step, metric = train.training_length(config)[1], self.sweep.objective.replace('eval_', '')

    def on_eval(step: int, metrics: dict[str, float]) -> None:
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
        summary = train.train_and_evaluate(config, workdir, on_eval=on_eval)
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
      raise Preempted(f"SIGTERM at step {summary['step']}")
    for key in ('eval_accuracy', 'eval_loss', 'step', 'train_images_per_sec', 'bw_fallbacks'):
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
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(self.sweep.max_retry)(self.study, trial)

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
        log('SIGTERM: the trial was checkpointed and queued again; this worker stops.')
        return
      crashes = crashes + 1 if trial.user_attrs.get('outcome') == 'crashed' else 0
      if self.crash:
        log(self.crash)
        self.crash = None
      if crashes >= 3:
        raise RuntimeError(f'{crashes} trials in a row crashed in this worker (tracebacks above, errors in '
                           f'the report); fix the cause and start `run` again: their retries are queued.')
    report = f'python -m bw_jax.sweep report --dir={self.directory}'
    if self.storage != default_storage(self.directory):
      report += ' --storage=URL'
    log(final_summary(self.study, self.n_trials, self.ran, time.perf_counter() - start) + f'\nReport: {report}')


def format_seconds(seconds: float | None) -> str:
  """'1:02:03' for 3723 seconds; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


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


# ----------------------------------------------------------------------------------------------------------
# Command line


def run(args: argparse.Namespace) -> None:
  sweep = load_config_file(args.config)
  if args.n_trials is not None:
    sweep.n_trials = args.n_trials
  space = check_sweep_config(sweep)  # Before anything is created: a bad file leaves no trace.
  os.makedirs(args.dir, exist_ok=True)
  import jax
  # jax 0.10.2 on CPU: asynchronous dispatch intermittently hangs in block_until_ready (tests/conftest.py).
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # A retried trial need not compile again.
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(args.dir), 'jax_cache'))
  storage = args.storage or default_storage(args.dir)
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # Our progress lines replace Optuna's.
  study = open_study(sweep, space, storage)
  print(f"Sweep '{sweep.study_name}' in {storage}: budget {sweep.n_trials} trials; trial workdirs in "
        f"{os.path.join(os.path.abspath(args.dir), 'trials')}", flush=True)
  worker = Worker(sweep, space, os.path.abspath(args.dir), study, sweep.n_trials, storage)
  worker.run(lambda line: print(line, flush=True))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m bw_jax.sweep', description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--dir', required=True, help='Sweep directory: study.db (default storage), trials/.')
  common.add_argument('--storage', help='Optuna RDB URL (postgresql://user@host/db) or a journal file path; '
                                        'default: sqlite:///DIR/study.db.')
  run_parser = commands.add_parser('run', parents=[common], help='Train trials until the budget is spent.')
  run_parser.add_argument('--config', required=True, help='Sweep file, e.g. configs/sweep_fashion_mnist.py.')
  run_parser.add_argument('--n-trials', type=int, help="Total budget over all workers (default: the file's).")
  report_parser = commands.add_parser('report', parents=[common], help='results.csv, summary.md and plots.')
  report_parser.add_argument('--study-name')
  report_parser.add_argument('--out', help='Report directory (default: DIR/report).')
  promote_parser = commands.add_parser('promote', parents=[common], help='Configs for the best block types.')
  promote_parser.add_argument('--study-name')
  promote_parser.add_argument('--top-k', type=int, default=3, help='How many block-type combinations.')
  promote_parser.add_argument('--base', required=True, help='Config the winners start from (configs/imagenet.py).')
  promote_parser.add_argument('--out', required=True, help='Directory for the written configs.')
  promote_parser.add_argument('--workdir-root', default='runs/imagenet', help='Where their commands train.')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == 'run':
      run(args)
      return
    from bw_jax import sweep_report
    study = load_study(args.dir, args.storage, args.study_name)
    if args.command == 'report':
      out = args.out or os.path.join(args.dir, 'report')
      sweep_report.write_report(study, out)
      print(f'Report of {len(study.trials)} trials in {out}: results.csv, summary.md, '
            f'{", ".join(sweep_report.PLOTS)}')
    else:
      for line in sweep_report.promote(study, args.top_k, args.base, args.out, args.workdir_root):
        print(line)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
