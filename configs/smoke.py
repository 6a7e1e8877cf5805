"""A tiny BW model for a few steps: the end-to-end test of the training loop (seconds on a CPU)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.width_multiplier = 0.25
  config.model.depth_multiplier = 0.1
  config.model.stem_stride = 2
  config.model.bw.group_size = 4
  config.dataset.shuffle_buffer = 1024
  config.batch_size = 16
  # Eval on the first 2,000 test images (a TFDS-style slice), in 2 batches: the whole split would cost every
  # smoke run (tests start ~50) ~1.2 s more.
  config.dataset.eval_split = 'test[:2000]'
  config.eval_batch_size = 1000
  config.num_train_steps = 6
  config.warmup_epochs = 0.0
  # A schedule that does not depend on num_train_steps, so that a run stopped at step 3 and resumed with
  # --config.num_train_steps=6 must end with the same parameters as a run of 6 steps (tests/test_train.py).
  config.lr_schedule = 'exponential'
  config.decay_epochs = 0.001  # 4 steps of 16 images.
  config.decay_rate = 0.5
  config.learning_rate = 0.05
  config.log_every_steps = 2
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 3
  config.keep_checkpoints = 2
  return config
