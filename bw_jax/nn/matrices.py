"""The whitening matrix S of a covariance, per group: Cholesky, ZCA, PCA or Newton–Schulz, with fallbacks.

Small (G, g, g) work, differentiable (Cholesky by a hand-written rule from S alone, ZCA/PCA through
`spectral`); `whitening.py` applies S to the activations.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.nn import kernels
from bw_jax.nn import spectral
from bw_jax.checks import check_choice
from bw_jax.nn.dtypes import accumulation_dtype

METHODS = ('cholesky', 'zca', 'pca', 'newton')

# Fallback ridge, relative to the mean eigenvalue tr(Σ)/g: large enough to dominate float32 round-off in
# Σ (~g·1e-7 relative), small enough to leave a well-conditioned group almost untouched.
FALLBACK_RIDGE = 1e-3

# The Cholesky kernel's lanes hold 16 groups' (g, g) matrices at once (16·g² values, in L1 up to g = 32); past
# that LAPACK's blocked factorisation of one matrix at a time wins (the crossover is in BENCHMARKS.md).
CHOLESKY_KERNEL_MAX_GROUP_SIZE = 32


def _eye_like(cov: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)


def _add_ridge(cov: jax.Array, ridge: jax.Array) -> jax.Array:
  """cov (G, g, g) + ridge (G,) · I."""
  return cov + ridge[:, None, None] * _eye_like(cov)


def cholesky_whitening(cov: jax.Array) -> jax.Array:
  """S = L⁻¹ with Σ = L Lᵀ: (G, g, g) -> (G, g, g), lower-triangular."""
  lower = jnp.linalg.cholesky(cov)
  return jax.scipy.linalg.solve_triangular(lower, _eye_like(cov), lower=True)


def zca_whitening(cov: jax.Array) -> jax.Array:
  """S = U Λ^{-1/2} Uᵀ (symmetric; the whitening closest to the identity): (G, g, g) -> (G, g, g)."""
  return spectral.inverse_sqrtm(cov)


def pca_whitening(cov: jax.Array) -> jax.Array:
  """S = Λ^{-1/2} Uᵀ (rotates onto the principal axes, ascending eigenvalues): (G, g, g) -> (G, g, g)."""
  w, u = spectral.safe_eigh(cov)
  return jax.lax.rsqrt(w)[..., :, None] * jnp.swapaxes(u, -1, -2)


def newton_whitening(cov: jax.Array, iterations: int = 5, *, unroll: bool | None = None) -> jax.Array:
  """IterNorm: S ≈ Σ^{-1/2} by `iterations` Newton–Schulz steps on Σ/tr(Σ): (G, g, g) -> (G, g, g).

  IterNorm's P₀ = I, P_k = ½(3P_{k−1} − P_{k−1}³ Σ_N) with Σ_N = Σ/tr(Σ) (eigenvalues in (0, 1], so it
  converges), then S = P_T / √tr(Σ). That recursion amplifies round-off once Σ is ill-conditioned (Higham,
  Functions of Matrices §6.4), so we run the coupled form with the same iterates in exact arithmetic:
  Y₀ = Σ_N, Z₀ = I, T = ½(3I − Z Y), Y ← Y T, Z ← T Z, and Z_k = P_k. Matrix products only.

  `unroll` (default: per platform) unrolls the loop: on accelerators a while loop may read its condition back
  on the host every iteration; the CPU keeps the rolled loop, which compiles faster. Same operations.
  """
  trace = jnp.trace(cov, axis1=-2, axis2=-1)[:, None, None]
  eye = _eye_like(cov)

  def step(_, yz):
    y, z = yz
    t = 0.5 * (3.0 * eye - z @ y)
    return y @ t, t @ z

  def iterate(unrolled: bool) -> jax.Array:
    if not unrolled:
      return jax.lax.fori_loop(0, iterations, step, (cov / trace, eye))[1]
    yz = (cov / trace, eye)
    for i in range(iterations):
      yz = step(i, yz)
    return yz[1]

  z = cpu_or_accelerator_form(unroll, lambda: iterate(False), lambda: iterate(True))
  return z * jax.lax.rsqrt(trace)


def cholesky_kernel_applies(group_size: int) -> bool:
  """Whether a CPU computes Cholesky's trials with the `bw_jax.nn.kernels` kernel (lane-parallel over groups;
  where the kernels are built and for g ≤ CHOLESKY_KERNEL_MAX_GROUP_SIZE) rather than with LAPACK and XLA's
  triangular solve."""
  return group_size <= CHOLESKY_KERNEL_MAX_GROUP_SIZE and kernels.available()


def cpu_or_accelerator_form(accelerator_choice: bool | None, cpu: Callable[[], Any],
                            accelerator: Callable[[], Any]) -> Any:
  """`accelerator()` if accelerator_choice, `cpu()` if False; None: decided per platform at lowering
  (`jax.lax.platform_dependent`, so that an export for cuda/tpu from a CPU host gets the accelerator form)."""
  if accelerator_choice is None:
    return jax.lax.platform_dependent(cpu=cpu, default=accelerator)
  return accelerator() if accelerator_choice else cpu()


def _whitening_fn(method: str, newton_iterations: int, unroll: bool | None = None,
                  ) -> Callable[[jax.Array], jax.Array]:
  check_choice('method', method, METHODS)
  if method == 'newton':
    return functools.partial(newton_whitening, iterations=newton_iterations, unroll=unroll)
  return {'cholesky': cholesky_whitening, 'zca': zca_whitening, 'pca': pca_whitening}[method]


def _is_usable(whitening: jax.Array, ridge: jax.Array, cov: jax.Array | None = None) -> jax.Array:
  """Per group: finite, and no larger than the ridge allows. (G, g, g), (G,) -> (G,) bool.

  For every method ‖S‖₂ ≤ λ_min(Σ + ridge·I)^{-1/2} ≤ ridge^{-1/2}; a factorisation that round-off drove
  through a near-zero pivot or eigenvalue breaks this bound (factor 2 of slack) or is NaN.

  With `cov` (the factorised Σ + ridge·I; Cholesky's S = L⁻¹ only), also every pivot L_jj² = 1/S_jj² must
  stand above its own round-off, `cholesky_pivot_floor`: a pivot below it is noise whose sign decides
  whether a factorisation fails, so that two implementations (LAPACK, the CPU kernel) would disagree.
  """
  finite = jnp.all(jnp.isfinite(whitening), axis=(-2, -1))
  largest = jnp.max(jnp.abs(jnp.where(jnp.isfinite(whitening), whitening, 0.0)), axis=(-2, -1))
  usable = finite & (largest <= 2.0 * jax.lax.rsqrt(ridge))
  if cov is None:
    return usable
  pivots = 1.0 / jnp.square(jnp.diagonal(whitening, axis1=-2, axis2=-1))
  return usable & jnp.all(pivots > cholesky_pivot_floor(jnp.diagonal(cov, axis1=-2, axis2=-1)), axis=-1)


def cholesky_pivot_floor(diagonal: jax.Array) -> jax.Array:
  """The round-off of Cholesky's pivots of a (…, g, g) matrix with this (…, g) diagonal: L_jj² is a_jj less
  up to g squares, computed with relative error ≲ (g + 1)·eps·a_jj (Higham, Accuracy and Stability of
  Numerical Algorithms, Thm. 10.3). The CPU kernel (`bw_jax/nn/kernels/cholesky.cc`) applies the same floor."""
  g = diagonal.shape[-1]
  return (g + 1) * jnp.finfo(diagonal.dtype).eps * diagonal


def whitening_matrix_with_fallbacks(
    cov: jax.Array, method: str = 'cholesky', epsilon: float = 1e-5, newton_iterations: int = 5, *,
    accelerator_form: bool | None = None, differentiable_groups: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """S for Σ + ε·I, per group, never NaN for a finite Σ; and which groups needed a fallback.

  A group whose factorisation of Σ + ε·I fails (rank deficiency at a scale where ε drowns in round-off)
  is retried with the scale-relative ridge ε + FALLBACK_RIDGE·tr(Σ)/g, then standardised on its diagonal
  only. Trials run without gradients, so that no NaN of a rejected trial can leak into the backward pass;
  the gradient is then attached to the chosen matrix — from the chosen S alone for Cholesky, by
  factorising the chosen matrix once more for the other methods.

  On a CPU the retry runs only when some group needs it (`lax.cond`), and Cholesky's two trials are one call
  of the CPU kernel where it applies (`cholesky_kernel_applies`); on accelerators, where a conditional may
  wait for its predicate on the host, the retry always runs and is selected per group, and Newton's loop is
  unrolled. The forms give the same result up to rounding, and the same fallbacks (`accelerator_form`: None
  decides per platform at lowering, True/False force one, for tests).

  Args:
    cov: (G, g, g) covariance (no ridge); symmetrised here.
    differentiable_groups: only the first this many groups get a derivative (default: all); the others'
      S is returned under stop_gradient, and the backward pass does no work for them. For callers that
      factorise covariances that need no gradient in the same batched call (`training_statistics`).
  Returns:
    S (G, g, g) in the statistics dtype and fell_back (G,) bool.
  """
  factorise = _whitening_fn(method, newton_iterations, accelerator_form)
  cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2)).astype(accumulation_dtype(cov.dtype))
  g = cov.shape[-1]
  variances = jnp.maximum(jnp.diagonal(cov, axis1=-2, axis2=-1), 0.0)
  exact = jnp.full(cov.shape[:1], epsilon, cov.dtype)
  relative = epsilon + FALLBACK_RIDGE * jnp.sum(variances, axis=-1) / g
  exact_cov, relative_cov = _add_ridge(cov, exact), _add_ridge(cov, relative)

  def trials(accelerator: bool):
    """(exact trial, exact_ok, relative trial, relative_ok), without gradients."""
    if method == 'cholesky' and not accelerator and cholesky_kernel_applies(g):
      # Both trials in one CPU kernel call: its S is the exact trial where usable, else the retry.
      trial, exact_ok, relative_ok = kernels.cholesky_trials(
          jax.lax.stop_gradient(cov), exact, jax.lax.stop_gradient(relative))
      return trial, exact_ok, trial, relative_ok
    pivots_of = lambda c: c if method == 'cholesky' else None
    exact_trial = factorise(jax.lax.stop_gradient(exact_cov))
    exact_ok = _is_usable(exact_trial, exact, pivots_of(exact_cov))

    def retry():
      trial = factorise(jax.lax.stop_gradient(relative_cov))
      return trial, _is_usable(trial, relative, pivots_of(relative_cov))
    if accelerator:
      return exact_trial, exact_ok, *retry()
    # lax.cond runs one branch: the common case, where every group factorises, pays for no retry. Where no
    # retry ran, `pick` never reads its result: exact_ok holds for every group.
    return exact_trial, exact_ok, *jax.lax.cond(jnp.all(exact_ok), lambda: (exact_trial, exact_ok), retry)

  exact_trial, exact_ok, relative_trial, relative_ok = cpu_or_accelerator_form(
      accelerator_form, lambda: trials(False), lambda: trials(True))
  diagonal = jax.vmap(jnp.diag)(jax.lax.rsqrt(variances + relative[:, None]))
  usable = exact_ok | relative_ok
  # Groups past `differentiable_groups` take their trial as it is: no derivative to attach.
  n = cov.shape[0] if differentiable_groups is None else differentiable_groups
  head_exact_ok, head_relative_ok = exact_ok[:n, None, None], relative_ok[:n, None, None]
  pick = lambda first, second, otherwise: jnp.where(
      head_exact_ok, first[:n], jnp.where(head_relative_ok, second[:n], otherwise[:n]))
  eye = _eye_like(cov)
  chosen = pick(exact_cov, relative_cov, eye)
  if method == 'cholesky':
    chosen_whitening = _cholesky_whitening_given(chosen, pick(exact_trial, relative_trial, eye))
  else:
    chosen_whitening = factorise(chosen)
  whitening = jnp.where(usable[:n, None, None], chosen_whitening, diagonal[:n])
  if n < cov.shape[0]:
    trial = jnp.where(exact_ok[n:, None, None], exact_trial[n:], relative_trial[n:])
    rest = jnp.where(usable[n:, None, None], trial, diagonal[n:])
    whitening = jnp.concatenate([whitening, jax.lax.stop_gradient(rest)])
  return whitening, ~exact_ok


@jax.custom_jvp
def _cholesky_whitening_given(cov: jax.Array, whitening: jax.Array) -> jax.Array:
  """Returns `whitening` = L⁻¹ of `cov`, already computed, with the derivative of L⁻¹ w.r.t. `cov`."""
  del cov
  return whitening


@_cholesky_whitening_given.defjvp
def _cholesky_whitening_given_jvp(primals, tangents):
  # From Σ = L Lᵀ: L⁻¹ dΣ L⁻ᵀ = L⁻¹dL + (L⁻¹dL)ᵀ with L⁻¹dL lower-triangular, so L⁻¹dL = Φ(S dΣ Sᵀ)
  # (Φ: lower triangle, halved diagonal) and dS = −S dL S = −Φ(S dΣ Sᵀ) S. Needs S only: no refactorising.
  (cov, s), (dcov, _) = primals, tangents
  s = _cholesky_whitening_given(cov, jax.lax.stop_gradient(s))  # so that this rule differentiates again
  s_t = jnp.swapaxes(s, -1, -2)
  p = _small_matmul(_small_matmul(s, 0.5 * (dcov + jnp.swapaxes(dcov, -1, -2))), s_t)
  phi = jnp.tril(p, -1) + 0.5 * _eye_like(p) * p
  return s, -_small_matmul(phi, s)


# Up to this g, `_small_matmul` multiplies by broadcasting and summing (one loop fusion of (G, g, g, g)).
SMALL_MATMUL_MAX_SIZE = 32


def _small_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b for (G, g, g) stacks. For small g as a broadcast product summed over k: its transpose (in the
  backward pass) is the same kind of loop, where a dot would become Sᵀ(·), a dot contracting its lhs's rows,
  which XLA's CPU runs several times slower than a plain one (BENCHMARKS.md) and which XLA's
  transpose folding brings back whatever the operands' written order."""
  if a.shape[-1] > SMALL_MATMUL_MAX_SIZE:
    return a @ b
  return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def align_row_signs(whitening: jax.Array, reference: jax.Array) -> jax.Array:
  """Flip rows of S to agree in sign with `reference`'s: (G, g, g), (G, g, g) -> (G, g, g).

  PCA's rows are eigenvectors, each defined up to its sign, so S of two similar covariances may differ by
  flipped rows, i.e. flipped output channels. Aligning every new S to the stored one keeps channels
  consistent between steps and between training and eval (it cannot help when two eigenvalues cross and
  their rows swap).
  """
  dots = jnp.sum(whitening * reference, axis=-1, keepdims=True)
  return whitening * jax.lax.stop_gradient(jnp.where(dots < 0, -1.0, 1.0).astype(whitening.dtype))


def whitening_matrix(
    cov: jax.Array, method: str = 'cholesky', epsilon: float = 1e-5, newton_iterations: int = 5
) -> jax.Array:
  """S(Σ + ε·I) for each group: (G, g, g) -> (G, g, g). See `whitening_matrix_with_fallbacks`."""
  return whitening_matrix_with_fallbacks(cov, method, epsilon, newton_iterations)[0]
