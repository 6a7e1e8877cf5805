"""The layer library: BatchWhitening (Linen, and NNX in `nnx`), its mathematics as pure functions, and its
CPU kernels.

Needs JAX and Flax only. Modules, bottom up: `dtypes` (accumulation precision), `sharding` (explicit
sharding), `spectral` (eigh and the inverse square root with finite derivatives), `matrices` (the four
whitening matrices with fallbacks), `kernels` and `group_products` (the per-group products in their layouts,
in C++ on the CPU), `statistics` (a training step's (μ, S) and running statistics from the batch moments),
`vjp` (the training forward pass and its closed-form backward pass), `whitening` (moments, the functional
API and the Linen module), `nnx` (the NNX module).
"""

from bw_jax.nn.whitening import BatchWhitening, BWSettings, batch_moments, whiten, whitening_matrix

__all__ = ['BatchWhitening', 'BWSettings', 'batch_moments', 'whiten', 'whitening_matrix']
