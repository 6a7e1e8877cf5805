"""The random search of the brief: BW EfficientNet-B0 on Tiny ImageNet, winners promoted to ImageNet.

  python -m bw_jax.sweep run --config=configs/sweeps/tiny_imagenet.py --dir=DIR \
      --storage=postgresql://USER@HOST/DB        # on every worker machine; DIR on a shared file system
  python -m bw_jax.sweep report --dir=DIR --storage=…
  python -m bw_jax.sweep promote --dir=DIR --storage=… --top-k=3 --base=configs/imagenet.py --out=runs/promoted

Each trial trains `configs/tiny_imagenet.py` for 10 epochs (a third of its schedule) with median pruning on
the per-epoch eval; 96 trials cover the 16 stem × MBConv × head combinations six times each (`stratify`;
MBConv 0 is the BatchNorm baseline) with the other keys drawn at random.
"""

import ml_collections

from bw_jax.sweep.space import base_sweep_config

from configs import tiny_imagenet


def get_config() -> ml_collections.ConfigDict:
  config = base_sweep_config()
  config.study_name = 'sweep_tiny_imagenet'
  config.train = tiny_imagenet.get_config()
  config.trial_budget.num_epochs = 10.0
  config.search_space = ml_collections.ConfigDict({
      'model': {
          'stem_type': ('categorical', (1, 2)),
          'mbconv_type': ('categorical', (0, 1, 2, 3)),
          'head_type': ('categorical', (1, 2)),
          'dropout_rate': ('float', 0.0, 0.4),
          'bw': {
              'method': ('categorical', ('cholesky', 'zca', 'pca', 'newton')),
              'group_size': ('categorical', (8, 16, 32, 64)),
              'momentum': ('float', 0.9, 0.999),
              'epsilon': ('log_float', 1e-5, 1e-2),
              'center_with': ('categorical', ('batch', 'running')),
              'whiten_with': ('categorical', ('batch', 'running')),
          },
      },
      'learning_rate': ('log_float', 0.02, 0.8),  # Per 256 images: peak 0.02–0.8 at batch_size 256.
      'weight_decay': ('log_float', 1e-6, 1e-4),
      'label_smoothing': ('float', 0.0, 0.2),
      # Optimizers on one learning-rate scale: rmsprop_tf (EfficientNet's 0.016) and adamw want rates about
      # 10× lower, which one range cannot serve; sweep them in a study of their own.
      'optimizer': ('categorical', ('nesterov', 'sgd')),
  })
  config.stratify = ('model.stem_type', 'model.mbconv_type', 'model.head_type')
  config.n_trials = 96
  config.pruner = 'median'
  config.pruner_startup_trials = 16  # One trial of every block combination before anything is pruned.
  config.pruner_warmup_steps = 1000  # About three epochs of 391 steps: early evals are noise.
  config.heartbeat_interval = 60
  config.grace_period = 300
  return config
