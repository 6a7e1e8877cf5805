"""BatchWhitening for Flax NNX: a drop-in for `flax.nnx.BatchNorm`.

The same layer as the Linen module of `whitening.py`, for NNX's stateful modules: the running statistics are
`nnx.BatchStat` variables, γ and β `nnx.Param`s. It computes nothing of its own: a training step is
`whitening.training_step` (the Linen module's), eval `whitening.apply_whitening`.

    layer = BatchWhitening(64, group_size=16, rngs=nnx.Rngs(0))
    y = layer(x)                                  # training: batch statistics, running ones updated
    y = layer(x, use_running_average=True)        # or layer.eval(); layer(x)
"""

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
import jax
import jax.numpy as jnp

from bw_jax.nn.whitening import (HEALTH_COUNTERS, apply_whitening, check_bw_settings, feature_axis,
                                 initial_running_statistics, num_groups, output_dtype, sample_mask, statistics_of,
                                 training_step)


class BWHealth(nnx.Variable):
  """BatchWhitening's health counters (float32 scalars; the Linen module's `bw_health` collection)."""


class BatchWhitening(nnx.Module):
  """Batch Whitening for NNX, a drop-in for `flax.nnx.BatchNorm` that also decorrelates channels.

  Input (..., C, ...) with the C = `num_features` features on `axis`; output the same shape. State:
  `mean` (C,), `cov` (G, g, g) and `whitening` (G, g, g) as `nnx.BatchStat` (float32; initially 0, I, I),
  `scale` and `bias` (C,) as `nnx.Param`, and with `track_health` the counters `fallbacks` and
  `skipped_updates` as `BWHealth`. A training call updates the running statistics as the Linen module's
  training step does (docs/design.md §2.3); NNX has no `init` pass, so every training call updates them.

  Args (`flax.nnx.BatchNorm`'s, in its order, then BW's own; the Linen module's attributes say more):
    num_features: C.
    use_running_average: eval (True) or training (False); `__call__`'s argument takes precedence, and
      `.train()`, `.eval()` and `nnx.view` set it.
    axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
      axis_index_groups: as BatchNorm's (one feature axis; ε is the ridge of the covariance).
    use_fast_variance: accepted for BatchNorm's signature; no effect.
    rngs: for γ and β's initialisers.
    group_size, method, newton_iterations, center_with, whiten_with: as the Linen module's.
    track_health: keep the health counters.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Callable[..., jax.Array] = initializers.zeros_init(),
      scale_init: Callable[..., jax.Array] = initializers.ones_init(),
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      rngs: nnx.Rngs,
      group_size: int | None = None,
      method: str = 'cholesky',
      newton_iterations: int = 5,
      center_with: str = 'batch',
      whiten_with: str = 'batch',
      track_health: bool = False,
  ):
    self.num_features, self.use_running_average, self.axis = num_features, use_running_average, axis
    self.momentum, self.epsilon, self.dtype, self.param_dtype = momentum, epsilon, dtype, param_dtype
    self.use_bias, self.use_scale = use_bias, use_scale
    self.axis_name, self.axis_index_groups, self.use_fast_variance = axis_name, axis_index_groups, use_fast_variance
    self.group_size, self.method, self.newton_iterations = group_size, method, newton_iterations
    self.center_with, self.whiten_with, self.track_health = center_with, whiten_with, track_health
    check_bw_settings(self)
    self.groups = num_groups(num_features, group_size)
    initial = initial_running_statistics(num_features, self.groups)
    self.mean, self.cov, self.whitening = (nnx.BatchStat(initial[name]) for name in ('mean', 'cov', 'whitening'))
    self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype)) if use_scale else nnx.data(None)
    self.bias = nnx.Param(bias_init(rngs.params(), (num_features,), param_dtype)) if use_bias else nnx.data(None)
    if track_health:
      self.fallbacks, self.skipped_updates = (BWHealth(jnp.zeros((), jnp.float32)) for _ in HEALTH_COUNTERS)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Whitens x along `axis`: (..., C, ...) -> the same shape. `mask`: as the Linen module's (booleans
    broadcastable to x with size 1 on the feature axis: the samples the training statistics count)."""
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg='No use_running_average was given to BatchWhitening: pass it to the constructor or the call, '
                  'or set it with .train() / .eval() / nnx.view.')
    axis = feature_axis(x.ndim, self.axis)
    if x.shape[axis] != self.num_features:
      raise ValueError(f'BatchWhitening was built for num_features={self.num_features}, but the input has '
                       f'{x.shape[axis]} features on axis {axis} (shape {x.shape}).')
    x_last = jnp.moveaxis(x, axis, -1)
    affine = (self.scale[...] if self.use_scale else None, self.bias[...] if self.use_bias else None)
    if use_running_average:
      y = apply_whitening(x_last, self.mean[...], self.whitening[...], *affine)
    else:
      y, running, events = training_step(
          x_last, None if mask is None else sample_mask(mask, x.shape, axis),
          (self.mean[...], self.cov[...], self.whitening[...]), affine, self.groups,
          statistics_of(self, running_whitening=self.whiten_with == 'batch'), axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups)
      self.mean[...], self.cov[...], self.whitening[...] = running
      if self.track_health:
        self.fallbacks[...] += events[0]
        self.skipped_updates[...] += events[1]
    return jnp.moveaxis(y, -1, axis).astype(output_dtype(x, affine, self.dtype))

  def set_view(self, use_running_average: bool | None = None):
    """For `nnx.view` (as BatchNorm's): sets `use_running_average` when given."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
