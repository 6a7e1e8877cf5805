"""Batch Whitening: decorrelate a batch of activations so that its covariance becomes the identity.

For m samples x_i ∈ R^C (the N·H·W pixels of an NHWC map), channels are split into G groups of g
consecutive channels and, per group (DESIGN.md §1):

  μ = mean(x)            Σ = 1/(m−1) Σ_i (x_i − μ)(x_i − μ)ᵀ      Σ_ε = Σ + ε·I
  y = S (x − μ)          with S(Σ_ε) = L⁻¹ (cholesky), UΛ^{-1/2}Uᵀ (zca), Λ^{-1/2}Uᵀ (pca)
                         or T Newton–Schulz steps towards Σ_ε^{-1/2} (newton, IterNorm)

The pure functions (`batch_moments`, `whitening_matrix`, `apply_whitening`) work without Flax; the Linen
module `BatchWhitening` is a thin drop-in for `flax.linen.BatchNorm` that keeps running statistics.
S is computed in `whitening_matrices.py`; the products over the activations in `group_products.py`; a
training step's backward pass is in closed form (`whitening_vjp.py`, `autodiff_backward()` to compare).
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

from flax import linen as nn
from flax.linen import initializers
import jax
import jax.numpy as jnp

from bw_jax.checks import check_choice, is_positive_int
from bw_jax.group_products import DENSE_MAX_CHANNELS, group_matmul, group_scatter, shifted_moments
from bw_jax.whitening_matrices import (  # the public names of the factorisations, re-exported
    FALLBACK_RIDGE, METHODS, align_row_signs, cholesky_whitening, newton_whitening, pca_whitening,
    stat_dtype, whitening_matrix, whitening_matrix_with_fallbacks, zca_whitening)
from bw_jax.whitening_vjp import apply_whitening_folded, autodiff_backward, whiten_training

STAT_SOURCES = ('batch', 'running')



# ----------------------------------------------------------------------------------------------------------
# Pure functions


def num_groups(channels: int, group_size: int | None) -> int:
  """Number of channel groups G; raises if `group_size` does not divide `channels`."""
  check_group_size(group_size)
  if group_size is None:
    return 1
  if channels % group_size:
    raise ValueError(
        f'group_size={group_size} does not divide the {channels} input channels; use a divisor of '
        f'{channels} (e.g. {fit_group_size(channels, group_size)}) or None to whiten all channels together.')
  return channels // group_size


def check_group_size(group_size: int | None) -> None:
  if group_size is not None and not is_positive_int(group_size):
    raise ValueError(f'group_size must be a positive int or None (all channels), got {group_size!r}.')


def fit_group_size(channels: int, group_size: int | None) -> int:
  """The largest divisor of `channels` not above `group_size` (all channels when None)."""
  if group_size is None or group_size >= channels:
    return channels
  return max(d for d in range(1, group_size + 1) if channels % d == 0)


def batch_moments(
    x: jax.Array,
    group_size: int | None = None,
    *,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    shift: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and unbiased per-group covariance of a batch, in float32.

  Args:
    x: (N, ..., C) activations; every position of every example is a sample (m = N·H·W for NHWC).
    group_size: g, channels per group (None: all C channels form one group).
    axis_name: under `shard_map`/`pmap`, the mapped batch axis: moments are averaged over it in a single
      collective and describe the global batch.
    axis_index_groups: optional device subsets to reduce over separately (see `jax.lax.psum`).
    shift: (C,) a value close to the mean (the running mean), subtracted before the one-pass moments used
      with `axis_name` to avoid cancellation; never differentiated. Without `axis_name` the first sample
      of the batch is the shift (`group_products.shifted_moments`).

  Returns:
    mean (C,) and cov (G, g, g) with the 1/(m−1) normalisation, m counted over all reduced devices;
    float32 (float64 for float64 input).
  """
  channels = x.shape[-1]
  groups = num_groups(channels, group_size)
  if axis_name is None:  # one pass, shifted by a sample; XLA inserts the collectives when x is sharded.
    samples = x.reshape(-1, channels)
    return shifted_moments(samples, groups, samples[0])
  samples = x.reshape(-1, channels).astype(stat_dtype(x.dtype))
  m = samples.shape[0]
  shift = jnp.zeros((channels,), samples.dtype) if shift is None else jax.lax.stop_gradient(shift)
  shifted = samples - shift
  local = (jnp.mean(shifted, axis=0), group_scatter(shifted, groups) / m)
  offset, second = jax.lax.pmean(local, axis_name, axis_index_groups=axis_index_groups)
  total = m * jax.lax.psum(1, axis_name, axis_index_groups=axis_index_groups)
  offset_g = offset.reshape(groups, -1)
  cov = (second - offset_g[:, :, None] * offset_g[:, None, :]) * (total / (total - 1))
  return offset + shift, cov


def apply_whitening(x: jax.Array, mean: jax.Array, whitening: jax.Array) -> jax.Array:
  """y = S (x − μ) per group: x (..., C), mean (C,), whitening (G, g, g) -> (..., C) in float32 or wider."""
  samples = x.reshape(-1, x.shape[-1])
  return apply_whitening_folded(samples, mean, whitening.astype(stat_dtype(x.dtype))).reshape(x.shape)


def _batch_statistics(mean: jax.Array, cov: jax.Array, state: Any, **settings: Any):
  """`whiten`'s statistics: the batch mean and S of the batch covariance (see `whiten_training`)."""
  del state
  return (mean, whitening_matrix(cov, **settings)), ()


def whiten(
    x: jax.Array, group_size: int | None = None, method: str = 'cholesky', epsilon: float = 1e-5,
    newton_iterations: int = 5,
) -> jax.Array:
  """Whiten a batch with its own statistics (training-mode BatchWhitening, no affine): (N, ..., C)."""
  groups = num_groups(x.shape[-1], group_size)
  statistics = functools.partial(_batch_statistics, method=method, epsilon=epsilon,
                                 newton_iterations=newton_iterations)
  return whiten_training(x, groups, statistics)[0]


def check_bw_settings(settings: Any) -> None:
  """Raises a ValueError naming the allowed values for any out-of-range BatchWhitening field of `settings`."""
  check_choice('method', settings.method, METHODS)
  check_choice('center_with', settings.center_with, STAT_SOURCES)
  check_choice('whiten_with', settings.whiten_with, STAT_SOURCES)
  if not 0.0 <= settings.momentum <= 1.0:
    raise ValueError(f'momentum must lie in [0, 1], got {settings.momentum}.')
  if not settings.epsilon > 0.0:
    raise ValueError(f'epsilon must be > 0 (it keeps Σ + ε·I positive definite), got {settings.epsilon}.')
  if not is_positive_int(settings.newton_iterations):
    raise ValueError(f'newton_iterations must be a positive int, got {settings.newton_iterations!r}.')
  check_group_size(settings.group_size)


@dataclasses.dataclass(frozen=True)
class BWSettings:
  """The BatchWhitening fields a model gives every BW layer (the config's `bw.*`; same names).

  Defaults follow EfficientNet's BatchNorm (momentum 0.99, ε 1e-3) with groups of 16 channels.
  """

  method: str = 'cholesky'
  group_size: int | None = 16
  momentum: float = 0.99
  epsilon: float = 1e-3
  center_with: str = 'batch'
  whiten_with: str = 'batch'
  newton_iterations: int = 5

  def __post_init__(self):
    check_bw_settings(self)

  def layer(self, channels: int, **kwargs: Any) -> 'BatchWhitening':
    """A BatchWhitening for `channels` inputs; the group size becomes the largest divisor of `channels`
    not above `group_size` (`fit_group_size`), so one setting serves layers of any width."""
    fields = dataclasses.asdict(self)
    fields['group_size'] = fit_group_size(channels, self.group_size)
    return BatchWhitening(**fields, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Flax module


class BatchWhitening(nn.Module):
  """Batch Whitening: a drop-in for `flax.linen.BatchNorm` that also decorrelates channels.

  Input (N, ..., C), channels last; output the same shape, in `dtype` (default: the input's dtype).
  Statistics are float32 whatever the input dtype. Running statistics live in `batch_stats`:

    mean (C,) init 0;  cov (G, g, g) init I;  whitening (G, g, g) init I = S(cov) of the updated cov;
    fallbacks () — number of group factorisations (of the batch S and of the running S) in training
      steps that needed a fallback;
    skipped_updates () — training steps whose batch moments were not finite and were left out (also
      inputs so large, |x| ≳ 1e18 in float32, that the covariance overflows: such a step outputs zeros).
    Both counters are int32.

  A training step updates `stat ← momentum·stat + (1−momentum)·batch_stat` (Flax convention) for mean and
  the unbiased cov (without ridge), then recomputes `whitening`; `init` updates nothing. In eval
  (`use_running_average=True`) y = whitening·(x − mean): no factorisation.

  Attributes:
    use_running_average: use the stored statistics (eval) instead of the batch's (training).
    momentum: decay of the exponential moving averages.
    epsilon: ridge ε added to the covariance diagonal before factorising.
    dtype: output dtype (None: the input's).
    param_dtype: dtype of γ and β.
    use_bias: add a learned per-channel β after whitening.
    use_scale: multiply by a learned per-channel γ after whitening.
    bias_init: initialiser of β.
    scale_init: initialiser of γ.
    axis_name: the mapped batch axis under `shard_map`/`pmap` (not needed under `jax.jit` sharding).
    axis_index_groups: device subsets reduced separately along `axis_name` (under `shard_map` JAX 0.10
      supports this only with `check_vma=False`).
    group_size: g, channels per group (must divide C); None whitens all C channels together.
    method: 'cholesky' (default), 'zca', 'pca' or 'newton': how S is computed from Σ + ε·I.
    newton_iterations: Newton–Schulz steps T for method='newton'.
    center_with: 'batch' centres training inputs on the batch mean; 'running' on the freshly updated
      running mean (gradients flow through its (1−momentum)·batch part).
    whiten_with: 'batch' or 'running': likewise for the covariance that S is computed from.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., jax.Array] = initializers.zeros
  scale_init: Callable[..., jax.Array] = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  group_size: int | None = None
  method: str = 'cholesky'
  newton_iterations: int = 5
  center_with: str = 'batch'
  whiten_with: str = 'batch'

  def __post_init__(self):
    check_bw_settings(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """Whitens x: (N, ..., C) -> (N, ..., C)."""
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    if x.ndim < 2:
      raise ValueError(f'BatchWhitening expects (N, ..., C) with a batch and a channel axis; got shape '
                       f'{x.shape}.')
    channels = x.shape[-1]
    groups = num_groups(channels, self.group_size)
    g = channels // groups
    stacked_eye = lambda: jnp.tile(jnp.eye(g, dtype=jnp.float32), (groups, 1, 1))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_cov = self.variable('batch_stats', 'cov', stacked_eye)
    ra_whitening = self.variable('batch_stats', 'whitening', stacked_eye)
    fallbacks = self.variable('batch_stats', 'fallbacks', lambda: jnp.zeros((), jnp.int32))
    skipped = self.variable('batch_stats', 'skipped_updates', lambda: jnp.zeros((), jnp.int32))

    if use_running_average:
      y = apply_whitening(x, ra_mean.value, ra_whitening.value)
    else:
      # As in flax's BatchNorm, `init` runs outside shard_map/pmap: the axis may not exist yet.
      axis_name = None if self.is_initializing() else self.axis_name
      samples = x.size // channels
      if axis_name is None and samples < 2:
        raise ValueError(f'BatchWhitening needs at least 2 samples per batch in training to estimate a '
                         f'covariance; got shape {x.shape} ({samples} sample). Use a larger batch or '
                         f'use_running_average=True.')
      update_stats = not self.is_initializing()
      statistics = functools.partial(
          training_statistics, method=self.method, epsilon=self.epsilon,
          newton_iterations=self.newton_iterations, momentum=self.momentum, center_with=self.center_with,
          whiten_with=self.whiten_with, running_whitening=update_stats and self.whiten_with == 'batch')
      running = (ra_mean.value, ra_cov.value, ra_whitening.value)
      if axis_name is None:  # the closed-form backward pass (whitening_vjp.py)
        y, (new_mean, new_cov, new_whitening, fell_back, finite) = whiten_training(x, groups, statistics,
                                                                                  running)
      else:  # per-device moments and one collective, differentiated by autodiff
        batch = batch_moments(x, self.group_size, axis_name=axis_name,
                              axis_index_groups=self.axis_index_groups, shift=ra_mean.value)
        (mean, whitening), (new_mean, new_cov, new_whitening, fell_back, finite) = statistics(*batch, running)
        y = apply_whitening(x, mean, whitening)
      if update_stats:
        keep_if_finite = lambda new, old: jnp.where(finite, jax.lax.stop_gradient(new), old).astype(old.dtype)
        ra_mean.value = keep_if_finite(new_mean, ra_mean.value)
        ra_cov.value = keep_if_finite(new_cov, ra_cov.value)
        ra_whitening.value = keep_if_finite(new_whitening, ra_whitening.value)
        fallbacks.value += jnp.sum(fell_back & finite, dtype=jnp.int32)
        skipped.value += (~finite).astype(jnp.int32)

    if self.use_scale:
      y = y * self.param('scale', self.scale_init, (channels,), self.param_dtype).astype(y.dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (channels,), self.param_dtype).astype(y.dtype)
    return y.astype(self.dtype or x.dtype)


def training_statistics(
    batch_mean: jax.Array, batch_cov: jax.Array, running: tuple[jax.Array, jax.Array, jax.Array], *,
    method: str, epsilon: float, newton_iterations: int, momentum: float, center_with: str,
    whiten_with: str, running_whitening: bool,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
  """A training step's (μ_c, S) and updated running statistics, from the batch moments: the (C,) and
  (G, g, g) part of BatchWhitening, which `whiten_training` differentiates by autodiff.

  Args:
    batch_mean, batch_cov: (C,), (G, g, g) moments of the batch.
    running: the stored (mean, cov, whitening).
    running_whitening: also factorise the updated running covariance (for eval), in the same batched call.
  Returns:
    (μ_c (C,), S (G, g, g)) and (new mean, new cov, new whitening, fell_back (G or 2G,), finite ()).
  """
  ra_mean, ra_cov, ra_whitening = running
  groups = batch_cov.shape[0]
  new_mean, new_cov = ema(ra_mean, batch_mean, momentum), ema(ra_cov, batch_cov, momentum)
  mean = batch_mean if center_with == 'batch' else new_mean
  covs = [batch_cov if whiten_with == 'batch' else new_cov]
  if running_whitening:
    covs.append(jax.lax.stop_gradient(new_cov))
  whitenings, fell_back = whitening_matrix_with_fallbacks(jnp.concatenate(covs), method, epsilon,
                                                          newton_iterations)
  if method == 'pca':
    whitenings = align_row_signs(whitenings, jnp.tile(ra_whitening, (len(covs), 1, 1)))
  finite = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_cov))
  return (mean, whitenings[:groups]), (new_mean, new_cov, whitenings[-groups:], fell_back, finite)


def ema(running: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
  """Flax's running-average convention: momentum·running + (1 − momentum)·batch."""
  return momentum * running + (1.0 - momentum) * batch
