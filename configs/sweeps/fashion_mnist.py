"""Random search on Fashion-MNIST sized for a 2-core CPU (about half an hour with two workers).

  python -m bw_jax.sweep run --config=configs/sweeps/fashion_mnist.py --dir=/tmp/sweep_fashion_mnist

A quarter-width, quarter-depth EfficientNet with the published stride-2 stem (14×14 maps after it), 300
steps of 128 images a trial (0.64 epoch); 16 trials, one for each stem × MBConv × head combination
(`stratify`; MBConv 0 is the BatchNorm baseline), the other keys drawn at random. Its report is in
docs/sweep_fashion_mnist/.
"""

import ml_collections

from bw_jax.sweep.space import base_sweep_config

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = base_sweep_config()
  config.study_name = 'sweep_fashion_mnist'
  train = config.train = default.get_config()
  train.model.width_multiplier = 0.25
  train.model.depth_multiplier = 0.25
  train.model.stem_stride = 2
  train.batch_size = 128
  train.eval_batch_size = 1000
  train.warmup_epochs = 0.1
  train.log_every_steps = 50
  train.eval_every_steps = -1  # One eval, at the end (an epoch is 468 steps); the pruner needs more.
  train.checkpoint_every_steps = 100
  config.trial_budget.num_train_steps = 300
  config.search_space = ml_collections.ConfigDict({
      'model': {
          'stem_type': ('categorical', (1, 2)),
          'mbconv_type': ('categorical', (0, 1, 2, 3)),
          'head_type': ('categorical', (1, 2)),
          'dropout_rate': ('float', 0.0, 0.3),
          'bw': {
              'method': ('categorical', ('cholesky', 'zca', 'newton')),
              'group_size': ('categorical', (4, 8, 16)),
              'momentum': ('float', 0.9, 0.99),
              'epsilon': ('log_float', 1e-5, 1e-2),
              'center_with': ('categorical', ('batch', 'running')),
              'whiten_with': ('categorical', ('batch', 'running')),
          },
      },
      'learning_rate': ('log_float', 0.05, 0.8),
      'weight_decay': ('log_float', 1e-6, 1e-4),
      'label_smoothing': ('float', 0.0, 0.2),
      # Optimizers on one learning-rate scale: rmsprop_tf and adamw want rates about 10× lower (a sweep of their own).
      'optimizer': ('categorical', ('nesterov', 'sgd')),
  })
  config.stratify = ('model.stem_type', 'model.mbconv_type', 'model.head_type')
  config.n_trials = 16
  config.heartbeat_interval = 10
  config.grace_period = 60
  return config
