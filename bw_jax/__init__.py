"""Batch Whitening for JAX/Flax: the layer, EfficientNet with BW, sharded training and sweeps.

    from bw_jax import BatchWhitening, EfficientNet

The names below are imported on first use, so that `import bw_jax` stays cheap: the layer and the model
need JAX and Flax only (`pip install bw_jax`); `train_and_evaluate` needs the [train] extra. Subpackages,
each importing only the ones listed before it: `nn` (the layer library), `models` (EfficientNet), `data`
(input pipelines) and `train` (configs, the loop, checkpoints) with the [train] extra, `sweep` (random search
and comparisons) with the [sweep] extra; `extras` says which extra a missing package belongs to.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

# Public name -> the module that defines it.
_EXPORTS = {
    'BatchWhitening': 'bw_jax.nn.whitening',
    'BWSettings': 'bw_jax.nn.whitening',
    'batch_moments': 'bw_jax.nn.whitening',
    'whitening_matrix': 'bw_jax.nn.whitening',
    'whiten': 'bw_jax.nn.whitening',
    'DepthwiseConv': 'bw_jax.models.depthwise',
    'EfficientNet': 'bw_jax.models.efficientnet',
    'train_and_evaluate': 'bw_jax.train.loop',
}
__all__ = ['__version__', *_EXPORTS]

if TYPE_CHECKING:  # What type checkers and IDEs see; at run time `__getattr__` imports on demand.
  from bw_jax.models.depthwise import DepthwiseConv
  from bw_jax.models.efficientnet import EfficientNet
  from bw_jax.train.loop import train_and_evaluate
  from bw_jax.nn.whitening import BatchWhitening, BWSettings, batch_moments, whiten, whitening_matrix


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'bw_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # Later look-ups skip this function.
  return value


def __dir__() -> list[str]:
  return sorted(__all__)
