"""The main job: BW EfficientNet on Fashion-MNIST, sized for a 2-core CPU (`make train`)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.stem_type = 2
  config.model.mbconv_type = 2
  config.model.head_type = 2
  config.model.stem_stride = 1  # 28×28 inputs: keep the resolution the published stride 2 would halve.
  config.model.width_multiplier = 0.5
  config.model.depth_multiplier = 0.5
  config.model.dropout_rate = 0.1
  config.model.drop_connect_rate = 0.1
  config.batch_size = 128
  config.num_epochs = 3.0
  config.learning_rate = 0.2
  config.warmup_epochs = 0.5
  config.log_every_steps = 50
  config.eval_batch_size = 1000
  config.checkpoint_every_steps = 500
  return config
