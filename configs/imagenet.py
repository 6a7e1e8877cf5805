"""EfficientNet-B0 on ImageNet with the published recipe (Tan & Le 2019; TF `efficientnet` main.py defaults).

Batch whitening is off here (the BN original): set `--config.model.stem_type/mbconv_type/head_type` (or
use a config written by `python -m bw_jax.sweep promote`) to place BW layers. Needs the ImageNet download
prepared as README.md says, and accelerators: 350 epochs of 1.28 M images. `--config.model.variant=b3`
trains B3 at its published 300×300 (the image size follows the variant unless set).

Runs as it is on any number of devices: 128 images per device (bfloat16 activations at 224 px), so the
global batch is 128 on one GPU, 1024 on 8, and the published 2048 on 16 TPU cores. The learning rate is
per 256 images and scales linearly with the global batch: peak 0.008 on one GPU, 0.064 on 8, 0.128 at
2048 (Goyal et al. 2017's rule, with the recipe's 5 warm-up epochs). Memory: XLA's CPU analysis of
this train step at 128 per device (`--config.print_memory`) estimates a peak of 13.3 GiB for BN (1/0/1)
and 10.5 GiB for BW 2/2/2, well inside a 40–80 GB GPU; check yours with `--config.print_memory` before
a long run, and lower `--config.batch_size_per_device` if it does not fit.
"""

import ml_collections

from bw_jax.train.config import schema as config_schema
from bw_jax.data import default_dataset_config
from bw_jax.models.efficientnet import published_resolution


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.get_config()
  config.dataset = default_dataset_config('imagenet2012')  # Inception crop; eval: centre crop.
  # The variant's published size (B0 224 … B7 600), also after --config.model.variant=b3: a lazy reference
  # (ml_collections' FieldReference op); an explicit --config.dataset.image_size=S replaces it.
  config.dataset.image_size = config.model.get_ref('variant')._apply_op(published_resolution).to_int()
  config.model.stem_stride = 2
  config.batch_size = None  # The global batch is set per device:
  config.batch_size_per_device = 128  # 128 × jax.device_count().
  config.num_epochs = 350.0
  config.optimizer = 'rmsprop_tf'  # decay 0.9, ε 1e-3 inside the root, squared average starting at 1.
  config.momentum = 0.9
  config.learning_rate = 0.016  # Per 256 images: 0.128 at batch 2048 (16 devices), 0.008 on one.
  config.lr_schedule = 'exponential'
  config.warmup_epochs = 5.0
  config.decay_rate = 0.97
  config.decay_epochs = 2.4
  config.weight_decay = 1e-5  # Conv and dense kernels only.
  config.label_smoothing = 0.1
  config.ema_decay = 0.9999
  config.half_precision = True
  config.log_every_steps = 100
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  return config
