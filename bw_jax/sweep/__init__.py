"""Hyper-parameter search and comparisons over many workers (`python -m bw_jax.sweep`).

One module per concern:
  space.py    the sweep file's keys, the search space, checks, a trial's training config
  study.py    the Optuna study and its storage (SQLite, PostgreSQL, journal), budget slots, sampler, pruner
  worker.py   a worker process: pulls trials, trains them, retries dead workers' trials
  report.py   results.csv, summary.md and plots of a finished sweep
  promote.py  ready-to-run configs for the winning block-type combinations
  __main__.py the command line

Nothing is imported here, so that `python -m bw_jax.sweep` loads each module once.
"""
