"""Batch Whitening: decorrelate a batch of activations so that its covariance becomes the identity.

For m samples x_i ∈ R^C (the N·H·W pixels of an NHWC map), channels are split into G groups of g
consecutive channels and, per group (docs/design.md §1):

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
from flax.linen.dtypes import canonicalize_dtype
import jax
import jax.numpy as jnp

from bw_jax.checks import check_choice, is_positive_int
from bw_jax.nn.dtypes import accumulation_dtype
from bw_jax.nn.group_products import DENSE_MAX_CHANNELS, group_cross, group_matmul, shifted_moments
from bw_jax.nn.matrices import (  # the public names of the factorisations, re-exported
    FALLBACK_RIDGE, METHODS, align_row_signs, cholesky_whitening, newton_whitening, pca_whitening,
    whitening_matrix, whitening_matrix_with_fallbacks, zca_whitening)
from bw_jax.nn.vjp import apply_whitening_folded, autodiff_backward, autodiff_enabled, whiten_training

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
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and unbiased per-group covariance of a batch, in float32.

  Args:
    x: (N, ..., C) activations; every position of every example is a sample (m = N·H·W for NHWC).
    group_size: g, channels per group (None: all C channels form one group).
    axis_name: under `shard_map`/`pmap`, the mapped batch axis: moments are summed over it in a single
      collective and describe the global batch.
    axis_index_groups: optional device subsets to reduce over separately (see `jax.lax.psum`).
    shift: (C,) a value close to the mean (the running mean), subtracted before the one-pass moments used
      with `axis_name` to avoid cancellation; never differentiated. Without it: the first included sample
      (`group_products.shifted_moments`), or 0 with `axis_name`.
    mask: (N, ...) booleans broadcastable to x.shape[:-1]: the samples the moments count (True), as
      BatchNorm's mask but one value for all channels of a sample. m is the number of True samples.

  Returns:
    mean (C,) and cov (G, g, g) with the 1/(m−1) normalisation, m counted over all reduced devices;
    float32 (float64 for float64 input).
  """
  channels = x.shape[-1]
  groups = num_groups(channels, group_size)
  if axis_name is None and mask is None:  # one pass, shifted by a sample; XLA inserts any collectives.
    samples = x.reshape(-1, channels)
    return shifted_moments(samples, groups, samples[0])
  samples = x.reshape(-1, channels).astype(accumulation_dtype(x.dtype))
  if mask is None:
    weights = jnp.ones(samples.shape[:1], samples.dtype)
  else:
    weights = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape[:-1]).reshape(-1).astype(samples.dtype)
  if shift is None:  # the first included sample; under axis_name a shift common to all devices: 0
    shift = jnp.zeros((channels,), samples.dtype) if axis_name is not None else samples[jnp.argmax(weights)]
  shift = jax.lax.stop_gradient(shift).astype(samples.dtype)  # its influence on the moments cancels
  shifted = samples - shift
  weighted = shifted * weights[:, None]
  sums = (jnp.sum(weights), jnp.sum(weighted, axis=0), group_cross(weighted, shifted, groups,
                                                                   accumulate=samples.dtype))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  count, total, second = sums
  offset = total / count
  offset_g = offset.reshape(groups, -1)
  cov = (second - count * offset_g[:, :, None] * offset_g[:, None, :]) / (count - 1)
  return offset + shift, cov


def apply_whitening(x: jax.Array, mean: jax.Array, whitening: jax.Array, scale: jax.Array | None = None,
                    bias: jax.Array | None = None) -> jax.Array:
  """y = S (x − μ) per group, then γ ⊙ y + β if given: x (..., C), mean (C,), whitening (G, g, g), scale and
  bias (C,) -> (..., C) in float32 or wider. One GEMM per group (the affine folded into its matrix)."""
  samples = x.reshape(-1, x.shape[-1])
  return apply_whitening_folded(samples, mean, whitening.astype(accumulation_dtype(x.dtype)),
                                (scale, bias)).reshape(x.shape)


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
  if is_traced(x):
    return _whiten(x, groups=groups, method=method, epsilon=epsilon, newton_iterations=newton_iterations)
  # Called eagerly: one compiled program, as BatchWhitening's (the same operations, rounded alike).
  return _whiten_compiled(x, groups=groups, method=method, epsilon=epsilon, newton_iterations=newton_iterations,
                          autodiff=autodiff_enabled())


def _whiten(x: jax.Array, *, groups: int, **settings: Any) -> jax.Array:
  """`whiten` with G = `groups` and the settings of `whitening_matrix`."""
  return whiten_training(x, groups, functools.partial(_batch_statistics, **settings))[0]


@functools.partial(jax.jit, static_argnames=('groups', 'method', 'epsilon', 'newton_iterations', 'autodiff'))
def _whiten_compiled(x: jax.Array, *, autodiff: bool, **settings: Any) -> jax.Array:
  with autodiff_backward(autodiff):
    return _whiten(x, **settings)


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


HEALTH_COLLECTION = 'bw_health'
HEALTH_COUNTERS = ('fallbacks', 'skipped_updates')


def feature_axis(ndim: int, axis: int | tuple[int, ...]) -> int:
  """`axis` (an int or a 1-tuple, as BatchNorm takes it) as a non-negative index into an ndim-D input."""
  axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  if len(axes) != 1 or not isinstance(axes[0], int) or not -ndim <= axes[0] < ndim:
    raise ValueError(f'BatchWhitening whitens along one feature axis: axis must be an int in [-{ndim}, '
                     f'{ndim}) for a {ndim}-D input, got {axis!r}.')
  return axes[0] % ndim


def sample_mask(mask: Any, shape: tuple[int, ...], axis: int) -> jax.Array:
  """BatchNorm's mask, broadcastable to an input of `shape` with features on `axis`, as booleans over the
  samples: (…) -> shape without `axis` (the feature axis moved last and dropped)."""
  mask = jnp.asarray(mask, bool)
  padded = (1,) * (len(shape) - mask.ndim) + mask.shape
  if mask.ndim > len(shape) or padded[axis] != 1:
    raise ValueError(f'BatchWhitening needs whole samples masked in or out: the mask must broadcast to the '
                     f'input {shape} with size 1 on the feature axis {axis} (covariances pair all channels '
                     f'of a sample); got mask shape {mask.shape}.')
  samples = jnp.moveaxis(mask.reshape(padded), axis, -1)[..., 0]
  return jnp.broadcast_to(samples, tuple(n for i, n in enumerate(shape) if i != axis))


class BatchWhitening(nn.Module):
  """Batch Whitening: a drop-in for `flax.linen.BatchNorm` that also decorrelates channels.

  Input (..., C, ...) with the C features on `axis` (default last); output the same shape. Statistics are
  float32 whatever the input dtype. Running statistics live in `batch_stats`, float32 arrays only (so code
  that treats them as BatchNorm's, e.g. `jax.lax.pmean` over devices, keeps working):

    mean (C,) init 0;  cov (G, g, g) init I;  whitening (G, g, g) init I = S(cov) of the updated cov.

  Health counters live in their own collection `'bw_health'` (float32 scalars, exact up to 2²⁴ events),
  kept only when that collection is mutable (declare it like `batch_stats`); BatchNorm code that never
  names it works unchanged, without counters:

    fallbacks — group factorisations (of the batch S and of the running S) in training steps that needed a
      fallback;
    skipped_updates — training steps whose batch moments were not finite and were left out (also inputs
      so large, |x| ≳ 1e18 in float32, that the covariance overflows: such a step outputs zeros).

  A training step updates `stat ← momentum·stat + (1−momentum)·batch_stat` (Flax convention) for mean and
  the unbiased cov (1/(m−1), where BatchNorm's var is 1/m; without ridge), then recomputes `whitening`;
  `init` updates nothing. In eval (`use_running_average=True`) y = whitening·(x − mean): no factorisation.
  Group size 1 is BatchNorm with the 1/(m−1) variance (tests/test_whitening_batchnorm.py).

  Attributes (BatchNorm's, in its order, then BW's own):
    use_running_average: use the stored statistics (eval) instead of the batch's (training); merged with
      `__call__`'s argument as BatchNorm does.
    axis: the feature axis (an int, or a 1-tuple); moved last internally and back. Several feature axes
      (BatchNorm allows a tuple) are not supported: flatten them into one axis.
    momentum: decay of the exponential moving averages.
    epsilon: ridge ε added to the covariance diagonal before factorising.
    dtype: output dtype (None: inferred from the input and the parameters, as BatchNorm's).
    param_dtype: dtype of γ and β.
    use_bias: add a learned per-channel β after whitening.
    use_scale: multiply by a learned per-channel γ after whitening.
    bias_init: initialiser of β.
    scale_init: initialiser of γ.
    axis_name: the mapped batch axis under `shard_map`/`pmap` (not needed under `jax.jit` sharding).
    axis_index_groups: device subsets reduced separately along `axis_name` (under `shard_map` JAX 0.10
      supports this only with `check_vma=False`).
    use_fast_variance: accepted for BatchNorm's signature; no effect: the moments are always one pass over
      samples shifted by a sample (or the running mean), as fast as the fast variance and as accurate as
      the two-pass one.
    force_float32_reductions: must be True (the default): factorising a bfloat16 covariance loses the
      whitening, so statistics and `batch_stats` are always float32 (float64 for float64 input).
    group_size: g, channels per group (must divide C); None whitens all C channels together.
    method: 'cholesky' (default), 'zca', 'pca' or 'newton': how S is computed from Σ + ε·I.
    newton_iterations: Newton–Schulz steps T for method='newton'.
    center_with: 'batch' centres training inputs on the batch mean; 'running' on the freshly updated
      running mean (gradients flow through its (1−momentum)·batch part).
    whiten_with: 'batch' or 'running': likewise for the covariance that S is computed from.
  """

  use_running_average: bool | None = None
  axis: int = -1
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
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  group_size: int | None = None
  method: str = 'cholesky'
  newton_iterations: int = 5
  center_with: str = 'batch'
  whiten_with: str = 'batch'

  def __post_init__(self):
    check_bw_settings(self)
    if not self.force_float32_reductions:
      raise ValueError('force_float32_reductions=False is not supported: BatchWhitening factorises its '
                       'covariances in float32 (bfloat16 loses the whitening); leave it True.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Whitens x along `axis`: (..., C, ...) -> the same shape.

    Args:
      x: activations with at least a batch and the feature axis.
      use_running_average: as the field (merged with it).
      mask: booleans broadcastable to x with size 1 on the feature axis: the samples the training
        statistics count (BatchNorm's mask, whole samples). Every sample is still whitened. Training with a
        mask (or `axis_name`) is differentiated by autodiff, not the closed form.
    """
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    if x.ndim < 2:
      raise ValueError(f'BatchWhitening expects (N, ..., C) with a batch and a channel axis; got shape '
                       f'{x.shape}.')
    axis = feature_axis(x.ndim, self.axis)
    samples_mask = None if mask is None else sample_mask(mask, x.shape, axis)
    x_last = jnp.moveaxis(x, axis, -1)
    channels = x_last.shape[-1]
    groups = num_groups(channels, self.group_size)
    g = channels // groups
    stacked_eye = lambda: jnp.tile(jnp.eye(g, dtype=jnp.float32), (groups, 1, 1))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_cov = self.variable('batch_stats', 'cov', stacked_eye)
    ra_whitening = self.variable('batch_stats', 'whitening', stacked_eye)
    counters = self._health_counters()
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype) if self.use_scale else None
    bias = self.param('bias', self.bias_init, (channels,), self.param_dtype) if self.use_bias else None

    if use_running_average:
      y = apply_whitening(x_last, ra_mean.value, ra_whitening.value, scale, bias)
    else:
      y, (new_mean, new_cov, new_whitening, fell_back, finite) = self._train(
          x_last, groups, samples_mask, (ra_mean.value, ra_cov.value, ra_whitening.value), (scale, bias))
      if not self.is_initializing():
        keep_if_finite = lambda new, old: jnp.where(finite, jax.lax.stop_gradient(new), old).astype(old.dtype)
        ra_mean.value = keep_if_finite(new_mean, ra_mean.value)
        ra_cov.value = keep_if_finite(new_cov, ra_cov.value)
        ra_whitening.value = keep_if_finite(new_whitening, ra_whitening.value)
        for name, events in zip(HEALTH_COUNTERS, (jnp.sum(fell_back & finite), ~finite)):
          if name in counters:
            counters[name].value += events.astype(jnp.float32)
    dtype = canonicalize_dtype(x, *(p for p in (scale, bias) if p is not None), dtype=self.dtype)
    return jnp.moveaxis(y, -1, axis).astype(dtype)

  def _train(self, x: jax.Array, groups: int, mask: jax.Array | None, running: tuple[jax.Array, ...],
             affine: tuple[jax.Array | None, jax.Array | None]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """y (after γ and β of `affine`) and `training_statistics`' updates for channels-last x (N, ..., C) and
    mask (N, ...) or None."""
    # As in flax's BatchNorm, `init` runs outside shard_map/pmap: the axis may not exist yet.
    axis_name = None if self.is_initializing() else self.axis_name
    if axis_name is None and mask is None and x.size // x.shape[-1] < 2:
      raise ValueError(f'BatchWhitening needs at least 2 samples per batch in training to estimate a '
                       f'covariance; got {x.size // x.shape[-1]} sample (shape {x.shape}, channels last). '
                       f'Use a larger batch or use_running_average=True.')
    settings = dict(method=self.method, epsilon=self.epsilon, newton_iterations=self.newton_iterations,
                    momentum=self.momentum, center_with=self.center_with, whiten_with=self.whiten_with,
                    running_whitening=not self.is_initializing() and self.whiten_with == 'batch')
    if axis_name is None and mask is None:  # the closed-form backward pass (whitening_vjp.py)
      if is_traced(x, running, affine):
        return _whiten_batch(x, running, *affine, groups=groups, **settings)
      # Called eagerly (a notebook, a test): one compiled program per shape and settings instead of ~100
      # dispatched operations, each compiled on its first shape.
      return _whiten_batch_compiled(x, running, *affine, groups=groups, autodiff=autodiff_enabled(),
                                    **settings)
    statistics = functools.partial(training_statistics, **settings)
    # per-device (masked) sums and one collective, differentiated by autodiff
    batch = batch_moments(x, self.group_size, axis_name=axis_name, axis_index_groups=self.axis_index_groups,
                          shift=running[0] if axis_name is not None else None, mask=mask)
    (mean, whitening), updates = statistics(*batch, running)
    return apply_whitening(x, mean, whitening, *affine), updates

  def _health_counters(self) -> dict[str, Any]:
    """The `bw_health` counter variables, or none when the caller does not keep that collection."""
    if not self.is_mutable_collection(HEALTH_COLLECTION):
      return {}
    return {name: self.variable(HEALTH_COLLECTION, name, lambda: jnp.zeros((), jnp.float32))
            for name in HEALTH_COUNTERS}


def is_traced(*trees: Any) -> bool:
  """Whether any array of `trees` is being traced into a program (jit, grad, vmap, …): then a layer's
  operations belong to that program; otherwise they run eagerly, one by one."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _whiten_batch(x: jax.Array, running: tuple[jax.Array, ...], scale: jax.Array | None,
                  bias: jax.Array | None, *, groups: int, **settings: Any):
  """`BatchWhitening._train` without mask or axis name: `whiten_training` with `training_statistics`."""
  return whiten_training(x, groups, functools.partial(training_statistics, **settings), running, scale=scale,
                         bias=bias)


@functools.partial(jax.jit, static_argnames=('groups', 'autodiff', 'method', 'epsilon', 'newton_iterations',
                                             'momentum', 'center_with', 'whiten_with', 'running_whitening'))
def _whiten_batch_compiled(x, running, scale, bias, *, groups, autodiff, **settings):
  """`_whiten_batch` as one compiled program, for eager calls; `autodiff`: `autodiff_enabled()` of the caller
  (read at trace time, so it is part of the cache key)."""
  with autodiff_backward(autodiff):
    return _whiten_batch(x, running, scale, bias, groups=groups, **settings)


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
                                                          newton_iterations, differentiable_groups=groups)
  if method == 'pca':
    whitenings = align_row_signs(whitenings, jnp.tile(ra_whitening, (len(covs), 1, 1)))
  finite = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_cov))
  return (mean, whitenings[:groups]), (new_mean, new_cov, whitenings[-groups:], fell_back, finite)


def ema(running: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
  """Flax's running-average convention: momentum·running + (1 − momentum)·batch."""
  return momentum * running + (1.0 - momentum) * batch
