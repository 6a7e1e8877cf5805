"""Flax NNX layers: `from bw_jax.nnx import BatchWhitening`, a drop-in for `flax.nnx.BatchNorm`."""

from bw_jax.nn.nnx import BatchWhitening, BWHealth

__all__ = ['BatchWhitening', 'BWHealth']
