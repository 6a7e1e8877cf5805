"""The learning-rate pilot of compare_fashion_mnist.py: every arm with every rate of its LEARNING_RATE_GRID on
one seed (PILOT_SEED, not one of the study's), with the study's budget: 7 arms × 4 rates = 28 runs, ≈ 50
minutes with two workers on a quiet 2-core machine (the estimate of compare_fashion_mnist.py).

  python -m bw_jax.sweep compare run --config=configs/sweeps/compare_fashion_mnist_lr.py --dir=runs/compare_fashion_mnist_lr
      (twice: two workers)
  python -m bw_jax.sweep compare report --dir=runs/compare_fashion_mnist_lr --out=docs/compare_fashion_mnist_lr

The report's "Best variant per arm" table names each arm's rate (labels `arm@rate`); copy those into
LEARNING_RATES of compare_fashion_mnist.py. One seed per rate cannot separate rates within seed noise of each
other; it does choose the same way for every arm, and the study's own seeds then measure the arms.
"""

import ml_collections

from bw_jax.sweep.compare import learning_rate_pilot

from configs.sweeps import compare_fashion_mnist as study


def get_config() -> ml_collections.ConfigDict:
  return learning_rate_pilot(study.study_config('compare_fashion_mnist'), study.ARMS, study.LEARNING_RATE_GRID,
                             study.PILOT_SEED, 'bn')
