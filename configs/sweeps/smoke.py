"""A 6-trial sweep of the smoke model, 4 steps a trial: the end-to-end test of `bw_jax.sweep` (tests/).

The search space holds only data keys, which leave the compiled programs unchanged: every trial reuses one
XLA compilation (JAX's persistent cache), so a trial costs seconds; BatchNorm everywhere traces faster than
BW. The model and optimizer keys are exercised by the unit tests and the real sweeps (fashion_mnist.py,
tiny_imagenet.py).
"""

import ml_collections

from bw_jax.sweep.space import base_sweep_config

from configs import smoke


def get_config() -> ml_collections.ConfigDict:
  config = base_sweep_config()
  config.study_name = 'sweep_smoke'
  config.train = smoke.get_config()
  config.train.model.stem_type, config.train.model.mbconv_type, config.train.model.head_type = 1, 0, 1
  config.train.checkpoint_every_steps = 2  # A worker killed mid-trial leaves a checkpoint to resume from.
  config.trial_budget.num_train_steps = 4
  config.search_space = ml_collections.ConfigDict({
      'dataset': {
          'shuffle_buffer': ('int', 64, 4096),
          'augment': {'flip': ('categorical', (True, False)), 'crop_padding': ('int', 0, 4)},
      },
  })
  config.n_trials = 6
  config.heartbeat_interval = 1
  config.grace_period = 8  # Seconds without a heartbeat before a trial counts as dead: the tests wait that long.
  return config
