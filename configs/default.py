"""The main job: BW EfficientNet on Fashion-MNIST, sized for `make train` on a 2-core CPU (≤ 15 minutes).

BW sits in the MBConv blocks (type 2: depthwise → BN) and the head; the stem keeps conv → BN because a
1-channel image gives stem type 2 a single 3×3 filter to see it through (its BW would whiten one channel).
Tuned on this machine (README.md, "Training"): groups of 4 channels and ε = 0.1 trained faster than the
16-channel groups and ε = 1e-3 of bw_jax/train/config/schema.py, which amplify near-null directions of the covariance
(condition numbers ~1e8); the short run underfits, so dropout, stochastic depth and crops are off.
"""

import ml_collections

from bw_jax.train.config import schema as config_schema


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.get_config()
  config.model.stem_type = 1
  config.model.mbconv_type = 2
  config.model.head_type = 2
  config.model.stem_stride = 2  # 28×28 → 14×14 after the stem: half the cost of stride 1.
  config.model.width_multiplier = 0.5
  config.model.depth_multiplier = 0.5
  config.model.dropout_rate = 0.0
  config.model.drop_connect_rate = 0.0
  config.model.bw.group_size = 4
  config.model.bw.epsilon = 0.1
  config.dataset.augment.random_crop = False
  config.batch_size = 128
  config.num_epochs = 7.0
  config.learning_rate = 0.2  # Peak 0.1 at batch 128; 0.4 trained slower in 400-step trials.
  config.warmup_epochs = 0.5
  config.log_every_steps = 100
  config.eval_batch_size = 1000
  config.checkpoint_every_steps = 500
  return config
