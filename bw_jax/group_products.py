"""Products of (m, C) activations with per-group (G, g, g) matrices, in the layout that is fastest for the shape.

BatchWhitening spends its arithmetic in two kinds of product over the m samples of each group of g channels:
the cross products aᵀb (covariance, gradient of S) and the transforms a Mᵀ (y = S x, dx = Sᵀ dy + …). The same
product can be laid out in ways with very different speed on different shapes:

  dense    one (m, C) × (C, C) GEMM with the block-diagonal matrix: G× the arithmetic, but one large GEMM
           that needs no transpose of the activations;
  batched  G GEMMs of (m, g) × (g, g) on a (G, m, g) transposed copy of the activations (XLA computes the
           transposed copy of the shifted samples once and shares it between the products that read it);
  fused    in place on (m, G, g): broadcast multiply and reduce over the g inputs in one loop fusion.
           Fast alone, but inside the layer XLA duplicates each operand's elementwise producers into the
           (m, G, g, g) loop, 7–15× slower than `batched` for the whole layer (BENCHMARKS.md); kept for the
           layout benchmark only.

`product_layout` picks one from the measurements of `benchmarks/bw_layout.py` (BENCHMARKS.md records the
table); `jax.lax.platform_dependent` applies the CPU choice on a CPU and the accelerator choice elsewhere.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LAYOUTS = ('dense', 'batched', 'fused')

# CPU cost model from benchmarks/bw_layout.py (BENCHMARKS.md, "Group product layouts"): the dense GEMM wins
# while its G-fold extra arithmetic is small (C ≤ 64); above, the batched GEMMs do.
DENSE_MAX_CHANNELS = 64
# On GPU/TPU these products are memory-bound: a dense GEMM of arithmetic intensity ~C flops per byte stays
# under the roofline ridge (~300 on an H100 in bf16) up to a few hundred channels and reads the activations
# once without transposes. Not yet measured on a device (no accelerator was lent); see BENCHMARKS.md.
ACCELERATOR_DENSE_MAX_CHANNELS = 256


def cpu_layout(channels: int) -> str:
  return 'dense' if channels <= DENSE_MAX_CHANNELS else 'batched'


def accelerator_layout(channels: int) -> str:
  return 'dense' if channels <= ACCELERATOR_DENSE_MAX_CHANNELS else 'batched'


def _per_platform(channels: int, layout: str | None, compute, *args):
  """compute(layout, *args) with the layout chosen per platform at lowering (or `layout` if given)."""
  if layout is not None:
    return compute(layout, *args)
  cpu, accelerator = cpu_layout(channels), accelerator_layout(channels)
  if cpu == accelerator:
    return compute(cpu, *args)
  return jax.lax.platform_dependent(*args, cpu=lambda *a: compute(cpu, *a),
                                    default=lambda *a: compute(accelerator, *a))


def _block_diagonal(matrices: jax.Array) -> jax.Array:
  """(G, g, g) -> (G·g, G·g) with the matrices on the diagonal."""
  groups, g, _ = matrices.shape
  return jnp.einsum('gij,gh->gihj', matrices, jnp.eye(groups, dtype=matrices.dtype)).reshape(groups * g, -1)


def _group_major(a: jax.Array, groups: int) -> jax.Array:
  """(m, C) -> (G, m, g): each group's samples contiguous, for a batched GEMM."""
  return a.reshape(a.shape[0], groups, -1).transpose(1, 0, 2)


def _cross(layout: str, a: jax.Array, b: jax.Array, groups: int, accumulate) -> jax.Array:
  m, channels = a.shape
  g = channels // groups
  if layout == 'dense':
    full = jnp.matmul(a.T, b, preferred_element_type=accumulate).reshape(groups, g, groups, g)
    return full[jnp.arange(groups), :, jnp.arange(groups), :]
  if layout == 'batched':
    return jnp.einsum('gmi,gmj->gij', _group_major(a, groups), _group_major(b, groups),
                      preferred_element_type=accumulate)
  a, b = (v.reshape(m, groups, g).astype(accumulate) for v in (a, b))
  return jnp.sum(a[..., :, None] * b[..., None, :], axis=0)


def group_cross(a: jax.Array, b: jax.Array, groups: int, *, accumulate=jnp.float32,
                layout: str | None = None) -> jax.Array:
  """Per-group a_gᵀ b_g: (m, C), (m, C) -> (G, g, g), summed in `accumulate` (operands in their dtype)."""
  return _per_platform(a.shape[1], layout, lambda lay, a, b: _cross(lay, a, b, groups, accumulate), a, b)


def _sums(layout: str, a: jax.Array, groups: int, accumulate) -> jax.Array:
  if layout == 'batched':  # from the transposed copy the products read anyway
    return jnp.sum(_group_major(a, groups), axis=1, dtype=accumulate)
  return jnp.sum(a, axis=0, dtype=accumulate).reshape(groups, -1)


def group_sums(a: jax.Array, groups: int, *, accumulate=jnp.float32, layout: str | None = None) -> jax.Array:
  """Σ_i a_i per group: (m, C) -> (G, g), summed in `accumulate`."""
  return _per_platform(a.shape[1], layout, lambda lay, a: _sums(lay, a, groups, accumulate), a)


def _transform(layout: str, terms: Sequence[tuple[jax.Array, jax.Array]]) -> jax.Array:
  m, channels = terms[0][0].shape
  groups, g, _ = terms[0][1].shape
  if layout == 'dense':
    return sum(a.astype(mat.dtype) @ _block_diagonal(mat).T for a, mat in terms)
  if layout == 'batched':
    y = sum(jnp.einsum('gmj,gij->gmi', _group_major(a.astype(mat.dtype), groups), mat) for a, mat in terms)
    return y.transpose(1, 0, 2).reshape(m, channels)
  y = sum(a.reshape(m, groups, 1, g).astype(mat.dtype) * mat for a, mat in terms)
  return jnp.sum(y, axis=-1).reshape(m, channels)


def group_transform(terms: Sequence[tuple[jax.Array, jax.Array]], *, layout: str | None = None) -> jax.Array:
  """Σ_k a_k M_kᵀ per group: pairs of (m, C) and (G, g, g) -> (m, C) in the matrices' dtype.

  Several terms share one pass over the samples in the fused layout (dx = dy S + x A in the backward pass).
  """
  arrays, matrices = zip(*terms)
  return _per_platform(arrays[0].shape[1], layout,
                       lambda lay, arrays, matrices: _transform(lay, list(zip(arrays, matrices))),
                       list(arrays), list(matrices))


def group_matmul(a: jax.Array, matrices: jax.Array, *, layout: str | None = None) -> jax.Array:
  """Each group's samples times its matrix transposed, y_g = a_g M_gᵀ: (m, C), (G, g, g) -> (m, C)."""
  return group_transform([(a, matrices)], layout=layout)


def group_scatter(a: jax.Array, groups: int, *, layout: str | None = None) -> jax.Array:
  """Per-group aᵀa: (m, C) -> (G, g, g)."""
  return group_cross(a, a, groups, accumulate=a.dtype, layout=layout)


def shift_samples(samples: jax.Array, shift: jax.Array) -> jax.Array:
  """d = x − K: (m, C), (C,) -> (m, C) in the shift's dtype (float32 for bfloat16 samples).

  The cast of bfloat16 samples happens in the same elementwise pass (never a materialised float32 copy
  of x). d stays float32: rounding d to bfloat16 for bf16 GEMMs made ‖cov(y) − I‖ 9× that of float32 on
  correlated data (test_whitening_vjp.py), above the 2× the issue allows. Written once so that every
  product that reads d reads the same HLO value, which XLA computes (and transposes) once.
  """
  return samples.astype(shift.dtype) - shift


def shifted_moments(samples: jax.Array, groups: int, shift: jax.Array, *, layout: str | None = None,
                    ) -> tuple[jax.Array, jax.Array]:
  """Mean (C,) and unbiased per-group covariance (G, g, g) of (m, C) samples, in one pass over them.

  With d = x − K for a shift K near the mean (a sample of the batch), Σ = (dᵀd − m d̄ d̄ᵀ)/(m − 1) loses
  only the digits of |d̄|/σ, not those of |μ|/σ as the naive xᵀx − m x̄x̄ᵀ does: as accurate as two passes
  whenever K lies within a few standard deviations of μ. K is treated as a constant (its influence on
  Σ cancels exactly), so gradients are those of the two-pass formula.
  """
  accumulate = jnp.promote_types(samples.dtype, jnp.float32)
  shift = jax.lax.stop_gradient(shift).astype(accumulate)
  shifted = shift_samples(samples, shift)
  m = samples.shape[0]
  offset = group_sums(shifted, groups, accumulate=accumulate, layout=layout).reshape(-1) / m
  offset_g = offset.reshape(groups, -1)
  second = group_cross(shifted, shifted, groups, accumulate=accumulate, layout=layout)
  cov = (second - m * offset_g[:, :, None] * offset_g[:, None, :]) / (m - 1)
  return shift + offset, cov
