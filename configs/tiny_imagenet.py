"""BW EfficientNet-B0 on Tiny ImageNet (200 classes, 64×64): the dataset of the hyper-parameter sweeps.

Prepare the data once (README.md, "Datasets"): `python -m bw_jax.data.tiny_imagenet --manual_dir DIR`.
At 64×64 the published stride-2 stem would leave a 2×2 final map; stride 1 keeps 4×4 (docs/design.md §3.4).

Runs as it is on any number of devices: 256 images per device (bfloat16; 64 px with a stride-1 stem has
the activations of 128 px at stride 2, a third of ImageNet's per image), so the global batch is 256 on
one GPU and 2048 on 8. The learning rate is per 256 images and scales linearly: peak 0.2 on one GPU,
1.6 on 8 (with 2 warm-up epochs); the sweeps tune it at 256. `--config.print_memory` prints the step's
memory before training.
"""

import ml_collections

from bw_jax.train.config import schema as config_schema
from bw_jax.data import default_dataset_config


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.get_config()
  config.dataset = default_dataset_config('tiny_imagenet')
  config.model.stem_type = 1
  config.model.mbconv_type = 2
  config.model.head_type = 1
  config.model.stem_stride = 1
  config.batch_size = None  # The global batch is set per device:
  config.batch_size_per_device = 256  # 256 × jax.device_count().
  config.num_epochs = 30.0  # The trial length of the PyTorch predecessor's Optuna studies.
  config.optimizer = 'nesterov'
  config.learning_rate = 0.2
  config.lr_schedule = 'cosine'
  # 2 of the 30 epochs, as a fraction of the run: a 10-epoch sweep trial warms up for the same share (0.67
  # epoch) instead of spending a fifth of itself below the peak rate.
  config.warmup_fraction = 2 / 30
  config.weight_decay = 5e-5
  config.label_smoothing = 0.1
  config.half_precision = True
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
