"""Training-mode whitening y = γ ⊙ S(Σ_w)(x − μ_c) + β with a closed-form backward pass over the activations.

Autodiff of the layer walks every elementwise step of the forward pass backwards over the (m, C)
activations: ~10 passes. The gradient w.r.t. x only needs two reductions and one transform:

  dS  = Σ_i dy_i (x_i − μ_c)ᵀ                  (G, g, g)   } one pass over (dy, x)
  dμ_c = −Sᵀ Σ_i dy_i                          (C,)        }
  (dμ_b, dΣ_b) = pullback of the small statistics function (μ_b, Σ_b) ↦ (μ_c, S)    — (G, g, g) work only
  dx_i = Sᵀ dy_i + (2/(m−1)) sym(dΣ_b)(x_i − μ_b) + dμ_b/m                            — one pass

(Huang et al. 2018, Decorrelated Batch Normalization, §3.2, generalised: the method-specific derivative of S
is whatever `statistics` differentiates to, e.g. the Cholesky rule of `whitening.py`, with its fallbacks.)
Every product reads the same shifted samples d = x − K (K the first sample, a constant) that the one-pass
moments read, and the centrings are folded into the products: y = S d − S(μ_c − K), dS = dyᵀd − (Σ dy)(μ_c − K)ᵀ,
so x − μ is never materialised, and with |μ − K| ~ σ the folding loses no digits even for a large mean.
The samples d are brought into the product layout once, with a column of ones (`group_products.to_layout`),
and kept as the residual: [d, 1]ᵀ[d, 1] gives Σd with dᵀd, dyᵀ[d, 1] gives Σdy with dS, and the offsets
(−S(μ_c − K), the dx offset) ride in the transforms' GEMMs, so no elementwise pass sits between a GEMM and
the single transpose back out of the batched layout. The layer's γ and β ride there too: the forward matrix
is [diag(γ) S, β − γ ⊙ S(μ_c − K)], dγ = rowdot(S, dyᵀd) − Σdy ⊙ S(μ_c − K) and dβ = Σdy come from the
same cross product, and γ scales the (G, g, ·) results instead of dy (2.3× faster at C = 240, BENCHMARKS.md).

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

from bw_jax.nn.group_products import (cross_in_layout, from_layout, moments_in_layout, per_platform,
                                   shifted_to_layout, to_layout, transform_in_layout, transform_sum_in_layout)

# (batch mean (C,), batch cov (G, g, g), state) -> ((centring mean (C,), S (G, g, g)), aux). `aux` carries
# no gradient (the running statistics the layer stores under stop_gradient).
StatisticsFn = Callable[[jax.Array, jax.Array, Any], tuple[tuple[jax.Array, jax.Array], Any]]

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


def _group_product(matrices: jax.Array, vector: jax.Array) -> jax.Array:
  """M_g v_g per group: (G, g, g), (C,) -> (C,)."""
  return jnp.einsum('gij,gj->gi', matrices, vector.reshape(matrices.shape[0], -1)).reshape(-1)


def _with_offset(matrices: jax.Array, offset: jax.Array) -> jax.Array:
  """[M_g, b_g] per group, for samples carrying ones: (G, g, g), (C,) -> (G, g, g + 1)."""
  return jnp.concatenate([matrices, offset.reshape(matrices.shape[0], -1, 1).astype(matrices.dtype)], axis=2)


Affine = tuple[jax.Array | None, jax.Array | None]  # (γ (C,) or None, β (C,) or None)


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


def _whiten_in_layout(ones: jax.Array, centre: jax.Array, whitening: jax.Array, affine: Affine,
                      layout: str) -> jax.Array:
  """y = γ ⊙ (S d − S μ) + β per group for shifted samples d in `layout` carrying ones, with μ shifted like
  d: centring and affine are the GEMM's matrix and offset column, so the result leaves the layout in one
  transpose and no elementwise pass over (m, C) follows it inside the layer."""
  return from_layout(transform_in_layout(ones, _affine_whitening(whitening, centre, affine), layout), layout)


def apply_whitening_folded(shifted: jax.Array, centre: jax.Array, whitening: jax.Array,
                           affine: Affine = (None, None), layout: str | None = None) -> jax.Array:
  """y = γ ⊙ (S d − S μ) + β per group, for samples d shifted by the constant that `centre` is shifted by:
  (m, C), (C,), (G, g, g), optional γ and β (C,) -> (m, C) in S's dtype."""
  groups = whitening.shape[0]
  return per_platform(shifted.shape[1], layout, lambda lay, d, c, s, a: _whiten_in_layout(
      to_layout(d, groups, lay, ones=True), c, s, a, lay), shifted, centre, whitening, affine,
                      group_size=whitening.shape[-1])


def _forward(statistics: StatisticsFn, groups: int, layout: str, x: jax.Array, state: Any, affine: Affine,
             keep_pullback: bool = True) -> tuple[tuple[jax.Array, Any], tuple[Any, ...]]:
  samples = x.reshape(-1, x.shape[-1])
  g = samples.shape[1] // groups
  # The shift K: the first sample, in the statistics dtype, a constant (see shifted_moments).
  shift = jax.lax.stop_gradient(samples[0]).astype(jnp.promote_types(x.dtype, jnp.float32))
  ones = shifted_to_layout(samples, shift, groups, layout)  # [x − K, 1], read by every product
  offset, cov = moments_in_layout(ones, g, layout, shift.dtype)
  mean = shift + offset
  if keep_pullback:
    (centre, whitening), pullback, aux = jax.vjp(statistics, mean, cov, state, has_aux=True)
  else:  # differentiated by autodiff as a whole: linearising `statistics` here would be wasted work
    (centre, whitening), aux = statistics(mean, cov, state)
    pullback = None
  y = _whiten_in_layout(ones, centre - shift, whitening, affine, layout).reshape(x.shape)
  dtype_token = jnp.zeros((0,), x.dtype)  # dx leaves in x's dtype
  return (y, aux), (ones, offset, centre - shift, whitening, affine, pullback, dtype_token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _closed_form(statistics: StatisticsFn, groups: int, layout: str, x: jax.Array, state: Any, affine: Affine):
  return _forward(statistics, groups, layout, x, state, affine, keep_pullback=False)[0]


def _closed_form_backward(statistics, groups, layout, residuals, cotangents):
  del statistics  # its derivative comes in as `pullback`
  ones, offset, centre, whitening, (scale, bias), pullback, dtype_token = residuals
  dy, _ = cotangents  # dy: the cotangent of the affine output γ ⊙ ŷ + β; aux: no gradient
  g = whitening.shape[-1]
  dy = dy.reshape(-1, groups * g).astype(whitening.dtype)
  m = dy.shape[0]
  dy_in_layout = to_layout(dy, groups, layout)
  cross = cross_in_layout(dy_in_layout, ones, g, layout, whitening.dtype, channels=groups * g)  # [dyᵀ(x − K), Σ dy]
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
  # the part through μ_b vanishes because the centred samples sum to zero.
  cov_weight = (d_cov + jnp.swapaxes(d_cov, -1, -2)) / (m - 1)
  dx_offset = d_mean / m - _group_product(cov_weight, offset)
  dx = transform_sum_in_layout([(dy_in_layout, jnp.swapaxes(applied, -1, -2)),  # (diag(γ) S)ᵀ on the raw dy
                                (ones, _with_offset(cov_weight, dx_offset))], layout)
  dx = from_layout(dx, layout).reshape(cotangents[0].shape).astype(dtype_token.dtype)
  return dx, d_state, (d_scale, d_bias)


_closed_form.defvjp(lambda *args: _forward(*args), _closed_form_backward)


def whiten_training(x: jax.Array, groups: int, statistics: StatisticsFn, state: Any = (), *,
                    scale: jax.Array | None = None, bias: jax.Array | None = None,
                    layout: str | None = None) -> tuple[jax.Array, Any]:
  """Whitens x with statistics derived from its batch moments, then scales and shifts it: y = γ ⊙ ŷ + β;
  the backward pass is in closed form.

  Args:
    x: (N, ..., C) activations, float32, bfloat16 or float64 (m = N·H·W samples).
    groups: G, the number of channel groups (C = G·g).
    statistics: a pure function (batch mean, batch cov, state) -> ((μ_c, S), aux); it must be a
      module-level function or a functools.partial of one with static keywords (it is a `nondiff_argnums`
      argument of a custom_vjp, so it may not close over traced arrays: pass those in `state`).
    state: arrays `statistics` needs (e.g. running statistics); they receive gradients.
    scale, bias: optional (C,) γ and β, applied inside the whitening GEMM (no pass of their own; their
      gradients come from the backward pass's cross product).
    layout: force a group-product layout of `group_products.LAYOUTS` (default: per platform).
  Returns:
    y (N, ..., C) in the statistics dtype (float32, or float64 for float64 input) and `aux`.
  """
  def whiten_in(layout: str, x: jax.Array, state: Any, affine: Affine) -> tuple[jax.Array, Any]:
    if _AUTODIFF.get():
      return _forward(statistics, groups, layout, x, state, affine, keep_pullback=False)[0]
    return _closed_form(statistics, groups, layout, x, state, affine)
  # The layout is chosen for the whole layer (forward and backward share their operands in it).
  return per_platform(x.shape[-1], layout, whiten_in, x, state, (scale, bias),
                      group_size=x.shape[-1] // groups)
