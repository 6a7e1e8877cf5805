"""A comparison of two arms × two seeds of the smoke model, 4 steps a run: the end-to-end test of
`python -m bw_jax.sweep compare` (tests/test_compare.py).

Both arms are BatchNorm everywhere and differ in a data key only, so that every run compiles the same
programs (JAX's persistent cache) and a run costs seconds; the real comparisons are compare_fashion_mnist.py,
compare_tiny_imagenet.py and compare_imagenet.py.
"""

import ml_collections

from bw_jax.sweep.compare import base_compare_config

from configs import smoke


def get_config() -> ml_collections.ConfigDict:
  config = base_compare_config()
  config.study_name = 'compare_smoke'
  config.train = smoke.get_config()
  config.train.model.stem_type, config.train.model.mbconv_type, config.train.model.head_type = 1, 0, 1
  config.train.eval_every_steps = 2  # Two evals a run: the learning curves have two points.
  config.train.checkpoint_every_steps = 2
  config.trial_budget.num_train_steps = 4
  config.arms = ('plain: dataset.augment.flip=False', 'flip: dataset.augment.flip=True')
  config.seeds = (0, 1)
  config.target_accuracy = 0.2
  config.heartbeat_interval = 1
  config.grace_period = 8
  return config
