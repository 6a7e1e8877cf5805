"""The small part of a training step: from the batch moments to (μ_c, S) and the updated running statistics.

(C,) and (G, g, g) work only; `vjp.whiten_training` runs it between the products over the activations and
differentiates it (its pullback feeds the closed-form backward pass). Each is a frozen dataclass: hashable
by value, so that its settings key the compiled layer (`jax.jit` static arguments).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.nn.matrices import align_row_signs, whitening_matrix, whitening_matrix_with_fallbacks


def estimable(count: Any) -> Any:
  """Whether `count` samples estimate a covariance (at least 2): a Python bool for a static count."""
  return count >= 2


def identity_unless(condition: Any, whitening: jax.Array) -> jax.Array:
  """`whitening` where `condition` holds, else the identity per group (a batch that estimates no spread is
  centred and not scaled, as BatchNorm's x − μ = 0 for one sample): (G, g, g) -> (G, g, g)."""
  eye = jnp.broadcast_to(jnp.eye(whitening.shape[-1], dtype=whitening.dtype), whitening.shape)
  if not isinstance(condition, jax.Array):  # a static count: no select in the program
    return whitening if condition else eye
  return jnp.where(condition, whitening, eye)


def ema(running: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
  """Flax's running-average convention: momentum·running + (1 − momentum)·batch."""
  return momentum * running + (1.0 - momentum) * batch


@dataclasses.dataclass(frozen=True)
class BatchStatistics:
  """`whiten`'s statistics: the batch mean and S of the batch covariance; no state, no aux."""

  method: str = 'cholesky'
  epsilon: float = 1e-5
  newton_iterations: int = 5

  def __call__(self, mean: jax.Array, cov: jax.Array, count: Any, state: Any):
    del state
    whitening = whitening_matrix(cov, self.method, self.epsilon, self.newton_iterations)
    return (mean, identity_unless(estimable(count), whitening)), ()


@dataclasses.dataclass(frozen=True)
class TrainingStatistics:
  """A training step of BatchWhitening from its batch moments (the module's fields of the same names).

  Called as (batch mean (C,), batch cov (G, g, g), count, running (mean, cov, whitening)) ->
  ((μ_c (C,), S (G, g, g)), (new mean, new cov, new whitening, fell_back (G or 2G,), updated ())).
  `updated`: the batch enters the running statistics (finite moments of at least 2 samples); else S is the
  identity when the batch has fewer than 2 samples. `running_whitening`: also factorise the updated running
  covariance (for eval), in the same batched call.
  """

  method: str
  epsilon: float
  newton_iterations: int
  momentum: float
  center_with: str
  whiten_with: str
  running_whitening: bool

  def __call__(self, batch_mean: jax.Array, batch_cov: jax.Array, count: Any,
               running: tuple[jax.Array, jax.Array, jax.Array]):
    ra_mean, ra_cov, ra_whitening = running
    groups = batch_cov.shape[0]
    new_mean, new_cov = ema(ra_mean, batch_mean, self.momentum), ema(ra_cov, batch_cov, self.momentum)
    mean = batch_mean if self.center_with == 'batch' else new_mean
    covs = [batch_cov if self.whiten_with == 'batch' else new_cov]
    if self.running_whitening:
      covs.append(jax.lax.stop_gradient(new_cov))
    whitenings, fell_back = whitening_matrix_with_fallbacks(jnp.concatenate(covs), self.method, self.epsilon,
                                                            self.newton_iterations, differentiable_groups=groups)
    if self.method == 'pca':
      whitenings = align_row_signs(whitenings, jnp.tile(ra_whitening, (len(covs), 1, 1)))
    finite = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_cov))
    whitening = identity_unless(estimable(count), whitenings[:groups])
    return (mean, whitening), (new_mean, new_cov, whitenings[-groups:], fell_back, finite & estimable(count))
