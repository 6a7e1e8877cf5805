"""`python -m bw_jax.sweep run | report | promote | compare`: random search and multi-seed comparisons.

  run      --config=configs/sweeps/X.py --dir=DIR [--storage=URL] [--n-trials=N] [--config.KEY=VALUE ...]
  report   --dir=DIR [--storage=URL] [--out=DIR/report]
  promote  --dir=DIR [--storage=URL] --top-k=K --base=configs/imagenet.py --out=OUT [--chance-margin=M]
  compare run     --config=configs/sweeps/compare_X.py --dir=DIR [--storage=URL]
  compare report  --dir=DIR [--storage=URL] [--out=DIR/report] [--target-accuracy=A]

A sweep file (`configs/sweeps/*.py`; its keys in `bw_jax/sweep/space.py`) holds every trial's training
config, the per-trial budget, the search space and the objective. `run` may be started any number of times,
on any number of machines, against one storage (`DIR/study.db` by default; a PostgreSQL URL for many
machines): each process pulls trials until `n_trials` budget slots have finished, over all processes.
`--config.KEY=VALUE` sets a key of the sweep file, typed as the key (`--config.train.dataset.data_dir=/data`,
which may differ between workers; other overrides must be the same on every worker).

A compare file (`configs/sweeps/compare_*.py`; its keys in `bw_jax/sweep/compare.py`) names arms (a label
and training-config overrides) and seeds; `compare run` trains every (arm, seed) once with the same workers,
storage, heartbeats and retries as `run`, and `compare report` writes the statistics (mean ± 95 % CI per
arm, paired differences against the baseline arm with paired t-tests), learning curves and a conclusion.
"""

import argparse
import os
import sys
from typing import Sequence

import jax
import ml_collections
import optuna  # Without the [sweep] extra, bw_jax/sweep/__init__.py has already said what to install.

from bw_jax.train.cli_errors import exit_with_error, exiting_within_grace
from bw_jax.train.config.files import apply_overrides, load_config_file
from bw_jax.train.runtime import configure_cpu_dispatch, skip_final_garbage_collection
from bw_jax.train.workdir import make_workdir
from bw_jax.sweep.compare import (RunSampler, check_compare_config, join_compare_record, machine_record,
                                  sweep_config)
from bw_jax.sweep.space import check_sweep_config, check_trial_schedules
from bw_jax.sweep.study import default_storage, load_study, open_study
from bw_jax.sweep.worker import Worker


def start_worker_process(directory: str) -> None:
  """JAX settings of a worker; the directory exists afterwards (WorkdirError in one line if it cannot)."""
  make_workdir(directory, '--dir')
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # A retried trial need not compile again.
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(directory), 'jax_cache'))
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # Our progress lines replace Optuna's.


def check_file_kind(config: ml_collections.ConfigDict, args: argparse.Namespace, kind: str) -> None:
  """Refuses a compare file given to `run` and a sweep file given to `compare run`, naming the command that
  takes it. `kind`: 'sweep' or 'compare', what the command takes."""
  if kind == 'sweep' and 'arms' in config and 'search_space' not in config:
    raise ValueError(f'{args.config} is a compare file (it names arms, not a search space): run it with '
                     f'python -m bw_jax.sweep compare run --config={args.config} --dir={args.dir}')
  if kind == 'compare' and 'search_space' in config and 'arms' not in config:
    raise ValueError(f'{args.config} is a sweep file (it has a search space, not arms): run it with '
                     f'python -m bw_jax.sweep run --config={args.config} --dir={args.dir}')


def run(args: argparse.Namespace) -> None:
  configure_cpu_dispatch()  # Before the checks below create the devices.
  sweep = load_config_file(args.config)
  check_file_kind(sweep, args, 'sweep')
  apply_overrides(sweep, args.overrides, 'sweep config')
  if args.n_trials is not None:
    sweep.n_trials = args.n_trials
  space = check_sweep_config(sweep)  # Before anything is created: a bad file leaves no trace.
  check_trial_schedules(sweep, space)  # Counts the data: missing data also fails here.
  start_worker_process(args.dir)
  storage = args.storage or default_storage(args.dir)
  study = open_study(sweep, space, storage)
  print(f"Sweep '{sweep.study_name}' in {storage}: budget {sweep.n_trials} trials; trial workdirs in "
        f"{os.path.join(os.path.abspath(args.dir), 'trials')}", flush=True)
  worker = Worker(sweep, space, os.path.abspath(args.dir), study, sweep.n_trials, storage)
  worker.run(lambda line: print(line, flush=True))


def run_compare(args: argparse.Namespace) -> None:
  configure_cpu_dispatch()  # Before the checks below create the devices.
  compare = load_config_file(args.config)
  check_file_kind(compare, args, 'compare')
  params = check_compare_config(compare)  # Before anything is created: a bad file leaves no trace.
  sweep = sweep_config(compare)
  space = check_sweep_config(sweep)
  start_worker_process(args.dir)
  storage = args.storage or default_storage(args.dir)
  study = open_study(sweep, space, storage)
  study.sampler = RunSampler(join_compare_record(study, compare))
  study.set_user_attr(*machine_record())
  print(f"Comparison '{sweep.study_name}' in {storage}: {len(params)} arms × {len(compare.seeds)} seeds = "
        f"{sweep.n_trials} runs; run workdirs in "
        f"{os.path.join(os.path.abspath(args.dir), 'trials')}", flush=True)
  worker = Worker(sweep, space, os.path.abspath(args.dir), study, sweep.n_trials, storage,
                  report_command='compare report')
  worker.run(lambda line: print(line, flush=True))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m bw_jax.sweep', description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--dir', required=True, help='Sweep directory: study.db (default storage), trials/.')
  common.add_argument('--debug', action='store_true', help='Show the traceback of a bad-input error '
                                                           '(also: BW_JAX_DEBUG=1).')
  common.add_argument('--storage', help='Optuna RDB URL (postgresql://user@host/db) or a journal file path; '
                                        'default: sqlite:///DIR/study.db.')
  run_parser = commands.add_parser('run', parents=[common], help='Train trials until the budget is spent.')
  run_parser.add_argument('--config', required=True, help='Sweep file, e.g. configs/sweeps/fashion_mnist.py.')
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
  compare_parser = commands.add_parser('compare', help='Every arm of a compare file with every seed, and '
                                                       'the statistics of the differences.')
  compare_commands = compare_parser.add_subparsers(dest='compare_command', required=True)
  compare_run = compare_commands.add_parser('run', parents=[common], help='Train the runs not yet trained.')
  compare_run.add_argument('--config', required=True, help='Compare file, e.g. configs/sweeps/compare_smoke.py.')
  compare_report = compare_commands.add_parser('report', parents=[common],
                                               help='runs.csv, arms.csv, differences.csv, summary.md, plots.')
  compare_report.add_argument('--study-name')
  compare_report.add_argument('--out', help='Report directory (default: DIR/report).')
  compare_report.add_argument('--target-accuracy', type=float,
                              help="Eval accuracy whose steps to reach are counted (default: the file's).")
  promote_parser.add_argument('--chance-margin', type=float,
                              help='Promote only trials whose eval accuracy is at least 1/classes + this '
                                   '(default: DEFAULT_CHANCE_MARGIN of bw_jax/sweep/promote.py).')
  args, extra = parser.parse_known_args(argv)
  # `run --config.KEY=VALUE …` overrides keys of the sweep file, e.g. --config.train.dataset.data_dir=/data.
  args.overrides = [a[len('--config.'):] for a in extra if a.startswith('--config.') and args.command == 'run']
  if len(args.overrides) != len(extra):
    parser.error(f"unrecognized arguments: {' '.join(extra)} (only run takes --config.KEY=VALUE overrides)")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  try:
    if args.command == 'run':
      run(args)
      return
    if args.command == 'compare' and args.compare_command == 'run':
      run_compare(args)
      return
    study = load_study(args.dir, args.storage, args.study_name)
    if args.command == 'compare':
      from bw_jax.sweep import compare_report  # Matplotlib, pandas and scipy: only for the report.
      out = args.out or os.path.join(args.dir, 'report')
      compare_report.write_report(study, out, args.target_accuracy)
      print(f'Report of {study.study_name!r} in {out}: summary.md, {", ".join(compare_report.FILES)}')
      return
    from bw_jax.sweep import promote, report  # Matplotlib and pandas: only for these commands.
    if args.command == 'report':
      out = args.out or os.path.join(args.dir, 'report')
      report.write_report(study, out)
      print(f'Report of {len(study.trials)} trials in {out}: results.csv, summary.md, '
            f'{", ".join(report.PLOTS)}')
    else:
      for line in promote.promote(study, args.top_k, args.base, args.out, args.workdir_root, args.chance_margin):
        print(line)
  except (ValueError, FileNotFoundError) as e:  # Bad input or missing data: one line, exit status 2.
    exit_with_error(e, argv)


if __name__ == '__main__':
  skip_final_garbage_collection()
  exiting_within_grace(main)
