"""Symmetric eigendecompositions whose gradients survive repeated eigenvalues.

The textbook derivative of `eigh` divides by λ_j − λ_i, which is infinite when two eigenvalues coincide —
and they do in practice: a group of constant (dead) channels whitened with a ridge ε has ε repeated. ZCA
and PCA whitening are built on these two functions instead of differentiating `jnp.linalg.eigh` directly.
"""

import jax
import jax.numpy as jnp


def _transpose(a: jax.Array) -> jax.Array:
  return jnp.swapaxes(a, -1, -2)


def _coincide(w: jax.Array) -> jax.Array:
  """Pairs (i, j) of eigenvalues too close for a stable 1/(λ_j − λ_i): (..., n) -> (..., n, n) bool."""
  # sqrt(machine eps) relative gap: below it the divided difference loses half its digits to cancellation.
  tolerance = jnp.sqrt(jnp.finfo(w.dtype).eps)
  gap = jnp.abs(w[..., None, :] - w[..., :, None])
  size = jnp.maximum(jnp.abs(w[..., None, :]), jnp.abs(w[..., :, None]))
  return gap <= tolerance * size


def _in_eigenbasis(u: jax.Array, da: jax.Array) -> jax.Array:
  """Uᵀ sym(dA) U: the tangent of a symmetric matrix seen in its eigenbasis."""
  return _transpose(u) @ (0.5 * (da + _transpose(da))) @ u


@jax.custom_jvp
def safe_eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of symmetric `a`: (..., n, n) -> ((..., n), (..., n, n)).

  Forward is `jnp.linalg.eigh`. In the derivative, the rotation within a cluster of (nearly) equal
  eigenvalues — which is undefined — is set to zero instead of infinity.
  """
  return jnp.linalg.eigh(a)


@safe_eigh.defjvp
def _safe_eigh_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  w, u = jnp.linalg.eigh(a)
  p = _in_eigenbasis(u, da)
  gap = w[..., None, :] - w[..., :, None]  # gap[i, j] = λ_j − λ_i
  close = _coincide(w)
  f = jnp.where(close, 0.0, 1.0 / jnp.where(close, 1.0, gap))
  dw = jnp.diagonal(p, axis1=-2, axis2=-1)
  du = u @ (f * p)
  return (w, u), (dw, du)


@jax.custom_jvp
def inverse_sqrtm(a: jax.Array) -> jax.Array:
  """Symmetric inverse square root U Λ^{-1/2} Uᵀ of a symmetric positive definite `a`: (..., n, n).

  The derivative is the Daleckii–Krein formula U [K ∘ (Uᵀ dA U)] Uᵀ with K_ij the divided difference
  (λ_i^{-1/2} − λ_j^{-1/2}) / (λ_i − λ_j), which tends to the derivative −½λ^{-3/2} when λ_i = λ_j:
  finite and exact for repeated eigenvalues, where differentiating through `eigh` gives inf.
  """
  w, u = jnp.linalg.eigh(a)
  return (u * jax.lax.rsqrt(w)[..., None, :]) @ _transpose(u)


@inverse_sqrtm.defjvp
def _inverse_sqrtm_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  w, u = jnp.linalg.eigh(a)
  f = jax.lax.rsqrt(w)
  close = _coincide(w)
  gap = w[..., :, None] - w[..., None, :]
  midpoint = 0.5 * (w[..., :, None] + w[..., None, :])
  derivative_at_midpoint = -0.5 * midpoint ** -1.5
  divided = (f[..., :, None] - f[..., None, :]) / jnp.where(close, 1.0, gap)
  kernel = jnp.where(close, derivative_at_midpoint, divided)
  s = (u * f[..., None, :]) @ _transpose(u)
  return s, u @ (kernel * _in_eigenbasis(u, da)) @ _transpose(u)
