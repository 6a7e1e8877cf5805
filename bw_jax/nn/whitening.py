"""Batch Whitening: decorrelate a batch of activations so that its covariance becomes the identity.

For m samples x_i ∈ R^C (the N·H·W pixels of an NHWC map), channels are split into G groups of g
consecutive channels and, per group (docs/design.md §1):

  μ = mean(x)            Σ = 1/(m−1) Σ_i (x_i − μ)(x_i − μ)ᵀ      Σ_ε = Σ + ε·I
  y = S (x − μ)          with S(Σ_ε) = L⁻¹ (cholesky), UΛ^{-1/2}Uᵀ (zca), Λ^{-1/2}Uᵀ (pca)
                         or T Newton–Schulz steps towards Σ_ε^{-1/2} (newton, IterNorm)

The pure functions (`batch_moments`, `whitening_matrix`, `apply_whitening`, `whiten`) work without Flax;
the Linen module `BatchWhitening` is a thin drop-in for `flax.linen.BatchNorm` that keeps running statistics
(`bw_jax.nn.nnx` has the same layer for Flax NNX). Both hand a training step to one pure function,
`training_step`: the forward pass and its closed-form backward pass are in `vjp.py`, S in `matrices.py`
(from the batch moments, by `statistics.py`), the products over the activations in `group_products.py`.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import linen as nn
from flax.linen import initializers
from flax.linen.dtypes import canonicalize_dtype
import jax
import jax.numpy as jnp

from bw_jax.checks import check_choice, is_positive_int
from bw_jax.nn.dtypes import accumulation_dtype
from bw_jax.nn.group_products import DENSE_MAX_CHANNELS, per_platform_layout  # noqa: F401 (the first re-exported)
from bw_jax.nn.matrices import (  # noqa: F401 (the public names of the factorisations, re-exported)
    FALLBACK_RIDGE, METHODS, align_row_signs, cholesky_whitening, newton_whitening, pca_whitening,
    whitening_matrix, whitening_matrix_with_fallbacks, zca_whitening)
from bw_jax.nn.statistics import BatchStatistics, TrainingStatistics
from bw_jax.nn.vjp import (  # noqa: F401 (autodiff_backward re-exported, to compare the closed form with autodiff)
    apply_whitening_folded, autodiff_backward, first_counted_sample, shifted_moments, whiten_training)

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
    shift: (C,) a value close to the mean (the running mean) that the one-pass moments are taken about, to
      avoid cancellation; never differentiated. Without it: the first included sample, or 0 with
      `axis_name` (a shift must be the same on every device).
    mask: (N, ...) booleans broadcastable to x.shape[:-1]: the samples the moments count (True), as
      BatchNorm's mask but one value for all channels of a sample. m is the number of True samples.

  Returns:
    mean (C,) and cov (G, g, g) with the 1/(m−1) normalisation, m counted over all reduced devices;
    float32 (float64 for float64 input). Fewer than 2 counted samples estimate no spread: cov is then 0.
  """
  channels = x.shape[-1]
  groups = num_groups(channels, group_size)
  samples = x.reshape(-1, channels)
  weights = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape[:-1]).reshape(-1)
  dtype = accumulation_dtype(x.dtype)
  if shift is None:
    shift = jnp.zeros((channels,), dtype) if axis_name is not None else first_counted_sample(samples, weights)
  shift = jax.lax.stop_gradient(shift).astype(dtype)  # its influence on the moments cancels
  reduction = None if axis_name is None else (axis_name, axis_index_groups)

  def moments(layout, samples, shift, weights):
    _, offset, cov, _ = shifted_moments(layout, samples, groups, shift, weights, reduction)
    return shift + offset, cov
  return per_platform_layout(channels, channels // groups, moments, samples, shift, weights)


def apply_whitening(x: jax.Array, mean: jax.Array, whitening: jax.Array, scale: jax.Array | None = None,
                    bias: jax.Array | None = None) -> jax.Array:
  """y = S (x − μ) per group, then γ ⊙ y + β if given: x (..., C), mean (C,), whitening (G, g, g), scale and
  bias (C,) -> (..., C) in float32 or wider. One GEMM per group (the affine folded into its matrix)."""
  samples = x.reshape(-1, x.shape[-1])
  return apply_whitening_folded(samples, mean, whitening.astype(accumulation_dtype(x.dtype)),
                                (scale, bias)).reshape(x.shape)


def whiten(
    x: jax.Array, group_size: int | None = None, method: str = 'cholesky', epsilon: float = 1e-5,
    newton_iterations: int = 5,
) -> jax.Array:
  """Whiten a batch with its own statistics (training-mode BatchWhitening, no affine): (N, ..., C)."""
  check_choice('method', method, METHODS)
  statistics = BatchStatistics(method=method, epsilon=epsilon, newton_iterations=newton_iterations)
  return whiten_training(x, num_groups(x.shape[-1], group_size), statistics)[0]


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
  """The BatchWhitening fields a model gives every BW layer (the config's `bw.*`; same names), and whether
  the layers keep their health counters (`track_health`: the training loop asks for them).

  Defaults follow EfficientNet's BatchNorm (momentum 0.99, ε 1e-3) with groups of 16 channels.
  """

  method: str = 'cholesky'
  group_size: int | None = 16
  momentum: float = 0.99
  epsilon: float = 1e-3
  center_with: str = 'batch'
  whiten_with: str = 'batch'
  newton_iterations: int = 5
  track_health: bool = False

  def __post_init__(self):
    check_bw_settings(self)

  def layer(self, channels: int, **kwargs: Any) -> 'BatchWhitening':
    """A BatchWhitening for `channels` inputs; the group size becomes the largest divisor of `channels`
    not above `group_size` (`fit_group_size`), so one setting serves layers of any width."""
    fields = dataclasses.asdict(self)
    fields['group_size'] = fit_group_size(channels, self.group_size)
    return BatchWhitening(**fields, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# What the Linen and NNX modules share: the input's layout, the running statistics, a training step


HEALTH_COLLECTION = 'bw_health'
HEALTH_COUNTERS = ('fallbacks', 'skipped_updates')
RUNNING_STATISTICS = ('mean', 'cov', 'whitening')


def feature_axis(ndim: int, axis: int | tuple[int, ...]) -> int:
  """`axis` (an int or a 1-tuple, as BatchNorm takes it) as a non-negative index into an ndim-D input."""
  if ndim < 2:
    raise ValueError(f'BatchWhitening expects (N, ..., C) with a batch and a channel axis; got a {ndim}-D '
                     f'input.')
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


def initial_running_statistics(channels: int, groups: int) -> dict[str, jax.Array]:
  """`batch_stats` before any training step: mean 0 (C,), cov and whitening I (G, g, g), float32."""
  eye = jnp.tile(jnp.eye(channels // groups, dtype=jnp.float32), (groups, 1, 1))
  return {'mean': jnp.zeros((channels,), jnp.float32), 'cov': eye, 'whitening': eye}


def statistics_of(layer: Any, running_whitening: bool) -> TrainingStatistics:
  """The `TrainingStatistics` of a BatchWhitening module's fields (Linen or NNX)."""
  return TrainingStatistics(method=layer.method, epsilon=layer.epsilon, newton_iterations=layer.newton_iterations,
                            momentum=layer.momentum, center_with=layer.center_with, whiten_with=layer.whiten_with,
                            running_whitening=running_whitening)


def training_step(x: jax.Array, mask: jax.Array | None, running: tuple[jax.Array, ...],
                  affine: tuple[jax.Array | None, jax.Array | None], groups: int,
                  statistics: TrainingStatistics, axis_name: Any = None, axis_index_groups: Any = None,
                  ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, jax.Array]]:
  """A training step on channels-last x (N, ..., C) with mask (N, ...) or None: y (after γ and β), the
  running (mean, cov, whitening) it leaves (the previous ones where the batch is skipped, without
  gradient), and its health events (fallbacks, skipped updates) as float32 scalars."""
  # Under axis_name the moments are taken about the running mean: a shift that every device shares.
  shift = running[0] if axis_name is not None else None
  y, (*new, fell_back, updated) = whiten_training(
      x, groups, statistics, running, scale=affine[0], bias=affine[1], mask=mask, shift=shift,
      axis_name=axis_name, axis_index_groups=axis_index_groups)
  kept = tuple(jnp.where(updated, jax.lax.stop_gradient(value), old).astype(old.dtype)
               for value, old in zip(new, running))
  events = (jnp.sum(fell_back & updated).astype(jnp.float32), (~updated).astype(jnp.float32))
  return y, kept, events


def output_dtype(x: jax.Array, affine: tuple[jax.Array | None, ...], dtype: Any) -> Any:
  """The output dtype: `dtype`, else inferred from the input and γ, β as BatchNorm's."""
  return canonicalize_dtype(x, *(p for p in affine if p is not None), dtype=dtype)


def names_collection(collection_filter: Any, name: str) -> bool:
  """Whether a Flax collection filter names `name` itself (the name, or a sequence holding it), rather than
  admitting every collection (True, or the DenyList that `init` uses by default)."""
  if isinstance(collection_filter, str):
    return collection_filter == name
  return isinstance(collection_filter, (list, tuple, set, frozenset)) and name in collection_filter


# ----------------------------------------------------------------------------------------------------------
# The Linen module


class BatchWhitening(nn.Module):
  """Batch Whitening: a drop-in for `flax.linen.BatchNorm` that also decorrelates channels.

  Input (..., C, ...) with the C features on `axis` (default last); output the same shape. Statistics are
  float32 whatever the input dtype. Running statistics live in `batch_stats`, float32 arrays only (so code
  that treats them as BatchNorm's, e.g. `jax.lax.pmean` over devices, keeps working):

    mean (C,) init 0;  cov (G, g, g) init I;  whitening (G, g, g) init I = S(cov) of the updated cov.

  Health counters live in their own collection `'bw_health'` (float32 scalars, exact up to 2²⁴ events), kept
  only when asked for: `track_health=True`, or `mutable` naming the collection (as `batch_stats` is named).
  Otherwise `init` returns BatchNorm's two collections and BatchNorm code runs unchanged, without counters:

    fallbacks — group factorisations (of the batch S and of the running S) in training steps that needed a
      fallback;
    skipped_updates — training steps whose batch was left out of the running statistics: moments not finite
      (also inputs so large, |x| ≳ 1e18 in float32, that the covariance overflows: such a step outputs
      zeros), or fewer than 2 counted samples (one sample estimates no covariance: such a step centres and
      does not scale, S = I, as BatchNorm outputs β for one sample).

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
    track_health: keep the `bw_health` counters (created by `init`) whenever that collection is mutable.
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
  track_health: bool = False

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
    axis = feature_axis(x.ndim, self.axis)
    x_last = jnp.moveaxis(x, axis, -1)
    channels = x_last.shape[-1]
    groups = num_groups(channels, self.group_size)
    initial = initial_running_statistics(channels, groups)
    running = [self.variable('batch_stats', name, lambda name=name: initial[name])
               for name in RUNNING_STATISTICS]
    keeps_health = self.is_mutable_collection(HEALTH_COLLECTION) and (
        self.track_health or names_collection(self.scope.mutable, HEALTH_COLLECTION))
    counters = [self.variable(HEALTH_COLLECTION, name, lambda: jnp.zeros((), jnp.float32))
                for name in HEALTH_COUNTERS] if keeps_health else []
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype) if self.use_scale else None
    bias = self.param('bias', self.bias_init, (channels,), self.param_dtype) if self.use_bias else None

    if use_running_average:
      y = apply_whitening(x_last, running[0].value, running[2].value, scale, bias)
    else:
      # As in flax's BatchNorm, `init` runs outside shard_map/pmap (the axis may not exist yet) and updates
      # nothing.
      initializing = self.is_initializing()
      statistics = statistics_of(self, running_whitening=not initializing and self.whiten_with == 'batch')
      y, new_running, events = training_step(
          x_last, None if mask is None else sample_mask(mask, x.shape, axis), tuple(v.value for v in running),
          (scale, bias), groups, statistics, axis_name=None if initializing else self.axis_name,
          axis_index_groups=self.axis_index_groups)
      if not initializing:
        for variable, value in zip(running, new_running):
          variable.value = value
        for counter, count in zip(counters, events):
          counter.value += count
    return jnp.moveaxis(y, -1, axis).astype(output_dtype(x, (scale, bias), self.dtype))
