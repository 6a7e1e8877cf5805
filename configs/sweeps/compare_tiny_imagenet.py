"""Does BW beat BN on Tiny ImageNet? The arms of compare_fashion_mnist.py on EfficientNet-B0 at 64×64
(configs/tiny_imagenet.py: stride-1 stem, bfloat16), 8 seeds, 30 epochs a run, for GPU/TPU workers.

  python -m bw_jax.sweep compare run --config=configs/sweeps/compare_tiny_imagenet_lr.py --dir=DIR_LR \\
      --storage=postgresql://USER@HOST/DB_LR          # the learning-rate pilot first, on every worker
  python -m bw_jax.sweep compare report --dir=DIR_LR --storage=…   # copy its choice into LEARNING_RATES
  python -m bw_jax.sweep compare run --config=configs/sweeps/compare_tiny_imagenet.py --dir=DIR \\
      --storage=postgresql://USER@HOST/DB             # on every worker; DIR on a shared file system
  python -m bw_jax.sweep compare report --dir=DIR --storage=… --out=docs/compare_tiny_imagenet

Arms: those of compare_fashion_mnist.py (the same labels and block types), on a base with the Fashion-MNIST
main job's BW settings (groups of 4, ε = 0.1), so that `bw_g16` is again the library's defaults.
Seeds: 8. With a paired seed-to-seed spread of ~0.4 percentage points (a guess: not measured here), 8 pairs
detect a 0.5 pp difference with ~80 % power at the 0.05 level.
Learning rates: as on Fashion-MNIST, the best of LEARNING_RATE_GRID per arm in compare_tiny_imagenet_lr.py
(one seed outside SEEDS, this budget); the provisional values are configs/tiny_imagenet.py's 0.2 for all.

Expected cost (assumptions, none measured here): B0 with BN at 224 px trains at ~2,500 images/s on one A100
in bfloat16; 64 px with a stride-1 stem has the feature maps of 128 px, ~3× fewer FLOPs, say ~6,000
images/s; BW arms at half the BN speed. A run is 30 epochs × 100,000 images = 3 M images: ~0.15 A100-hour
for `bn`, ~0.3 for each BW arm (+ ~10 % evals). Study: 8 seeds × (0.15 + 6 × 0.3) ≈ 16 A100-hours; the pilot
(7 arms × 4 rates) ≈ 8 more. An H100 is roughly 1.5–2× faster.
"""

import ml_collections

from bw_jax.sweep.compare import base_compare_config

from configs import tiny_imagenet
from configs.sweeps.compare_fashion_mnist import ARMS

LEARNING_RATE_GRID = (0.1, 0.2, 0.4, 0.8)  # Per 256 images.
LEARNING_RATES = {label: 0.2 for label in ARMS}  # Provisional: replace with the pilot's choice.
SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
PILOT_SEED = 100


def study_config(study_name: str) -> ml_collections.ConfigDict:
  config = base_compare_config()
  config.study_name = study_name
  train = config.train = tiny_imagenet.get_config()
  train.model.bw.group_size = 4
  train.model.bw.epsilon = 0.1
  config.trial_budget.num_epochs = 30.0
  config.target_accuracy = 0.5
  config.heartbeat_interval = 60
  config.grace_period = 600
  return config


def get_config() -> ml_collections.ConfigDict:
  config = study_config('compare_tiny_imagenet')
  config.arms = tuple(f'{label}: {overrides}, learning_rate={LEARNING_RATES[label]}'
                      for label, overrides in ARMS.items())
  config.baseline = 'bn'
  config.seeds = SEEDS
  return config
