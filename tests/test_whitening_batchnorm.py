"""BatchWhitening as a drop-in for `flax.linen.BatchNorm` (docs/design.md §2).

(a) flax's BatchNorm behaviours against BatchWhitening(group_size=1), which is BatchNorm with the unbiased
    variance: with m counted samples, BW's ε and 1/(m−1) variance give
      y_bw − β = c·(y_bn − β),  c = √((m−1)/m),  for BatchNorm's ε' = ε·(m−1)/m,
    so every comparison rescales by c exactly (and a wrong convention shows up at ε = 0.1).
(b) flax's examples/imagenet pattern: a `pmap` train step whose `batch_stats` are `jax.lax.pmean`ed across
    devices (`sync_batch_stats`), with a group-whitening model, against a float64 NumPy reference.

The device checks need 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is
imported), so they run in a fresh interpreter: this file is also that script, as tests/test_whitening_devices.py.
"""

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

DEVICES = 8
LOCAL_SHAPE = (4, 2, 2, 4)  # one device's batch, NHWC: 16 samples, 4 channels
EPSILON = 0.1  # large, so that BatchNorm's ε' = ε·(m−1)/m differs visibly from ε
MOMENTUM = 0.9
# Float32 against float64: the statistics and outputs here are O(1) sums of ≤ 128 samples.
TOLERANCE = 2e-5


# ----------------------------------------------------------------------------------------------------------
# float64 NumPy references (shared by the tests and the device script)


def np_masked_moments(x: np.ndarray, mask: np.ndarray | None, g: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean (C,) and unbiased per-group covariance (G, g, g) of the samples of channels-last x that `mask`
  (x.shape[:-1], or None for all) selects."""
  samples = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  if mask is not None:
    samples = samples[np.broadcast_to(mask, x.shape[:-1]).reshape(-1)]
  mean = samples.mean(0)
  c = (samples - mean).reshape(len(samples), -1, g)
  return mean, np.einsum('mgi,mgj->gij', c, c) / (len(samples) - 1)


def np_cholesky_whitening(cov: np.ndarray, eps: float) -> np.ndarray:
  """S = L⁻¹ with L Lᵀ = Σ + εI, per group."""
  return np.stack([np.linalg.inv(np.linalg.cholesky(c + eps * np.eye(len(c)))) for c in cov])


def np_apply(x: np.ndarray, mean: np.ndarray, s: np.ndarray) -> np.ndarray:
  groups, g, _ = s.shape
  c = (np.asarray(x, np.float64) - mean).reshape(*x.shape[:-1], groups, g)
  return np.einsum('...gj,gij->...gi', c, s).reshape(x.shape)


def max_abs_difference(reference: Any, other: Any) -> float:
  return float(np.max(np.abs(np.asarray(other, np.float64) - np.asarray(reference, np.float64))))


def batchnorm_scale(m: int) -> float:
  """c = √((m−1)/m): BW's output over BatchNorm's (ε rescaled) for m counted samples."""
  return float(np.sqrt((m - 1) / m))


def inputs(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Float32 samples with per-channel means and scales far from (0, 1), channels last."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * rng.uniform(0.5, 3.0, shape[-1]) + rng.uniform(-2, 2, shape[-1])
          ).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# The device script (run in the subprocess)


def run_device_checks() -> dict[str, float]:
  """{check name: max |difference|} for the axis_name, mask and pmap/pmean checks on 8 devices."""
  # JAX is imported here, so that pytest importing this file leaves the device flags alone.
  from flax import linen as nn
  import jax

  from bw_jax.whitening import BatchWhitening

  assert jax.device_count() == DEVICES, f'expected {DEVICES} devices, got {jax.devices()}'
  results: dict[str, float] = {'devices': jax.device_count()}
  x = inputs(0, (DEVICES, *LOCAL_SHAPE))  # (devices, N, H, W, C)
  c_all = x.shape[-1]

  def mapped_step(module, mask=None):
    """pmap of one training step: y and the updated batch_stats on every device."""
    variables = module.init(jax.random.key(0), x[0], use_running_average=False)
    step = lambda x, mask: module.apply(variables, x, use_running_average=False, mask=mask,
                                        mutable=['batch_stats'])
    y, updates = jax.pmap(step, axis_name='batch')(x, mask)
    return y, updates['batch_stats']

  def compare(name, counted, mask, device_slices, **fields):
    """BW(g=1) and BatchNorm (ε' for `counted` samples) under pmap against each other and NumPy."""
    bw = BatchWhitening(group_size=1, epsilon=EPSILON, momentum=MOMENTUM, axis_name='batch', **fields)
    bn = nn.BatchNorm(epsilon=EPSILON * (counted - 1) / counted, momentum=MOMENTUM, axis_name='batch', **fields)
    (y_bw, s_bw) = mapped_step(bw, mask)
    (y_bn, s_bn) = mapped_step(bn, None if mask is None else np.broadcast_to(mask, x.shape))
    results[f'{name}/y'] = max_abs_difference(batchnorm_scale(counted) * y_bn, y_bw)
    results[f'{name}/mean'] = max_abs_difference(s_bn['mean'], s_bw['mean'])
    # Each device holds the moments of the devices it reduces over (the slices of its device group).
    var_u = np.concatenate([np.broadcast_to(np_masked_moments(
        x[d], None if mask is None else mask[d][..., 0], 1)[1][:, 0, 0], (d.stop - d.start, c_all))
        for d in device_slices])
    results[f'{name}/cov'] = max_abs_difference(MOMENTUM + (1 - MOMENTUM) * var_u, s_bw['cov'][..., 0, 0])
    results[f'{name}/var'] = max_abs_difference(
        MOMENTUM + (1 - MOMENTUM) * var_u * (counted - 1) / counted, s_bn['var'])

  m = x[0].size // c_all * DEVICES
  compare('axis_name', m, None, [slice(0, DEVICES)])
  compare('axis_index_groups', m // 2, None, [slice(0, 4), slice(4, 8)],
          axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
  # A mask with the same count on every device: BatchNorm's pmean of per-device masked means is then the
  # mean of all counted samples, and BW must agree with it.
  rows = np.arange(LOCAL_SHAPE[0]) < 3
  same_count = np.broadcast_to(rows[None, :, None, None, None], (DEVICES, *LOCAL_SHAPE[:-1], 1))
  compare('mask_same_count', int(same_count.sum()), same_count, [slice(0, DEVICES)])

  # A different count on each device: BW's moments are those of all counted samples (BatchNorm averages
  # the per-device means instead: docs/design.md §2).
  uneven = np.arange(LOCAL_SHAPE[0])[None, :] < (np.arange(DEVICES) % 3 + 2)[:, None]  # 2-4 rows each
  uneven = np.broadcast_to(uneven[:, :, None, None, None], (DEVICES, *LOCAL_SHAPE[:-1], 1))
  y_bw, s_bw = mapped_step(BatchWhitening(group_size=2, epsilon=EPSILON, momentum=MOMENTUM,
                                          axis_name='batch'), uneven)
  mean, cov = np_masked_moments(x, uneven[..., 0], 2)
  results['mask_uneven/mean'] = max_abs_difference(np.broadcast_to((1 - MOMENTUM) * mean, (DEVICES, c_all)),
                                                   s_bw['mean'])
  results['mask_uneven/cov'] = max_abs_difference(
      np.broadcast_to(MOMENTUM * np.eye(2) + (1 - MOMENTUM) * cov, (DEVICES, 2, 2, 2)), s_bw['cov'])
  results['mask_uneven/y'] = max_abs_difference(np_apply(x, mean, np_cholesky_whitening(cov, EPSILON)), y_bw)

  results.update(imagenet_style_train_and_sync(x))
  return results


def imagenet_style_train_and_sync(x: np.ndarray) -> dict[str, float]:
  """Two pmap train steps (grads pmean'ed, per-device batch_stats) then flax's examples/imagenet
  `sync_batch_stats`, against the device average of float64 per-device running statistics."""
  from flax import jax_utils, linen as nn
  from flax.training import train_state
  import jax
  import optax

  from bw_jax.whitening import BatchWhitening

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = BatchWhitening(group_size=2, momentum=MOMENTUM, epsilon=EPSILON, use_running_average=not train)(x)
      return nn.Dense(3)(x.mean(axis=(1, 2)))

  class TrainState(train_state.TrainState):  # as examples/imagenet/train.py
    batch_stats: Any

  model = Tiny()
  variables = model.init(jax.random.key(0), x[0], train=False)
  state = jax_utils.replicate(TrainState.create(apply_fn=model.apply, params=variables['params'],
                                                tx=optax.sgd(0.1), batch_stats=variables['batch_stats']))

  def train_step(state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name='batch')
    return state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])

  def sync_batch_stats(state):  # examples/imagenet/train.py
    cross_replica_mean = jax.pmap(lambda x: jax.lax.pmean(x, 'x'), 'x')
    return state.replace(batch_stats=cross_replica_mean(state.batch_stats))

  step = jax.pmap(train_step, axis_name='batch')
  batches = [x, inputs(1, x.shape)]
  labels = np.random.default_rng(2).integers(0, 3, size=(DEVICES, LOCAL_SHAPE[0]))
  for images in batches:
    state = step(state, images, labels)
  synced = jax.device_get(sync_batch_stats(state).batch_stats['BatchWhitening_0'])

  per_device = {'mean': [], 'cov': [], 'whitening': []}
  for d in range(DEVICES):
    mean, cov = np.zeros(4), np.broadcast_to(np.eye(2), (2, 2, 2))
    for images in batches:
      batch_mean, batch_cov = np_masked_moments(images[d], None, 2)
      mean = MOMENTUM * mean + (1 - MOMENTUM) * batch_mean
      cov = MOMENTUM * cov + (1 - MOMENTUM) * batch_cov
    for name, value in zip(per_device, (mean, cov, np_cholesky_whitening(cov, EPSILON))):
      per_device[name].append(value)
  out = {f'pmap_sync/{name}': max_abs_difference(np.broadcast_to(np.mean(v, 0), synced[name].shape),
                                                 synced[name]) for name, v in per_device.items()}
  out['pmap_sync/devices_differed'] = max_abs_difference(per_device['mean'][0], per_device['mean'][1])
  out['pmap_sync/all_float32'] = float(all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(synced)))
  return out


# ----------------------------------------------------------------------------------------------------------
# (a) in one process: outputs, running averages, axis, mask, fields


@pytest.fixture(scope='module')
def jax_modules():
  from flax import linen as nn
  import jax

  from bw_jax import whitening as bw
  return jax, nn, bw


def train_apply(module, variables, x, **kwargs):
  return module.apply(variables, x, use_running_average=False, mutable=['batch_stats'], **kwargs)


def grad_of_weighted_sum(module, variables, x, weights, **kwargs):
  import jax
  import jax.numpy as jnp
  return jax.grad(lambda x: jnp.sum(train_apply(module, variables, x, **kwargs)[0] * weights))(x)


def bw_and_bn(nn, bw, m: int, **fields):
  """BatchWhitening(group_size=1, ε) and the BatchNorm whose output it is c times (ε' = ε(m−1)/m)."""
  return (bw.BatchWhitening(group_size=1, epsilon=EPSILON, momentum=MOMENTUM, **fields),
          nn.BatchNorm(epsilon=EPSILON * (m - 1) / m, momentum=MOMENTUM, **fields))


def test_every_batchnorm_field_is_a_batchwhitening_field_with_its_default(jax_modules):
  _, nn, bw = jax_modules
  own = {f.name: f.default for f in dataclasses.fields(bw.BatchWhitening)}
  for field in dataclasses.fields(nn.BatchNorm):
    if field.name in ('parent', 'name'):
      continue
    assert field.name in own, f'BatchNorm field {field.name} missing'
    assert own[field.name] == field.default, field.name
  bn_call = inspect.signature(nn.BatchNorm.__call__).parameters
  bw_call = inspect.signature(bw.BatchWhitening.__call__).parameters
  assert list(bn_call) == list(bw_call)
  assert bw_call['mask'].kind == inspect.Parameter.KEYWORD_ONLY


def test_training_output_and_gradient_are_batchnorm_s_up_to_the_variance_convention(jax_modules):
  jax, nn, bw = jax_modules
  x = inputs(3, (8, 3, 3, 4))
  m = 8 * 9
  init = lambda lo, hi: lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, lo, hi)
  layer_bw, layer_bn = bw_and_bn(nn, bw, m, scale_init=init(0.5, 2.0), bias_init=init(-1.0, 1.0))
  v_bw = layer_bw.init(jax.random.key(0), x, use_running_average=False)
  v_bn = layer_bn.init(jax.random.key(0), x, use_running_average=False)
  for name in ('scale', 'bias'):  # the initialisers are used, as BatchNorm uses them
    np.testing.assert_array_equal(v_bw['params'][name], v_bn['params'][name])
  assert np.ptp(v_bw['params']['scale']) > 0.1
  beta, c = np.asarray(v_bw['params']['bias']), batchnorm_scale(m)
  y_bw, y_bn = train_apply(layer_bw, v_bw, x)[0], train_apply(layer_bn, v_bn, x)[0]
  np.testing.assert_allclose(y_bw - beta, c * (y_bn - beta), atol=TOLERANCE)
  weights = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  np.testing.assert_allclose(grad_of_weighted_sum(layer_bw, v_bw, x, weights),
                             c * grad_of_weighted_sum(layer_bn, v_bn, x, weights), atol=TOLERANCE)


def test_running_averages_and_eval_are_batchnorm_s_with_the_unbiased_variance(jax_modules):
  jax, nn, bw = jax_modules
  batches = [inputs(10 + k, (6, 2, 2, 3)) for k in range(3)]
  m = 24
  layer_bw, layer_bn = bw_and_bn(nn, bw, m)
  v_bw = layer_bw.init(jax.random.key(0), batches[0], use_running_average=False)
  v_bn = layer_bn.init(jax.random.key(0), batches[0], use_running_average=False)
  mean, var = np.zeros(3), np.ones(3)  # hand-computed EMA, float64
  for x in batches:
    v_bw = {**v_bw, **train_apply(layer_bw, v_bw, x)[1]}
    v_bn = {**v_bn, **train_apply(layer_bn, v_bn, x)[1]}
    samples = x.reshape(-1, 3).astype(np.float64)
    mean = MOMENTUM * mean + (1 - MOMENTUM) * samples.mean(0)
    var = MOMENTUM * var + (1 - MOMENTUM) * samples.var(0, ddof=1)
  stats_bw, stats_bn = v_bw['batch_stats'], v_bn['batch_stats']
  np.testing.assert_allclose(stats_bw['mean'], mean, atol=1e-6)
  np.testing.assert_allclose(stats_bn['mean'], mean, atol=1e-6)
  np.testing.assert_allclose(stats_bw['cov'][:, 0, 0], var, atol=1e-5)
  # BatchNorm's 1/m variance: the same EMA of (m−1)/m times the batch variances (from var = 1 at init).
  np.testing.assert_allclose(stats_bn['var'], (var - MOMENTUM ** 3) * (m - 1) / m + MOMENTUM ** 3, atol=1e-5)
  np.testing.assert_allclose(stats_bw['whitening'][:, 0, 0], 1 / np.sqrt(var + EPSILON), rtol=1e-5)
  # Eval: BatchNorm given BW's running statistics and ε computes BW's eval output.
  x_eval = inputs(20, (5, 2, 2, 3))
  bn_eval = nn.BatchNorm(epsilon=EPSILON, use_running_average=True)
  y_bn = bn_eval.apply({'params': v_bn['params'],
                        'batch_stats': {'mean': stats_bw['mean'], 'var': stats_bw['cov'][:, 0, 0]}}, x_eval)
  np.testing.assert_allclose(layer_bw.apply(v_bw, x_eval, use_running_average=True), y_bn, atol=TOLERANCE)


def test_axis_moves_the_feature_axis_as_batchnorm_s(jax_modules):
  jax, nn, bw = jax_modules
  x_nhwc = inputs(5, (6, 2, 3, 4))
  x_nchw = np.moveaxis(x_nhwc, -1, 1)
  m = 36
  for axis in (1, -3):
    layer_bw, layer_bn = bw_and_bn(nn, bw, m, axis=axis)
    v_bw = layer_bw.init(jax.random.key(0), x_nchw, use_running_average=False)
    v_bn = layer_bn.init(jax.random.key(0), x_nchw, use_running_average=False)
    (y_bw, s_bw), (y_bn, s_bn) = train_apply(layer_bw, v_bw, x_nchw), train_apply(layer_bn, v_bn, x_nchw)
    np.testing.assert_allclose(y_bw, batchnorm_scale(m) * y_bn, atol=TOLERANCE)
    np.testing.assert_allclose(s_bw['batch_stats']['mean'], s_bn['batch_stats']['mean'], atol=1e-6)
  # Groups of g > 1 run along the feature axis: NCHW with axis=1 is NHWC with the default axis, transposed.
  grouped = bw.BatchWhitening(group_size=2, axis=1, epsilon=EPSILON)
  variables = grouped.init(jax.random.key(0), x_nchw, use_running_average=False)
  y, stats = train_apply(grouped, variables, x_nchw)
  mean, cov = np_masked_moments(x_nhwc, None, 2)
  np.testing.assert_allclose(np.moveaxis(y, 1, -1), np_apply(x_nhwc, mean, np_cholesky_whitening(cov, EPSILON)),
                             atol=1e-4)
  np.testing.assert_allclose(stats['batch_stats']['cov'], 0.99 * np.eye(2) + 0.01 * cov, atol=1e-6)
  y_eval = grouped.apply({**variables, **stats}, x_nchw, use_running_average=True)
  s = stats['batch_stats']
  np.testing.assert_allclose(np.moveaxis(y_eval, 1, -1), np_apply(x_nhwc, s['mean'], np.asarray(s['whitening'])),
                             atol=1e-5)


@pytest.mark.parametrize('mask_shape', ['rows', 'pixels'])
def test_masked_samples_are_left_out_of_the_statistics_as_by_batchnorm(jax_modules, mask_shape):
  jax, nn, bw = jax_modules
  x = inputs(6, (6, 2, 2, 3))
  rng = np.random.default_rng(7)
  mask = (np.arange(6) % 3 != 1)[:, None, None, None] if mask_shape == 'rows' else (
      rng.uniform(size=(6, 2, 2, 1)) < 0.6)
  counted = int(np.broadcast_to(mask, (6, 2, 2, 1)).sum())
  layer_bw, layer_bn = bw_and_bn(nn, bw, counted)
  v_bw = layer_bw.init(jax.random.key(0), x, use_running_average=False)
  v_bn = layer_bn.init(jax.random.key(0), x, use_running_average=False)
  bn_mask = np.broadcast_to(mask, x.shape)  # BatchNorm takes per-element masks
  (y_bw, s_bw), (y_bn, s_bn) = train_apply(layer_bw, v_bw, x, mask=mask), train_apply(layer_bn, v_bn, x,
                                                                                      mask=bn_mask)
  c = batchnorm_scale(counted)
  np.testing.assert_allclose(y_bw, c * y_bn, atol=TOLERANCE)  # every sample is normalised, masked or not
  np.testing.assert_allclose(s_bw['batch_stats']['mean'], s_bn['batch_stats']['mean'], atol=1e-6)
  mean, cov = np_masked_moments(x, mask[..., 0], 1)
  np.testing.assert_allclose(s_bw['batch_stats']['cov'], MOMENTUM * 1.0 + (1 - MOMENTUM) * cov, atol=1e-6)
  # Masked samples change nothing: replace them by garbage.
  garbage = np.where(bn_mask, x, np.float32(1e3))
  np.testing.assert_allclose(train_apply(layer_bw, v_bw, garbage, mask=mask)[1]['batch_stats']['cov'],
                             s_bw['batch_stats']['cov'], rtol=1e-6)
  # The gradient (autodiff with a mask) is BatchNorm's times c as well.
  weights = rng.normal(size=x.shape).astype(np.float32)
  np.testing.assert_allclose(grad_of_weighted_sum(layer_bw, v_bw, x, weights, mask=mask),
                             c * grad_of_weighted_sum(layer_bn, v_bn, x, weights, mask=bn_mask), atol=1e-4)


def test_masked_group_whitening_uses_the_moments_of_the_counted_samples(jax_modules):
  jax, _, bw = jax_modules
  x = inputs(8, (10, 4))
  mask = np.arange(10) >= 3
  layer = bw.BatchWhitening(group_size=2, epsilon=EPSILON, use_scale=False, use_bias=False)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  y, _ = train_apply(layer, variables, x, mask=mask[:, None])
  mean, cov = np_masked_moments(x, mask, 2)
  np.testing.assert_allclose(y, np_apply(x, mean, np_cholesky_whitening(cov, EPSILON)), atol=1e-5)


def test_use_fast_variance_has_no_effect_and_float32_reductions_are_required(jax_modules):
  jax, _, bw = jax_modules
  x = inputs(9, (8, 4))
  outputs = []
  for fast in (True, False):
    layer = bw.BatchWhitening(group_size=2, use_fast_variance=fast)
    outputs.append(train_apply(layer, layer.init(jax.random.key(0), x, use_running_average=False), x)[0])
  np.testing.assert_array_equal(outputs[0], outputs[1])
  with pytest.raises(ValueError, match='force_float32_reductions=False is not supported'):
    bw.BatchWhitening(force_float32_reductions=False)


@pytest.mark.parametrize('mask_shape, axis, message', [
    ((8, 4), -1, 'size 1 on the feature axis -1'),
    ((8, 1), 0, 'size 1 on the feature axis 0'),
])
def test_bad_masks_and_axes_are_rejected_with_what_is_allowed(jax_modules, mask_shape, axis, message):
  jax, _, bw = jax_modules
  x = np.ones((8, 4), np.float32)
  if axis == 0:  # a valid (8, 1) mask for features on axis 1 selects per feature when features are axis 0
    with pytest.raises(ValueError, match='size 1 on the feature axis 0'):
      bw.BatchWhitening(axis=0).init(jax.random.key(0), x, use_running_average=False, mask=np.ones(mask_shape))
    return
  with pytest.raises(ValueError, match='whole samples masked'):
    bw.BatchWhitening().init(jax.random.key(0), x, use_running_average=False, mask=np.ones(mask_shape))
  for bad_axis in (2, (0, 1)):
    with pytest.raises(ValueError, match='axis must be an int in'):
      bw.BatchWhitening(axis=bad_axis).init(jax.random.key(0), x, use_running_average=False)


def test_use_running_average_merges_and_output_dtype_is_inferred_as_by_batchnorm(jax_modules):
  jax, nn, bw = jax_modules
  import jax.numpy as jnp
  x = jnp.asarray(inputs(11, (8, 4)), jnp.bfloat16)
  for affine in (True, False):
    fields = dict(use_scale=affine, use_bias=affine)
    bw_y = bw.BatchWhitening(**fields).init_with_output(jax.random.key(0), x, use_running_average=False)[0]
    bn_y = nn.BatchNorm(**fields).init_with_output(jax.random.key(0), x, use_running_average=False)[0]
    assert bw_y.dtype == bn_y.dtype == (jnp.float32 if affine else jnp.bfloat16)
  for module in (bw.BatchWhitening(use_running_average=True), nn.BatchNorm(use_running_average=True)):
    with pytest.raises(ValueError, match='use_running_average'):
      module.init(jax.random.key(0), x, use_running_average=False)


def test_batch_stats_hold_only_float_arrays_and_counters_live_in_bw_health(jax_modules):
  jax, _, bw = jax_modules
  x = inputs(12, (8, 4))
  layer = bw.BatchWhitening(group_size=2)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  assert set(variables['batch_stats']) == {'mean', 'cov', 'whitening'}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables['batch_stats'])} == {np.dtype('float32')}
  assert variables[bw.HEALTH_COLLECTION] == {'fallbacks': 0.0, 'skipped_updates': 0.0}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables['bw_health'])} == {np.dtype('float32')}
  # BatchNorm-style code that keeps only params and batch_stats runs; no counters come back.
  y, updates = train_apply(layer, {'params': variables['params'], 'batch_stats': variables['batch_stats']}, x)
  assert set(updates) == {'batch_stats'}
  # With the collection mutable the counters count: a non-finite batch is skipped.
  bad = x.copy()
  bad[0, 0] = np.nan
  _, updates = layer.apply(variables, bad, use_running_average=False, mutable=['batch_stats', 'bw_health'])
  assert updates['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 1.0}


# ----------------------------------------------------------------------------------------------------------
# (a) axis_name and mask under pmap, (b) the ImageNet example's pmean of batch_stats: 8 devices


@pytest.fixture(scope='module')
def device_results() -> dict[str, float]:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}', JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # A new session, killed as a group below: the script dies with the test even if pytest is interrupted.
  process = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=300)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  assert process.returncode == 0, f'device check script failed:\n{stdout}\n{stderr}'
  return json.loads(stdout.strip().splitlines()[-1])


def failures(results: dict[str, float], prefix: str, tolerance: float = TOLERANCE) -> list[str]:
  checks = {k: v for k, v in results.items() if k.startswith(prefix)}
  assert checks, f'the script reported nothing for {prefix}'
  return [f'{k}: max |diff| {v:.3g} > {tolerance:g}' for k, v in checks.items() if not v < tolerance]


@pytest.mark.slow  # 8-device script in a new interpreter: ~50 s on 2 busy cores.
@pytest.mark.parametrize('check', ['axis_name/', 'axis_index_groups/', 'mask_same_count/', 'mask_uneven/'])
def test_axis_name_and_mask_under_pmap_match_batchnorm_and_numpy(device_results, check):
  assert device_results['devices'] == DEVICES
  assert not failures(device_results, check)


@pytest.mark.slow  # 8-device script in a new interpreter: ~50 s on 2 busy cores.
def test_imagenet_example_pmean_of_batch_stats_averages_the_devices_statistics(device_results):
  assert device_results['pmap_sync/devices_differed'] > 1e-3  # per-device statistics were different
  assert device_results['pmap_sync/all_float32'] == 1.0
  assert not failures(device_results, 'pmap_sync/mean') + failures(device_results, 'pmap_sync/cov') + \
      failures(device_results, 'pmap_sync/whitening', 1e-4)


if __name__ == '__main__':
  print(json.dumps(run_device_checks()))
