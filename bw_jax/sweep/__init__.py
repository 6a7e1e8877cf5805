"""Hyper-parameter search and comparisons over many workers (`python -m bw_jax.sweep`).

One module per concern:
  space.py    the sweep file's keys, the search space, checks, a trial's training config
  study.py    the Optuna study and its storage (SQLite, PostgreSQL, journal), budget slots, sampler, pruner
  worker.py   a worker process: pulls trials, trains them, retries dead workers' trials
  report.py   results.csv, summary.md and plots of a finished sweep
  promote.py  ready-to-run configs for the winning block-type combinations
  compare.py  a compare file (arms × seeds) as a sweep whose budget slot k trains run k
  compare_stats.py   t intervals, paired t-tests, Holm's correction, steps to a target accuracy
  compare_report.py  runs.csv, arms.csv, differences.csv, summary.md with its conclusion, and plots
  __main__.py the command line

None of them is imported here, so that `python -m bw_jax.sweep` loads each module once; this only checks that
the [sweep] extra's packages are installed (`bw_jax.extras`).
"""

from bw_jax.extras import require

require('bw_jax.sweep', 'sweep',
        ('matplotlib', 'ml_collections', 'optuna', 'pandas', 'scipy', 'sklearn', 'sqlalchemy'))
