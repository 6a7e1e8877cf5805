"""The layer library: BatchWhitening (Linen), its mathematics as pure functions, and its CPU kernels.

Needs JAX and Flax only. Modules, bottom up: `dtypes` (accumulation precision), `spectral` (eigh and the
inverse square root with finite derivatives), `matrices` (the four whitening matrices with fallbacks),
`group_products` and `kernels` (the per-group products, in C++ on the CPU), `vjp` (the closed-form backward
pass), `whitening` (moments, the functional API and the module).
"""

from bw_jax.nn.whitening import BatchWhitening, BWSettings, batch_moments, whiten, whitening_matrix

__all__ = ['BatchWhitening', 'BWSettings', 'batch_moments', 'whiten', 'whitening_matrix']
