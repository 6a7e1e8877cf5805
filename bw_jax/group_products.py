"""Products of (m, C) activations with per-group (G, g, g) matrices, in the layout that is fastest for the shape.

BatchWhitening spends its arithmetic in two kinds of product over the m samples of each group of g channels:
the cross products aᵀb (covariance, gradient of S) and the transforms a Mᵀ (y = S x, dx = Sᵀ dy + …). The same
product can be laid out in ways with very different speed on different shapes:

  dense    one (m, C) × (C, C) GEMM with the block-diagonal matrix: G× the arithmetic, but one large GEMM
           that needs no transpose of the activations;
  batched  G GEMMs of (m, g) × (g, g) on a (G, m, g) transposed copy of the activations;
  transposed  the same GEMMs on a (G, g, m) copy (channels major, samples minor: the cross products
           contract the minor axis of both operands, the transforms write (G, g, m) rows of length m);
  fused    in place on (m, G, g): broadcast multiply and reduce over the g inputs in one loop fusion.
           Fast alone, but inside the layer XLA duplicates each operand's elementwise producers into the
           (m, G, g, g) loop, 7–15× slower than `batched` for the whole layer (BENCHMARKS.md); kept for the
           layout benchmark only.

An operand is brought into its layout once (`to_layout`: (m, C) -> dense (m, C), batched (G, m, g), fused
(m, G, g)) and every product reads it there; `from_layout` brings a transform's result back. Samples can
carry a column of ones (`ones=True`: dense (m, C + 1), batched/fused k = g + 1 per group), which puts sums
into the cross products (aᵀ[d, 1] = [aᵀd, Σa]) and offsets into the transforms ([d, 1][M, b]ᵀ = d Mᵀ + b)
for 1/g more arithmetic: no separate reduction (which XLA fed from a second x − K pass), and no
elementwise step between a GEMM in the batched layout and the transpose back (with one, XLA fused
transpose + step into every consumer of the result, 2× the whole layer at C = 672; the bare transpose is
still fused into the consumers, as in the autodiff layer: BENCHMARKS.md).

`cpu_layout`/`accelerator_layout` pick a layout from the measurements of BENCHMARKS.md ("Group product
layouts"); `per_platform` applies the CPU choice on a CPU and the accelerator choice elsewhere.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

LAYOUTS = ('dense', 'batched', 'transposed', 'fused')

# CPU cost model from BENCHMARKS.md ("Group product layouts"): the dense GEMM wins while its G-fold extra
# arithmetic is small (C ≤ 64); above, the batched GEMMs do.
DENSE_MAX_CHANNELS = 64
# On GPU/TPU these products are memory-bound: a dense GEMM of arithmetic intensity ~C flops per byte stays
# under the roofline ridge (~300 on an H100 in bf16) up to a few hundred channels and reads the activations
# once without transposes. Not yet measured on a device (no accelerator was lent); see BENCHMARKS.md.
ACCELERATOR_DENSE_MAX_CHANNELS = 256


def cpu_layout(channels: int) -> str:
  return 'dense' if channels <= DENSE_MAX_CHANNELS else 'batched'


def accelerator_layout(channels: int) -> str:
  return 'dense' if channels <= ACCELERATOR_DENSE_MAX_CHANNELS else 'batched'


def per_platform(channels: int, layout: str | None, compute: Callable[..., Any], *args: Any) -> Any:
  """compute(layout, *args) with the layout chosen per platform at lowering (or `layout` if given)."""
  if layout is not None:
    return compute(layout, *args)
  cpu, accelerator = cpu_layout(channels), accelerator_layout(channels)
  if cpu == accelerator:
    return compute(cpu, *args)
  return jax.lax.platform_dependent(*args, cpu=lambda *a: compute(cpu, *a),
                                    default=lambda *a: compute(accelerator, *a))


# ----------------------------------------------------------------------------------------------------------
# Operands in a layout


def to_layout(a: jax.Array, groups: int, layout: str, *, ones: bool = False) -> jax.Array:
  """(m, C) -> dense (m, C [+1]), batched (G, m, g [+1]), transposed (G, g [+1], m), fused (m, G, g [+1]);
  [+1]: a column (a row, transposed) of ones."""
  m = a.shape[0]
  if layout == 'dense':
    return jnp.concatenate([a, jnp.ones((m, 1), a.dtype)], axis=1) if ones else a
  if layout == 'transposed':
    a = a.T.reshape(groups, -1, m)
    return jnp.concatenate([a, jnp.ones((groups, 1, m), a.dtype)], axis=1) if ones else a
  a = a.reshape(m, groups, -1)
  if layout == 'batched':  # transposed before the ones join: one loop fusion writes the copy
    a = a.transpose(1, 0, 2)
  return jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=2) if ones else a


def from_layout(a: jax.Array, layout: str) -> jax.Array:
  """A transform's result back to (m, C): the inverse of `to_layout` without ones."""
  if layout == 'dense':
    return a
  if layout == 'transposed':
    return a.reshape(-1, a.shape[-1]).T
  if layout == 'batched':
    a = a.transpose(1, 0, 2)
  return a.reshape(a.shape[0], -1)


def _block_diagonal(matrices: jax.Array) -> jax.Array:
  """(G, g, g) -> (G·g, G·g) with the matrices on the diagonal."""
  groups, g, _ = matrices.shape
  return jnp.einsum('gij,gh->gihj', matrices, jnp.eye(groups, dtype=matrices.dtype)).reshape(groups * g, -1)


def cross_in_layout(a: jax.Array, b: jax.Array, g: int, layout: str, accumulate=jnp.float32,
                    channels: int | None = None) -> jax.Array:
  """Per-group [a_g, 1]ᵀ[b_g, 1] of operands in `layout`: (G, ka, kb) in `accumulate`, k = g, or g + 1 for an
  operand carrying ones (then the last row holds Σ b_g, the last column Σ a_g, the corner m)."""
  if layout == 'batched':
    return jnp.einsum('gmi,gmj->gij', a, b, preferred_element_type=accumulate)
  if layout == 'transposed':
    return jnp.einsum('gim,gjm->gij', a, b, preferred_element_type=accumulate)
  if layout == 'fused':
    return jnp.sum(a.astype(accumulate)[..., :, None] * b.astype(accumulate)[..., None, :], axis=0)
  full = jnp.matmul(a.T, b, preferred_element_type=accumulate)
  if channels is None:  # Ambiguous for g = 1 with a ones column (C + 1 is a multiple of 1): callers pass C.
    channels = full.shape[0] - full.shape[0] % g
  groups = channels // g
  diagonal = jnp.arange(groups)
  blocks = full[:channels, :channels].reshape(groups, g, groups, g)[diagonal, :, diagonal, :]
  if full.shape[1] > channels:  # b carries ones: a's sums
    blocks = jnp.concatenate([blocks, full[:channels, channels:].reshape(groups, g, 1)], axis=2)
  if full.shape[0] > channels:  # a carries ones: b's sums (and m in the corner)
    row = full[channels:, :channels].reshape(groups, 1, g)
    if full.shape[1] > channels:
      row = jnp.concatenate([row, jnp.broadcast_to(full[channels:, channels:], (groups, 1, 1))], axis=2)
    blocks = jnp.concatenate([blocks, row], axis=1)
  return blocks


def transform_in_layout(a: jax.Array, matrices: jax.Array, layout: str) -> jax.Array:
  """Per group a_g M_gᵀ, in `layout`: a with k = g or g + 1 columns per group, M (G, g, k); the result has g.

  For a carrying ones, M = [S, b] gives a_g Sᵀ + b_g: the offset is added inside the GEMM.
  """
  if layout == 'batched':
    return jnp.einsum('gmj,gij->gmi', a.astype(matrices.dtype), matrices)
  if layout == 'transposed':
    return jnp.einsum('gij,gjm->gim', matrices, a.astype(matrices.dtype))
  if layout == 'fused':
    return jnp.sum(a.astype(matrices.dtype)[..., None, :] * matrices, axis=-1)
  groups, g, k = matrices.shape
  transposed = _block_diagonal(matrices[:, :, :g]).T
  if k > g:  # the ones column of a meets the offsets
    transposed = jnp.concatenate([transposed, matrices[:, :, g].reshape(1, -1)], axis=0)
  return a.astype(matrices.dtype) @ transposed


# ----------------------------------------------------------------------------------------------------------
# The products on (m, C) arrays (one product each; the layer keeps its operands in layout instead)


def group_cross(a: jax.Array, b: jax.Array, groups: int, *, accumulate=jnp.float32,
                layout: str | None = None) -> jax.Array:
  """Per-group a_gᵀ b_g: (m, C), (m, C) -> (G, g, g), summed in `accumulate` (operands in their dtype)."""
  g = a.shape[1] // groups
  return per_platform(a.shape[1], layout, lambda lay, a, b: cross_in_layout(
      to_layout(a, groups, lay), to_layout(b, groups, lay), g, lay, accumulate), a, b)


def group_sums(a: jax.Array, groups: int, *, accumulate=jnp.float32, layout: str | None = None) -> jax.Array:
  """Σ_i a_i per group: (m, C) -> (G, g), summed in `accumulate`. One reduction whatever the layout (the
  argument is accepted for symmetry; the layer takes its sums from the cross products instead)."""
  return jnp.sum(a, axis=0, dtype=accumulate).reshape(groups, -1)


def group_transform(terms: Sequence[tuple[jax.Array, jax.Array]], *, layout: str | None = None) -> jax.Array:
  """Σ_k a_k M_kᵀ per group: pairs of (m, C) and (G, g, g) -> (m, C) in the matrices' dtype."""
  arrays, matrices = zip(*terms)
  groups = matrices[0].shape[0]

  def compute(lay, arrays, matrices):
    return from_layout(sum(transform_in_layout(to_layout(a, groups, lay), mat, lay)
                           for a, mat in zip(arrays, matrices)), lay)
  return per_platform(arrays[0].shape[1], layout, compute, list(arrays), list(matrices))


def group_matmul(a: jax.Array, matrices: jax.Array, *, layout: str | None = None) -> jax.Array:
  """Each group's samples times its matrix transposed, y_g = a_g M_gᵀ: (m, C), (G, g, g) -> (m, C)."""
  return group_transform([(a, matrices)], layout=layout)


def group_scatter(a: jax.Array, groups: int, *, layout: str | None = None) -> jax.Array:
  """Per-group aᵀa: (m, C) -> (G, g, g)."""
  return group_cross(a, a, groups, accumulate=a.dtype, layout=layout)


# ----------------------------------------------------------------------------------------------------------
# Moments


def shift_samples(samples: jax.Array, shift: jax.Array) -> jax.Array:
  """d = x − K: (m, C), (C,) -> (m, C) in the shift's dtype (float32 for bfloat16 samples).

  The cast of bfloat16 samples happens in the same elementwise pass (never a materialised float32 copy
  of x). d stays float32: rounding d to bfloat16 for bf16 GEMMs made ‖cov(y) − I‖ 9× that of float32 on
  correlated data (test_whitening_vjp.py), above the 2× the issue allows.
  """
  return samples.astype(shift.dtype) - shift


def moments_in_layout(ones: jax.Array, g: int, layout: str, accumulate=jnp.float32,
                      ) -> tuple[jax.Array, jax.Array]:
  """Mean offset d̄ (C,) and unbiased per-group covariance (G, g, g) of shifted samples d in `layout`
  carrying ones, from the one cross product [d, 1]ᵀ[d, 1] (a single pass over d).

  With d = x − K for a shift K near the mean (a sample of the batch), Σ = (dᵀd − m d̄ d̄ᵀ)/(m − 1) loses
  only the digits of |d̄|/σ, not those of |μ|/σ as the naive xᵀx − m x̄x̄ᵀ does: as accurate as two passes
  whenever K lies within a few standard deviations of μ.
  """
  cross = cross_in_layout(ones, ones, g, layout, accumulate, channels=ones.shape[-1] - 1)
  m = ones.shape[{'batched': 1, 'transposed': -1}.get(layout, 0)]
  offset = cross[:, :g, g] / m
  cov = (cross[:, :g, :g] - m * offset[:, :, None] * offset[:, None, :]) / (m - 1)
  return offset.reshape(-1), cov


def shifted_moments(samples: jax.Array, groups: int, shift: jax.Array, *, layout: str | None = None,
                    ) -> tuple[jax.Array, jax.Array]:
  """Mean (C,) and unbiased per-group covariance (G, g, g) of (m, C) samples, in one pass over them
  (`moments_in_layout`). K is treated as a constant (its influence on Σ cancels exactly), so gradients
  are those of the two-pass formula."""
  accumulate = jnp.promote_types(samples.dtype, jnp.float32)
  shift = jax.lax.stop_gradient(shift).astype(accumulate)
  g = samples.shape[1] // groups
  offset, cov = per_platform(samples.shape[1], layout, lambda lay, d: moments_in_layout(
      to_layout(d, groups, lay, ones=True), g, lay, accumulate), shift_samples(samples, shift))
  return shift + offset, cov
