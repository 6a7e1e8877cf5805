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

  kernel   (CPU) in place on (m, C), by the C++ kernels of `bw_jax.nn.kernels`: no copies in or out, g-wide
           vectors in registers. An operand is the `InPlace` samples with their shift (d = x − K is never
           materialised) and an implicit ones column; the fastest layout on the CPU wherever the kernels
           could be built (BENCHMARKS.md).

`cpu_layout`/`accelerator_layout` pick a layout from the measurements of BENCHMARKS.md ("Group product
layouts"); `per_platform` applies the CPU choice on a CPU and the accelerator choice elsewhere.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.nn import kernels

LAYOUTS = ('dense', 'batched', 'transposed', 'fused', 'kernel')

# CPU cost model from BENCHMARKS.md ("Group product layouts"): the dense GEMM wins while its G-fold extra
# arithmetic is small (C ≤ 64); above, the batched GEMMs do.
DENSE_MAX_CHANNELS = 64
# On GPU/TPU these products are memory-bound: a dense GEMM of arithmetic intensity ~C flops per byte stays
# under the roofline ridge (~300 on an H100 in bf16) up to a few hundred channels and reads the activations
# once without transposes. Not yet measured on a device (no accelerator was lent); see BENCHMARKS.md.
ACCELERATOR_DENSE_MAX_CHANNELS = 256


# Group sizes with register-blocked (4, 8, 16, 32) or unrolled (6, 10, 12) kernels; the kernels' scalar loops
# serve any other g, but XLA's products are faster there (g = 12 before it was unrolled, 64×16×16×24: 7.0 ms
# against 3.6 dense; BENCHMARKS.md).
KERNEL_GROUP_SIZES = (4, 6, 8, 10, 12, 16, 32)


def cpu_layout(channels: int, group_size: int | None = None) -> str:
  """The CPU's layout for C channels in groups of g: the in-place kernels for the g they vectorise, where
  they are available; else XLA's products (dense GEMM up to DENSE_MAX_CHANNELS, batched above)."""
  if group_size in KERNEL_GROUP_SIZES and kernels.available():
    return 'kernel'
  return xla_cpu_layout(channels)


def xla_cpu_layout(channels: int) -> str:
  return 'dense' if channels <= DENSE_MAX_CHANNELS else 'batched'


def accelerator_layout(channels: int, group_size: int | None = None) -> str:
  del group_size  # the roofline rule depends on C only
  return 'dense' if channels <= ACCELERATOR_DENSE_MAX_CHANNELS else 'batched'


def per_platform(channels: int, layout: str | None, compute: Callable[..., Any], *args: Any,
                 group_size: int | None = None) -> Any:
  """compute(layout, *args) with the layout chosen per platform at lowering for C = `channels` in groups of
  `group_size` (or `layout` if given)."""
  if layout is not None:
    return compute(layout, *args)
  cpu, accelerator = cpu_layout(channels, group_size), accelerator_layout(channels, group_size)
  if cpu == accelerator:
    return compute(cpu, *args)
  return jax.lax.platform_dependent(*args, cpu=lambda *a: compute(cpu, *a),
                                    default=lambda *a: compute(accelerator, *a))


# ----------------------------------------------------------------------------------------------------------
# Operands in a layout


@functools.partial(jax.tree_util.register_dataclass, data_fields=['samples', 'shift'], meta_fields=['ones'])
@dataclasses.dataclass(frozen=True)
class InPlace:
  """An operand of the 'kernel' layout: the (m, C) samples minus a (C,) shift, with an implicit column of
  ones if `ones`. Read as they lie by every product (the difference is taken in registers)."""

  samples: jax.Array
  shift: jax.Array
  ones: bool = False

  @property
  def shape(self) -> tuple[int, int]:
    """The shape of the same operand in the 'dense' layout: (m, C [+1])."""
    m, channels = self.samples.shape
    return m, channels + self.ones


def to_layout(a: jax.Array, groups: int, layout: str, *, ones: bool = False) -> Any:
  """(m, C) -> dense (m, C [+1]), batched (G, m, g [+1]), transposed (G, g [+1], m), fused (m, G, g [+1]),
  kernel `InPlace`; [+1]: a column (a row, transposed) of ones."""
  m = a.shape[0]
  if layout == 'kernel':
    return InPlace(a, jnp.zeros(a.shape[1:], a.dtype), ones)
  if layout == 'dense':
    return jnp.concatenate([a, jnp.ones((m, 1), a.dtype)], axis=1) if ones else a
  if layout == 'transposed':
    a = a.T.reshape(groups, -1, m)
    return jnp.concatenate([a, jnp.ones((groups, 1, m), a.dtype)], axis=1) if ones else a
  a = a.reshape(m, groups, -1)
  if layout == 'batched':  # transposed before the ones join: one loop fusion writes the copy
    a = a.transpose(1, 0, 2)
  return jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=2) if ones else a


def shifted_to_layout(samples: jax.Array, shift: jax.Array, groups: int, layout: str) -> Any:
  """d = x − K carrying ones in `layout`, for (m, C) samples and a (C,) shift in the statistics dtype
  (`shift_samples`); the kernel layout keeps x and K and never materialises d."""
  if layout == 'kernel':
    return InPlace(samples.astype(shift.dtype), shift, ones=True)
  return to_layout(shift_samples(samples, shift), groups, layout, ones=True)


def from_layout(a: jax.Array, layout: str) -> jax.Array:
  """A transform's result back to (m, C): the inverse of `to_layout` without ones."""
  if layout in ('dense', 'kernel'):
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
  if layout == 'kernel':
    return _kernel_cross(a, b, g, accumulate)
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
  if layout == 'kernel':
    return transform_sum_in_layout([(a, matrices)], layout)
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


def transform_sum_in_layout(terms: Sequence[tuple[Any, jax.Array]], layout: str) -> jax.Array:
  """Σ_k a_k M_kᵀ per group for operands in `layout` (`transform_in_layout` of each, summed); the kernel
  layout computes two terms in one pass over (m, C), with the offsets of operands carrying ones."""
  if layout != 'kernel':
    return sum(transform_in_layout(a, matrices, layout) for a, matrices in terms)
  if len(terms) > 2:
    return transform_sum_in_layout(terms[:2], layout) + transform_sum_in_layout(terms[2:], layout)
  dtype = terms[0][1].dtype
  operands, offset = [], None
  for a, matrices in terms:
    g = matrices.shape[1]
    if matrices.shape[2] > g:  # [M, b]: the operand's ones column meets the offsets b
      column = matrices[:, :, g].reshape(-1)
      offset = column if offset is None else offset + column
    operands.append((a.samples.astype(dtype), a.shift.astype(dtype), matrices[:, :, :g]))
  if offset is None:
    offset = jnp.zeros(operands[0][1].shape, dtype)
  if len(operands) == 1:
    return kernels.group_transform(*operands[0], offset)
  return kernels.group_transform2(*operands[0], *operands[1], offset)


def _kernel_cross(a: InPlace, b: InPlace, g: int, accumulate: Any) -> jax.Array:
  """`cross_in_layout` of the kernel layout: (G, ka, kb) as the other layouts return it."""
  cast = lambda operand: (operand.samples.astype(accumulate), operand.shift.astype(accumulate))
  groups = a.samples.shape[1] // g
  cross = kernels.group_cross(*cast(a), *cast(b), groups)  # [a − sa]ᵀ[b − sb, 1]
  if not b.ones:
    cross = cross[:, :, :g]
  if a.ones:  # the last row: Σ(b − sb), and m in the corner if b carries ones too
    if a is b:
      row = cross[:, :, g]
    else:
      row = jnp.sum(b.samples.astype(accumulate) - b.shift.astype(accumulate), axis=0).reshape(groups, g)
    if b.ones:
      row = jnp.concatenate([row, jnp.full((groups, 1), a.samples.shape[0], accumulate)], axis=1)
    cross = jnp.concatenate([cross, row[:, None, :]], axis=1)
  return cross


# ----------------------------------------------------------------------------------------------------------
# The products on (m, C) arrays (one product each; the layer keeps its operands in layout instead)


def group_cross(a: jax.Array, b: jax.Array, groups: int, *, accumulate=jnp.float32,
                layout: str | None = None) -> jax.Array:
  """Per-group a_gᵀ b_g: (m, C), (m, C) -> (G, g, g), summed in `accumulate` (operands in their dtype)."""
  g = a.shape[1] // groups
  return per_platform(a.shape[1], layout, lambda lay, a, b: cross_in_layout(
      to_layout(a, groups, lay), to_layout(b, groups, lay), g, lay, accumulate), a, b, group_size=g)


def group_sums(a: jax.Array, groups: int, *, accumulate=jnp.float32, layout: str | None = None) -> jax.Array:
  """Σ_i a_i per group: (m, C) -> (G, g), summed in `accumulate`. One reduction whatever the layout (the
  argument is accepted for symmetry; the layer takes its sums from the cross products instead)."""
  return jnp.sum(a, axis=0, dtype=accumulate).reshape(groups, -1)


def group_transform(terms: Sequence[tuple[jax.Array, jax.Array]], *, layout: str | None = None) -> jax.Array:
  """Σ_k a_k M_kᵀ per group: pairs of (m, C) and (G, g, g) -> (m, C) in the matrices' dtype."""
  arrays, matrices = zip(*terms)
  groups = matrices[0].shape[0]

  def compute(lay, arrays, matrices):
    return from_layout(transform_sum_in_layout([(to_layout(a, groups, lay), mat)
                                                for a, mat in zip(arrays, matrices)], lay), lay)
  return per_platform(arrays[0].shape[1], layout, compute, list(arrays), list(matrices),
                      group_size=matrices[0].shape[-1])


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
  offset, cov = per_platform(samples.shape[1], layout, lambda lay, x, k: moments_in_layout(
      shifted_to_layout(x, k, groups, lay), g, lay, accumulate), samples, shift, group_size=g)
  return shift + offset, cov
