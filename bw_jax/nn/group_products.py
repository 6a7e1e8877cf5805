"""Products of (m, C) activations with per-group (G, g, g) matrices, in the layout that is fastest for the shape.

BatchWhitening spends its arithmetic in two kinds of product over the m samples of each group of g channels:
the cross products aᵀb (covariance, gradient of S) and the transforms a Mᵀ (y = S x, dx = Sᵀ dy + …). The same
product can be laid out in ways with very different speed on different shapes; each way is a `Layout`:

  DENSE       one (m, C) × (C, C) GEMM with the block-diagonal matrix: G× the arithmetic, but one large GEMM
              that needs no transpose of the activations;
  BATCHED     G GEMMs of (m, g) × (g, g) on a (G, m, g) transposed copy of the activations;
  TRANSPOSED  the same GEMMs on a (G, g, m) copy (channels major, samples minor: the cross products contract
              the minor axis of both operands, the transforms write (G, g, m) rows of length m);
  KERNEL      (CPU) in place on (m, C), by the C++ kernels of `bw_jax.nn.kernels`: no copies in or out, g-wide
              vectors in registers. An operand is the `InPlace` samples with their shift (d = x − K is never
              materialised) and an implicit ones column; the fastest layout on the CPU wherever the kernels
              could be built (BENCHMARKS.md).

An operand is brought into its layout once (`Layout.operand`) and every product reads it there; `Layout.back`
brings a transform's result back to (m, C). Samples can carry a column of ones (`ones=True`), which puts sums
into the cross products (aᵀ[d, 1] = [aᵀd, Σa]) and offsets into the transforms ([d, 1][M, b]ᵀ = d Mᵀ + b)
for 1/g more arithmetic: no separate reduction (which XLA fed from a second x − K pass), and no
elementwise step between a GEMM in the batched layout and the transpose back (with one, XLA fused
transpose + step into every consumer of the result, 2× the whole layer at C = 672; the bare transpose is
still fused into the consumers, as in the autodiff layer: BENCHMARKS.md).

`cpu_layout`/`accelerator_layout` pick a layout from the measurements of BENCHMARKS.md ("Group product
layouts"); `per_platform_layout` applies the CPU choice on a CPU and the accelerator choice elsewhere. Other
layouts, for experiments, are subclasses of `Layout` in `benchmarks/`.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.nn import kernels
from bw_jax.nn.sharding import summed_sharding

# CPU cost model from BENCHMARKS.md ("Group product layouts"): the dense GEMM wins while its G-fold extra
# arithmetic is small (C ≤ 64); above, the batched GEMMs do.
DENSE_MAX_CHANNELS = 64
# On GPU/TPU these products are memory-bound: a dense GEMM of arithmetic intensity ~C flops per byte stays
# under the roofline ridge (~300 on an H100 in bf16) up to a few hundred channels and reads the activations
# once without transposes (a roofline estimate: BENCHMARKS.md has what is measured).
ACCELERATOR_DENSE_MAX_CHANNELS = 256

# Group sizes with register-blocked (4, 8, 16, 32) or unrolled (6, 10, 12) kernels; the kernels' scalar loops
# serve any other g, but XLA's products are faster there (BENCHMARKS.md).
KERNEL_GROUP_SIZES = (4, 6, 8, 10, 12, 16, 32)


def shift_samples(samples: jax.Array, shift: jax.Array) -> jax.Array:
  """d = x − K: (m, C), (C,) -> (m, C) in the shift's dtype (float32 for bfloat16 samples).

  The cast of bfloat16 samples happens in the same elementwise pass (never a materialised float32 copy
  of x). d stays float32: rounding d to bfloat16 for bf16 GEMMs made ‖cov(y) − I‖ 9× that of float32 on
  correlated data (test_whitening_vjp.py).
  """
  return samples.astype(shift.dtype) - shift


# ----------------------------------------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the operands of the per-group products lie, and the two products on operands lying there.

  Hashable and equal by class, so that a layout can be a static argument of `jax.jit`. Subclasses define
  `operand`, `back`, `cross` and `transform`; `shifted` and `transform_sum` follow from them.
  """

  name = 'abstract'

  def operand(self, a: jax.Array, groups: int, *, ones: bool = False) -> Any:
    """(m, C) in this layout, with a column of ones if `ones`."""
    raise NotImplementedError

  def shifted(self, samples: jax.Array, shift: jax.Array, groups: int) -> Any:
    """d = x − K carrying ones, for (m, C) samples and a (C,) shift in the statistics dtype."""
    return self.operand(shift_samples(samples, shift), groups, ones=True)

  def back(self, a: Any) -> jax.Array:
    """A transform's result back to (m, C): the inverse of `operand` without ones."""
    raise NotImplementedError

  def cross(self, a: Any, b: Any, g: int, accumulate: Any = jnp.float32, channels: int | None = None) -> jax.Array:
    """Per-group [a_g, 1]ᵀ[b_g, 1]: (G, ka, kb) in `accumulate`, k = g, or g + 1 for an operand carrying
    ones (then the last row holds Σ b_g, the last column Σ a_g, the corner m). `channels`: C, where the
    operand's shape leaves it ambiguous."""
    raise NotImplementedError

  def transform(self, a: Any, matrices: jax.Array) -> Any:
    """Per group a_g M_gᵀ, in this layout: a with k = g or g + 1 columns per group, M (G, g, k); the
    result has g. For `a` carrying ones, M = [S, b] gives a_g Sᵀ + b_g: the offset is added inside the GEMM."""
    raise NotImplementedError

  def transform_sum(self, terms: Sequence[tuple[Any, jax.Array]]) -> Any:
    """Σ_k a_k M_kᵀ per group (`transform` of each, summed)."""
    return sum(self.transform(a, matrices) for a, matrices in terms)


def _with_ones(a: jax.Array, axis: int) -> jax.Array:
  """`a` with a column of ones appended along `axis` (sharded as `a` is, under explicit sharding)."""
  return jnp.concatenate([a, jnp.ones_like(jax.lax.slice_in_dim(a, 0, 1, axis=axis))], axis=axis)


@dataclasses.dataclass(frozen=True)
class Dense(Layout):
  """(m, C [+1]): one GEMM with the block-diagonal matrix."""

  name = 'dense'

  def operand(self, a, groups, *, ones=False):
    return _with_ones(a, 1) if ones else a

  def back(self, a):
    return a

  def cross(self, a, b, g, accumulate=jnp.float32, channels=None):
    full = jnp.matmul(a.T, b, preferred_element_type=accumulate, out_sharding=summed_sharding())
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

  def transform(self, a, matrices):
    groups, g, k = matrices.shape
    transposed = _block_diagonal(matrices[:, :, :g]).T
    if k > g:  # the ones column of a meets the offsets
      transposed = jnp.concatenate([transposed, matrices[:, :, g].reshape(1, -1)], axis=0)
    return a.astype(matrices.dtype) @ transposed


def _block_diagonal(matrices: jax.Array) -> jax.Array:
  """(G, g, g) -> (G·g, G·g) with the matrices on the diagonal."""
  groups, g, _ = matrices.shape
  return jnp.einsum('gij,gh->gihj', matrices, jnp.eye(groups, dtype=matrices.dtype)).reshape(groups * g, -1)


@dataclasses.dataclass(frozen=True)
class Batched(Layout):
  """(G, m, g [+1]): G GEMMs on a transposed copy."""

  name = 'batched'

  def operand(self, a, groups, *, ones=False):
    a = a.reshape(a.shape[0], groups, -1).transpose(1, 0, 2)  # transposed before the ones join: one copy
    return _with_ones(a, 2) if ones else a

  def back(self, a):
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)

  def cross(self, a, b, g, accumulate=jnp.float32, channels=None):
    return jnp.einsum('gmi,gmj->gij', a, b, preferred_element_type=accumulate, out_sharding=summed_sharding())

  def transform(self, a, matrices):
    return jnp.einsum('gmj,gij->gmi', a.astype(matrices.dtype), matrices)


@dataclasses.dataclass(frozen=True)
class Transposed(Layout):
  """(G, g [+1], m): G GEMMs on a copy with the samples minor."""

  name = 'transposed'

  def operand(self, a, groups, *, ones=False):
    a = a.T.reshape(groups, -1, a.shape[0])
    return _with_ones(a, 1) if ones else a

  def back(self, a):
    return a.reshape(-1, a.shape[-1]).T

  def cross(self, a, b, g, accumulate=jnp.float32, channels=None):
    return jnp.einsum('gim,gjm->gij', a, b, preferred_element_type=accumulate, out_sharding=summed_sharding())

  def transform(self, a, matrices):
    return jnp.einsum('gij,gjm->gim', matrices, a.astype(matrices.dtype))


@functools.partial(jax.tree_util.register_dataclass, data_fields=['samples', 'shift'], meta_fields=['ones'])
@dataclasses.dataclass(frozen=True)
class InPlace:
  """An operand of the KERNEL layout: the (m, C) samples minus a (C,) shift, with an implicit column of
  ones if `ones`. Read as they lie by every product (the difference is taken in registers)."""

  samples: jax.Array
  shift: jax.Array
  ones: bool = False

  @property
  def shape(self) -> tuple[int, int]:
    """The shape of the same operand in the DENSE layout: (m, C [+1])."""
    m, channels = self.samples.shape
    return m, channels + self.ones


@dataclasses.dataclass(frozen=True)
class Kernel(Layout):
  """`InPlace` operands, read by the CPU kernels of `bw_jax.nn.kernels`."""

  name = 'kernel'

  def operand(self, a, groups, *, ones=False):
    return InPlace(a, jnp.zeros(a.shape[1:], a.dtype), ones)

  def shifted(self, samples, shift, groups):
    return InPlace(samples.astype(shift.dtype), shift, ones=True)  # d = x − K is never materialised

  def back(self, a):
    return a

  def cross(self, a, b, g, accumulate=jnp.float32, channels=None):
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

  def transform(self, a, matrices):
    return self.transform_sum([(a, matrices)])

  def transform_sum(self, terms):
    """Two terms in one pass over (m, C), with the offsets of operands carrying ones."""
    if len(terms) > 2:
      return self.transform_sum(terms[:2]) + self.transform_sum(terms[2:])
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


DENSE, BATCHED, TRANSPOSED, KERNEL = Dense(), Batched(), Transposed(), Kernel()
LAYOUTS = {layout.name: layout for layout in (DENSE, BATCHED, TRANSPOSED, KERNEL)}


# ----------------------------------------------------------------------------------------------------------
# The choice per platform


def cpu_layout(channels: int, group_size: int | None = None) -> Layout:
  """The CPU's layout for C channels in groups of g: the in-place kernels for the g they vectorise, where
  they are available; else XLA's products (dense GEMM up to DENSE_MAX_CHANNELS, batched above)."""
  if group_size in KERNEL_GROUP_SIZES and kernels.available():
    return KERNEL
  return xla_cpu_layout(channels)


def xla_cpu_layout(channels: int) -> Layout:
  return DENSE if channels <= DENSE_MAX_CHANNELS else BATCHED


def accelerator_layout(channels: int, group_size: int | None = None) -> Layout:
  del group_size  # the roofline rule depends on C only
  return DENSE if channels <= ACCELERATOR_DENSE_MAX_CHANNELS else BATCHED


def per_platform_layout(channels: int, group_size: int, compute: Callable[..., Any], *args: Any,
                        layout: Layout | None = None) -> Any:
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
# The products on (m, C) arrays (one product each; the layer keeps its operands in layout instead)


def group_cross(a: jax.Array, b: jax.Array, groups: int, *, accumulate: Any = jnp.float32,
                layout: Layout | None = None) -> jax.Array:
  """Per-group a_gᵀ b_g: (m, C), (m, C) -> (G, g, g), summed in `accumulate` (operands in their dtype)."""
  g = a.shape[1] // groups
  return per_platform_layout(a.shape[1], g, lambda lay, a, b: lay.cross(
      lay.operand(a, groups), lay.operand(b, groups), g, accumulate), a, b, layout=layout)


def group_transform(terms: Sequence[tuple[jax.Array, jax.Array]], *, layout: Layout | None = None) -> jax.Array:
  """Σ_k a_k M_kᵀ per group: pairs of (m, C) and (G, g, g) -> (m, C) in the matrices' dtype."""
  arrays, matrices = zip(*terms)
  groups = matrices[0].shape[0]

  def compute(lay, arrays, matrices):
    return lay.back(lay.transform_sum([(lay.operand(a, groups), mat) for a, mat in zip(arrays, matrices)]))
  return per_platform_layout(arrays[0].shape[1], matrices[0].shape[-1], compute, list(arrays), list(matrices),
                             layout=layout)


def moments_from_sums(sums: jax.Array, count: Any, g: int) -> tuple[jax.Array, jax.Array]:
  """Mean offset d̄ (C,) and unbiased per-group covariance (G, g, g) of `count` shifted samples d from their
  cross product [d, 1]ᵀ[d, 1] (G, g + 1, g + 1), read in one pass over d.

  With d = x − K for a shift K near the mean (a sample of the batch), Σ = (dᵀd − m d̄ d̄ᵀ)/(m − 1) loses
  only the digits of |d̄|/σ, not those of |μ|/σ as the naive xᵀx − m x̄x̄ᵀ does: as accurate as two passes
  whenever K lies within a few standard deviations of μ. The count comes apart (not from the corner of
  `sums`), so that samples left out (d = 0) are not counted. Fewer than 2 samples estimate no spread: their
  covariance is returned as dᵀd − m d̄ d̄ᵀ, zero (the caller decides what to do with such a batch).
  """
  offset = sums[:, :g, g] / jnp.maximum(count, 1)
  cov = (sums[:, :g, :g] - count * offset[:, :, None] * offset[:, None, :]) / jnp.maximum(count - 1, 1)
  return offset.reshape(-1), cov
