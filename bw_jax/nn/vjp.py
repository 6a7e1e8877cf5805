"""Training-mode whitening y = γ ⊙ S(Σ_w)(x − μ_c) + β: one forward pass, and its backward pass in closed form.

Autodiff of the layer walks every elementwise step of the forward pass backwards over the (m, C)
activations: ~10 passes. The gradient w.r.t. x only needs two reductions and one transform:

  dS  = Σ_i dy_i (x_i − μ_c)ᵀ                  (G, g, g)   } one pass over (dy, x)
  dμ_c = −Sᵀ Σ_i dy_i                          (C,)        }
  (dμ_b, dΣ_b) = pullback of the small statistics function (μ_b, Σ_b) ↦ (μ_c, S)    — (G, g, g) work only
  dx_i = Sᵀ dy_i + (2/(m−1)) sym(dΣ_b)(x_i − μ_b) + dμ_b/m                            — one pass

(Huang et al. 2018, Decorrelated Batch Normalization, §3.2, generalised: the method-specific derivative of S
is whatever `statistics` differentiates to, e.g. the Cholesky rule of `matrices.py`, with its fallbacks.)
Every product reads the same shifted samples d = x − K (K the first sample, a constant) that the one-pass
moments read, and the centrings are folded into the products: y = S d − S(μ_c − K), dS = dyᵀd − (Σ dy)(μ_c − K)ᵀ,
so x − μ is never materialised, and with |μ − K| ~ σ the folding loses no digits even for a large mean.
The samples d are brought into the product layout once, with a column of ones (`Layout.shifted`), and kept
as the residual: [d, 1]ᵀ[d, 1] gives Σd with dᵀd, dyᵀ[d, 1] gives Σdy with dS, and the offsets
(−S(μ_c − K), the dx offset) ride in the transforms' GEMMs, so no elementwise pass sits between a GEMM and
the single transpose back out of the batched layout. The layer's γ and β ride there too: the forward matrix
is [diag(γ) S, β − γ ⊙ S(μ_c − K)], dγ = rowdot(S, dyᵀd) − Σdy ⊙ S(μ_c − K) and dβ = Σdy come from the
same cross product, and γ scales the (G, g, ·) results instead of dy (2.3× faster at C = 240, BENCHMARKS.md).

A mask (the samples the moments count) and an `axis_name` (moments summed over a mapped axis in one
collective) enter the same forward pass; the closed form covers neither, and such a call is differentiated
by JAX autodiff of that forward pass (under `pmap` and `shard_map` the collective's transpose is JAX's).

Twice differentiable in reverse mode (grad of grad, `jax.hessian` = jacfwd of jacrev): the backward pass is
ordinary JAX code. Forward mode of the layer itself (`jax.jvp`, `jax.jacfwd` of the output) is not defined
for a `jax.custom_vjp` and raises JAX's TypeError; use `autodiff_backward()` for it.
"""

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.nn.dtypes import accumulation_dtype
from bw_jax.nn.group_products import Layout, moments_from_sums, per_platform_layout
from bw_jax.nn.sharding import gathered, sample_axes, shard_count

# (batch mean (C,), batch cov (G, g, g), counted samples (), state) -> ((centring mean (C,), S (G, g, g)), aux).
# `aux` carries no gradient (the running statistics the layer stores under stop_gradient). A static argument
# of the compiled layer: it must be hashable by value (a frozen dataclass, as `whitening.TrainingStatistics`).
StatisticsFn = Callable[[jax.Array, jax.Array, Any, Any], tuple[tuple[jax.Array, jax.Array], Any]]
Affine = tuple[jax.Array | None, jax.Array | None]  # (γ (C,) or None, β (C,) or None)
# (axis_name, axis_index_groups as a tuple of tuples) of a reduction over a mapped axis, or None.
Reduction = tuple[Any, tuple[tuple[int, ...], ...] | None] | None

_AUTODIFF = contextvars.ContextVar('bw_jax_autodiff_backward', default=False)


@contextlib.contextmanager
def autodiff_backward(enabled: bool = True) -> Iterator[None]:
  """Within this context, layers traced from now on are differentiated by JAX autodiff instead of the
  closed form (for tests and for forward-mode derivatives). Read at trace time: a function already
  jitted keeps the backward pass it was traced with."""
  token = _AUTODIFF.set(enabled)
  try:
    yield
  finally:
    _AUTODIFF.reset(token)


def autodiff_enabled() -> bool:
  """Whether layers traced now are differentiated by autodiff (inside `autodiff_backward()`)."""
  return _AUTODIFF.get()


# ----------------------------------------------------------------------------------------------------------
# Pieces of the forward pass


def first_counted_sample(samples: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The first sample that `weights` counts (the first sample without weights): (m, C), (m,) -> (C,).

  Under explicit sharding of the samples over n shards, each shard's first counted sample is found where it
  lies and the n of them are gathered ((n, C), not the batch).
  """
  n = shard_count(sample_axes(samples))
  rows = samples.reshape(n, -1, samples.shape[-1])
  if weights is None:
    return gathered(rows[:, 0])[0]
  counted = weights.reshape(n, -1)
  firsts = jnp.take_along_axis(rows, jnp.argmax(counted, axis=1)[:, None, None], axis=1)[:, 0]
  return gathered(firsts)[jnp.argmax(gathered(jnp.any(counted, axis=1)))]


def _group_product(matrices: jax.Array, vector: jax.Array) -> jax.Array:
  """M_g v_g per group: (G, g, g), (C,) -> (C,)."""
  return jnp.einsum('gij,gj->gi', matrices, vector.reshape(matrices.shape[0], -1)).reshape(-1)


def _with_offset(matrices: jax.Array, offset: jax.Array) -> jax.Array:
  """[M_g, b_g] per group, for samples carrying ones: (G, g, g), (C,) -> (G, g, g + 1)."""
  return jnp.concatenate([matrices, offset.reshape(matrices.shape[0], -1, 1).astype(matrices.dtype)], axis=2)


def _affine_whitening(whitening: jax.Array, centre: jax.Array, affine: Affine) -> jax.Array:
  """[diag(γ) S, β − γ ⊙ S μ] per group: the matrix that takes [d, 1] to y = γ ⊙ S(d − μ) + β in one GEMM,
  (G, g, g), (C,), ((C,) | None, (C,) | None) -> (G, g, g + 1) in S's dtype."""
  scale, bias = affine
  groups, g, _ = whitening.shape
  offset = -_group_product(whitening, centre)
  if scale is not None:
    scale = scale.astype(whitening.dtype)
    whitening, offset = scale.reshape(groups, g, 1) * whitening, scale * offset
  if bias is not None:
    offset = offset + bias.astype(whitening.dtype)
  return _with_offset(whitening, offset)


def _whiten_in_layout(layout: Layout, shifted: Any, centre: jax.Array, whitening: jax.Array,
                      affine: Affine) -> jax.Array:
  """y = γ ⊙ (S d − S μ) + β per group for shifted samples d in `layout` carrying ones, with μ shifted like
  d: centring and affine are the GEMM's matrix and offset column, so the result leaves the layout in one
  transpose and no elementwise pass over (m, C) follows it inside the layer."""
  return layout.back(layout.transform(shifted, _affine_whitening(whitening, centre, affine)))


def apply_whitening_folded(shifted: jax.Array, centre: jax.Array, whitening: jax.Array,
                           affine: Affine = (None, None), layout: Layout | None = None) -> jax.Array:
  """y = γ ⊙ (S d − S μ) + β per group, for samples d shifted by the constant that `centre` is shifted by:
  (m, C), (C,), (G, g, g), optional γ and β (C,) -> (m, C) in S's dtype."""
  groups = whitening.shape[0]
  return per_platform_layout(shifted.shape[1], whitening.shape[-1], lambda lay, d, c, s, a: _whiten_in_layout(
      lay, lay.operand(d, groups, ones=True), c, s, a), shifted, centre, whitening, affine, layout=layout)


def shifted_moments(layout: Layout, samples: jax.Array, groups: int, shift: jax.Array,
                    weights: jax.Array | None = None, reduction: Reduction = None,
                    ) -> tuple[Any, jax.Array, jax.Array, Any]:
  """The samples shifted by K in `layout` (carrying ones) and the moments of those `weights` counts, summed
  over the mapped axis of `reduction`: (shifted, mean offset d̄ (C,), cov (G, g, g), count).

  One cross product of the shifted samples with themselves (`moments_from_sums`). Samples left out are
  replaced by K before shifting (a select, so that NaN or inf there cannot reach the sums); the transform
  still reads all samples. `count` is m (a Python int) without weights and reduction, else an array.
  """
  channels = samples.shape[1]
  g = channels // groups
  shifted = layout.shifted(samples, shift, groups)  # [x − K, 1], read by every product
  if weights is None:
    counted, count = shifted, samples.shape[0]
  else:
    included = jnp.where(weights[:, None], samples.astype(shift.dtype), shift)
    counted, count = layout.shifted(included, shift, groups), jnp.sum(weights, dtype=shift.dtype)
  sums = layout.cross(counted, counted, g, shift.dtype, channels=channels)
  if reduction is not None:
    axis_name, axis_index_groups = reduction
    sums, count = jax.lax.psum((sums, jnp.asarray(count, shift.dtype)), axis_name,
                               axis_index_groups=axis_index_groups)
  offset, cov = moments_from_sums(sums, count, g)
  return shifted, offset, cov, count


# ----------------------------------------------------------------------------------------------------------
# The forward pass, its closed-form backward pass, and the compiled entry point


def _forward(statistics: StatisticsFn, groups: int, layout: Layout, x: jax.Array, state: Any, affine: Affine,
             weights: jax.Array | None = None, shift: jax.Array | None = None, reduction: Reduction = None,
             keep_pullback: bool = True) -> tuple[tuple[jax.Array, Any], tuple[Any, ...]]:
  samples = x.reshape(-1, x.shape[-1])
  if shift is None:
    shift = first_counted_sample(samples, weights)
  # The shift K, in the statistics dtype, is a constant: its influence on the moments cancels exactly.
  shift = jax.lax.stop_gradient(shift).astype(accumulation_dtype(x.dtype))
  shifted, offset, cov, count = shifted_moments(layout, samples, groups, shift, weights, reduction)
  mean = shift + offset
  statistics_of = lambda mean, cov, state: statistics(mean, cov, count, state)
  if keep_pullback:
    (centre, whitening), pullback, aux = jax.vjp(statistics_of, mean, cov, state, has_aux=True)
  else:  # differentiated by autodiff as a whole: linearising `statistics` here would be wasted work
    (centre, whitening), aux = statistics_of(mean, cov, state)
    pullback = None
  y = _whiten_in_layout(layout, shifted, centre - shift, whitening, affine).reshape(x.shape)
  dtype_token = jnp.zeros((0,), x.dtype)  # dx leaves in x's dtype
  return (y, aux), (shifted, offset, count, centre - shift, whitening, affine, pullback, dtype_token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _closed_form(statistics: StatisticsFn, groups: int, layout: Layout, x: jax.Array, state: Any, affine: Affine):
  return _forward(statistics, groups, layout, x, state, affine, keep_pullback=False)[0]


def _closed_form_backward(statistics, groups, layout, residuals, cotangents):
  del statistics  # its derivative comes in as `pullback`
  shifted, offset, count, centre, whitening, (scale, bias), pullback, dtype_token = residuals
  dy, _ = cotangents  # dy: the cotangent of the affine output γ ⊙ ŷ + β; aux: no gradient
  g = whitening.shape[-1]
  dy = dy.reshape(-1, groups * g).astype(whitening.dtype)
  dy_in_layout = layout.operand(dy, groups)
  cross = layout.cross(dy_in_layout, shifted, g, whitening.dtype, channels=groups * g)  # [dyᵀ(x − K), Σ dy]
  dy_sum, dy_cross = cross[:, :, g], cross[:, :, :g]
  d_bias = None if bias is None else dy_sum.reshape(-1).astype(bias.dtype)
  d_scale, applied = None, whitening  # applied: the matrix the forward GEMM applied to d, diag(γ) S
  if scale is not None:
    # dγ = Σ_i dy_i ⊙ ŷ_i with ŷ = S(d − μ): row i of S against row i of dyᵀd, less (Σ dy)_i (Sμ)_i.
    d_scale = (jnp.sum(whitening * dy_cross, axis=-1)
               - dy_sum * _group_product(whitening, centre).reshape(groups, g)).reshape(-1).astype(scale.dtype)
    # From here on dy is the cotangent of ŷ, γ ⊙ dy: scale the (G, g, ·) results rather than the samples.
    column = scale.astype(whitening.dtype).reshape(groups, g, 1)
    dy_sum, dy_cross, applied = column[..., 0] * dy_sum, column * dy_cross, column * whitening
  d_whitening = dy_cross - dy_sum[:, :, None] * centre.reshape(groups, 1, g)
  d_centre = -jnp.einsum('gi,gij->gj', dy_sum, whitening).reshape(-1)
  d_mean, d_cov, d_state = pullback((d_centre, d_whitening))
  # Σ_b = (1/(m−1)) Σ_i (x_i − μ_b)(x_i − μ_b)ᵀ: its derivative along x_i is 2/(m−1)·sym(dΣ)(x_i − μ_b);
  # the part through μ_b vanishes because the centred samples sum to zero. (m < 2: as the forward pass.)
  cov_weight = (d_cov + jnp.swapaxes(d_cov, -1, -2)) / jnp.maximum(count - 1, 1)
  dx_offset = d_mean / jnp.maximum(count, 1) - _group_product(cov_weight, offset)
  dx = layout.transform_sum([(dy_in_layout, jnp.swapaxes(applied, -1, -2)),  # (diag(γ) S)ᵀ on the raw dy
                             (shifted, _with_offset(cov_weight, dx_offset))])
  dx = layout.back(dx).reshape(cotangents[0].shape).astype(dtype_token.dtype)
  return dx, d_state, (d_scale, d_bias)


_closed_form.defvjp(lambda *args: _forward(*args), _closed_form_backward)


def whiten_training(x: jax.Array, groups: int, statistics: StatisticsFn, state: Any = (), *,
                    scale: jax.Array | None = None, bias: jax.Array | None = None, mask: jax.Array | None = None,
                    shift: jax.Array | None = None, axis_name: Any = None, axis_index_groups: Any = None,
                    layout: Layout | None = None) -> tuple[jax.Array, Any]:
  """Whitens x with statistics derived from its batch moments, then scales and shifts it: y = γ ⊙ ŷ + β.

  One compiled program (`jax.jit`; traced into the caller's program when called inside one), so that an
  eager call runs as one program per shape and settings rather than ~100 dispatched operations.

  Args:
    x: (N, ..., C) activations, float32, bfloat16 or float64 (m = N·H·W samples).
    groups: G, the number of channel groups (C = G·g).
    statistics: a hashable function (batch mean, batch cov, count, state) -> ((μ_c, S), aux) (`StatisticsFn`).
    state: arrays `statistics` needs (e.g. running statistics); they receive gradients.
    scale, bias: optional (C,) γ and β, applied inside the whitening GEMM (no pass of their own; their
      gradients come from the backward pass's cross product).
    mask: optional (m,) booleans, the samples the moments count (all samples are whitened).
    shift: optional (C,) K the moments are taken about (default: the first counted sample); with
      `axis_name` it must be the same on every device (the layer passes its running mean).
    axis_name, axis_index_groups: sum the moments over this mapped axis (`shard_map`, `pmap`, `vmap`).
    layout: force a group-product layout (default: per platform, `group_products.per_platform_layout`).
  Returns:
    y (N, ..., C) in the statistics dtype (float32, or float64 for float64 input) and `aux`.
  The backward pass is in closed form without mask, shift and axis_name (and outside `autodiff_backward()`);
  otherwise JAX autodiff differentiates the same forward pass.
  """
  groups_of_devices = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  reduction = None if axis_name is None else (axis_name, groups_of_devices)
  return _compiled_whiten_training(x, state, (scale, bias), mask, shift, groups=groups, statistics=statistics,
                                   reduction=reduction, layout=layout, autodiff=autodiff_enabled())


# inline: traced into a caller's program as if written there (the same program as without `jax.jit`, with
# `platform_dependent`'s switches folded at the caller's lowering); called eagerly, one compiled program.
@functools.partial(jax.jit, static_argnames=('groups', 'statistics', 'reduction', 'layout', 'autodiff'),
                   inline=True)
def _compiled_whiten_training(x, state, affine, mask, shift, *, groups, statistics, reduction, layout, autodiff):
  """`whiten_training`; `autodiff` is `autodiff_enabled()` of the caller, so that it keys the cache."""
  closed_form = mask is None and shift is None and reduction is None and not autodiff

  def whiten_in(layout: Layout, x: jax.Array, state: Any, affine: Affine, mask: Any, shift: Any):
    if closed_form:
      return _closed_form(statistics, groups, layout, x, state, affine)
    weights = None if mask is None else mask.reshape(-1)
    return _forward(statistics, groups, layout, x, state, affine, weights, shift, reduction, keep_pullback=False)[0]
  # The layout is chosen for the whole layer (forward and backward share their operands in it).
  return per_platform_layout(x.shape[-1], x.shape[-1] // groups, whiten_in, x, state, affine, mask, shift,
                             layout=layout)
