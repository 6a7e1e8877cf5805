"""The one list of sweep keys: every sweep file (`configs/sweep_*.py`) starts from this `get_config()`.

`python -m bw_jax.sweep run --config=configs/sweep_X.py --dir=DIR` trains one trial per draw from
`search_space` with `train` as the starting point; `bw_jax.sweep.check_sweep_config` rejects any key not
listed here and any search-space key that is not a training config key (`configs/base.py`).

A search-space spec is a tuple:
  ('categorical', (choice, ...))   choices: None, bool, int, float or str
  ('float', low, high)             uniform;  ('log_float', low, high): uniform in log(value)
  ('int', low, high)               inclusive; ('log_int', low, high): uniform in log(value)
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.study_name = 'sweep'  # Optuna study name: several sweeps can share one storage.
  config.train = base.get_config()  # Every trial's training config before its budget and sampled values.
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
