"""Does BW beat BN on ImageNet? The arms of compare_fashion_mnist.py on EfficientNet-B0 at 224×224
(configs/imagenet.py: RMSProp, EMA, bfloat16), 3 seeds, 90 epochs a run with a cosine schedule.

  python -m bw_jax.sweep compare run --config=configs/sweeps/compare_imagenet.py --dir=DIR \\
      --storage=postgresql://USER@HOST/DB             # on every worker (one per host or slice); DIR shared
  python -m bw_jax.sweep compare report --dir=DIR --storage=… --out=docs/compare_imagenet

Budget: 90 epochs instead of the published 350 (a quarter of the cost; every arm gets the same), with the
cosine schedule so that each run anneals to 0 within its budget (the published staircase would still be at
a third of its peak rate after 90 epochs).
Seeds: 3. ImageNet top-1 of one recipe varies by ~0.1–0.2 percentage points between seeds, so 3 pairs
resolve differences of a few tenths of a point, not less.
Learning rates: a pilot at this scale is too dear. Each arm gets the recipe's rate (0.016 per 256 images,
tuned by the EfficientNet authors for BN) times the ratio of its Tiny ImageNet pilot rate to `bn`'s
(compare_tiny_imagenet_lr.py): the same rule for every arm. Provisional: 0.016 for all.

Expected cost (assumptions, none measured here): B0 with BN trains at ~2,500 images/s per A100 in bfloat16
(~4,000 per H100); BW arms at half that. A run is 90 × 1.28 M = 115 M images: ~13 A100-hours for `bn`, ~26
for each BW arm. Study: 3 seeds × (13 + 6 × 26) ≈ 510 A100-hours (≈ 320 H100-hours; ≈ 64 hours on 8 A100s).
"""

import ml_collections

from bw_jax.sweep.compare import base_compare_config

from configs import imagenet
from configs.sweeps.compare_fashion_mnist import ARMS

LEARNING_RATES = {label: 0.016 for label in ARMS}  # Provisional: recipe rate × the Tiny ImageNet ratio.
SEEDS = (0, 1, 2)


def get_config() -> ml_collections.ConfigDict:
  config = base_compare_config()
  config.study_name = 'compare_imagenet'
  train = config.train = imagenet.get_config()
  train.model.bw.group_size = 4  # The Fashion-MNIST main job's BW, so that `bw_g16` is the library's default.
  train.model.bw.epsilon = 0.1
  train.lr_schedule = 'cosine'
  config.trial_budget.num_epochs = 90.0
  config.target_accuracy = 0.7
  config.heartbeat_interval = 60
  config.grace_period = 1800  # A multi-host run may stall for minutes in a checkpoint.
  config.arms = tuple(f'{label}: {overrides}, learning_rate={LEARNING_RATES[label]}'
                      for label, overrides in ARMS.items())
  config.baseline = 'bn'
  config.seeds = SEEDS
  return config
