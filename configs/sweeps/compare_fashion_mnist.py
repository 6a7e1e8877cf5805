"""Does Batch Whitening beat BatchNorm? Seven arms × five seeds on Fashion-MNIST, sized for a 2-core CPU.

  python -m bw_jax.sweep compare run --config=configs/sweeps/compare_fashion_mnist.py --dir=runs/compare_fashion_mnist
      (twice, in two shells or with `&`: two workers share the study; start it again to finish a killed one)
  python -m bw_jax.sweep compare report --dir=runs/compare_fashion_mnist --out=docs/compare_fashion_mnist

Every arm is the main job's model (configs/default.py: EfficientNet-B0 at half width and depth, stride-2 stem,
no dropout, stochastic depth or crops) with the block types and BW settings below (stem / MBConv / head,
bw_jax/models/efficientnet.py; MBConv 0 and head 1 are BatchNorm):
  bn         1 / 0 / 1  BatchNorm everywhere: the baseline.
  bw         1 / 2 / 2  the main job: BW in the MBConv blocks and the head, groups of 4 channels, ε = 0.1.
  bw_head1   1 / 2 / 1  the main job's MBConv placement with the plain head.
  bw_mbconv1 1 / 1 / 2  MBConv placement 1.
  bw_mbconv3 1 / 3 / 2  MBConv placement 3.
  bw_stem2   2 / 2 / 2  BW in the stem too.
  bw_g16     1 / 2 / 2  with the library's defaults, groups of 16 and ε = 1e-3, to show what g and ε do.

Learning rate, chosen the same way for every arm (BN included): the best final eval accuracy among
LEARNING_RATE_GRID in the pilot `compare_fashion_mnist_lr.py`, which runs every arm with every rate on one
seed that is not one of SEEDS (so the choice does not fit the study's own noise) with this file's budget.
LEARNING_RATES below holds the rates the pilot chose (its report: docs/compare_fashion_mnist_lr/); rerun
the pilot and copy its choice here whenever the model or the budget changes.

Budget per run: 600 steps of 128 images (1.28 epochs; the main job trains 7), cosine schedule, an eval of the
10,000 test images every 100 steps (the learning curves). At this length the result is about early training:
if the curves show eval accuracy still climbing steeply at the end, the ranking may change with more steps.
Cost, estimated from CPU time measured on a shared 2-core machine (2026-11-27, load ~6× the cores, so
approximate): 0.22–0.24 CPU-seconds per step for every arm (bn 0.22, bw 0.24, bw_g16 0.23, bw_mbconv3 0.22,
bw_stem2 0.23), 40–60 CPU-seconds of data loading and compilation and ~3.6 per eval, so ~220 CPU-seconds a
run; 35 runs ≈ 7,600 CPU-seconds ≈ 65 minutes with two workers on a quiet 2-core machine. Measured
2026-11-27 on this project's 2-core VM (AMD EPYC, 24 GB), two workers, nothing else heavy running: 64 min 47 s
wall for the 35 runs (2:06:55 of training over both workers; docs/compare_fashion_mnist/). The pilot (28
runs) took 1 h 23 min with a test suite sharing the machine.
"""

import ml_collections

from bw_jax.sweep.compare import base_compare_config

from configs import default

# Label → overrides of configs/default.py, without the learning rate (the pilot adds its grid).
ARMS = {
    'bn': 'model.stem_type=1, model.mbconv_type=0, model.head_type=1',
    'bw': 'model.stem_type=1, model.mbconv_type=2, model.head_type=2',
    'bw_head1': 'model.stem_type=1, model.mbconv_type=2, model.head_type=1',
    'bw_mbconv1': 'model.stem_type=1, model.mbconv_type=1, model.head_type=2',
    'bw_mbconv3': 'model.stem_type=1, model.mbconv_type=3, model.head_type=2',
    'bw_stem2': 'model.stem_type=2, model.mbconv_type=2, model.head_type=2',
    'bw_g16': 'model.stem_type=1, model.mbconv_type=2, model.head_type=2, model.bw.group_size=16, '
              'model.bw.epsilon=0.001',
}
LEARNING_RATE_GRID = (0.1, 0.2, 0.4, 0.8)  # Per 256 images (peak rate × 256 / 128 here), factors of 2.
# The pilot's choice (docs/compare_fashion_mnist_lr/summary.md, "Best variant per arm"; 2026-11-27).
LEARNING_RATES = {'bn': 0.2, 'bw': 0.2, 'bw_head1': 0.4, 'bw_mbconv1': 0.2, 'bw_mbconv3': 0.1, 'bw_stem2': 0.1,
                  'bw_g16': 0.2}
SEEDS = (0, 1, 2, 3, 4)
PILOT_SEED = 100


def study_config(study_name: str) -> ml_collections.ConfigDict:
  """Everything but the arms and seeds, shared with the pilot: the model, the budget, the evals."""
  config = base_compare_config()
  config.study_name = study_name
  train = config.train = default.get_config()
  train.warmup_epochs = 0.1  # 47 steps: a short run should not spend a third of itself warming up.
  train.eval_every_steps = 100
  train.log_every_steps = 100
  train.checkpoint_every_steps = 200  # A killed worker's run resumes from here.
  config.trial_budget.num_train_steps = 600
  config.target_accuracy = 0.85
  config.heartbeat_interval = 10
  config.grace_period = 60
  return config


def get_config() -> ml_collections.ConfigDict:
  config = study_config('compare_fashion_mnist')
  config.arms = tuple(f'{label}: {overrides}, learning_rate={LEARNING_RATES[label]}'
                      for label, overrides in ARMS.items())
  config.baseline = 'bn'
  config.seeds = SEEDS
  return config
