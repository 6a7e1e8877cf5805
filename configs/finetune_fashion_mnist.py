"""Fine-tuning: the main job's BW network (`default.py`) started from a trained BatchNorm run.

    .venv/bin/python -m bw_jax.main --config=configs/fashion_mnist_bn.py --workdir=runs/fashion_mnist_bn
    .venv/bin/python -m bw_jax.main --config=configs/finetune_fashion_mnist.py --workdir=runs/finetune

The BN run's network is converted to BW in the MBConv blocks (type 2) and the head (bw_jax/models/convert.py),
its BN and BW statistics calibrated on 20 training batches, then trained for one epoch at a tenth of the main
job's learning rate. `make finetune-demo` runs these steps and tabulates them (docs/design.md §3.5).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.init_from = 'runs/fashion_mnist_bn'
  config.init_calibration_batches = 20
  config.num_epochs = 1.0
  config.learning_rate = 0.02  # A tenth of the main job's: the network is trained already.
  config.warmup_epochs = 0.1
  return config
