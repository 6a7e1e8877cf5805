"""The learning-rate pilot of compare_tiny_imagenet.py: every arm with every rate of its LEARNING_RATE_GRID on
one seed outside its SEEDS, 30 epochs a run: 28 runs, ≈ 8 A100-hours (the study's assumptions). Commands in
compare_tiny_imagenet.py; copy the report's "Best variant per arm" into its LEARNING_RATES.
"""

import ml_collections

from bw_jax.sweep.compare import learning_rate_pilot

from configs.sweeps import compare_tiny_imagenet as study


def get_config() -> ml_collections.ConfigDict:
  return learning_rate_pilot(study.study_config('compare_tiny_imagenet'), study.ARMS, study.LEARNING_RATE_GRID,
                             study.PILOT_SEED, 'bn')
