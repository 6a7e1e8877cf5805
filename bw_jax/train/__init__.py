"""The training system: the config key table and validation (`config/`), the run's plan (`plan`), its compiled
programs (`programs`), the sharded loop (`loop`), checkpoints, and the command line's error handling.
`train_and_evaluate` is imported on first use, so that reading a config does not load the input pipeline.
Needs the [train] extra: this checks, when the package is first imported, the packages its modules import;
TensorFlow and clu are imported when data is first read and metrics first written (`bw_jax.extras`), so a train
step (`step.py`) runs without them."""

import importlib
from typing import Any

from bw_jax.extras import require

require('bw_jax.train', 'train', ('absl', 'ml_collections', 'optax', 'orbax.checkpoint'))


def __getattr__(name: str) -> Any:
  if name != 'train_and_evaluate':
    raise AttributeError(f"module 'bw_jax.train' has no attribute {name!r}")
  return importlib.import_module('bw_jax.train.loop').train_and_evaluate
