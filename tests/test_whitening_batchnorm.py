"""BatchWhitening as a drop-in for `flax.linen.BatchNorm` (docs/design.md §2).

(a) flax's BatchNorm behaviours against BatchWhitening(group_size=1), which is BatchNorm with the unbiased
    variance: with m counted samples, BW's ε and 1/(m−1) variance give
      y_bw − β = c·(y_bn − β),  c = √((m−1)/m),  for BatchNorm's ε' = ε·(m−1)/m,
    so every comparison rescales by c exactly (and a wrong convention shows up at ε = 0.1).
(b) flax's examples/imagenet pattern: a `pmap` train step whose `batch_stats` are `jax.lax.pmean`ed across
    devices (`sync_batch_stats`): tests/test_whitening_batchnorm_devices.py, with the `axis_name` and mask
    checks of (a) that need 8 devices. The float64 NumPy references here serve both files.
"""

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest

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
# (a) in one process: outputs, running averages, axis, mask, fields


@pytest.fixture(scope='module')
def jax_modules():
  from flax import linen as nn
  import jax

  from bw_jax.nn import whitening as bw
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
  layer = bw.BatchWhitening(group_size=2, track_health=True)
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
# What flax's BatchNorm tests and its examples/imagenet rely on, run on both layers side by side


def test_init_and_training_on_one_sample_work_as_batchnorm_s(jax_modules):
  # flax's examples initialise with jnp.ones((1, S, S, 3)): a 1×1 last stage holds one sample. Neither layer
  # can estimate a spread from it: BatchNorm outputs β (x − μ = 0), and so must BW (identity S).
  jax, nn, bw = jax_modules
  x = inputs(13, (1, 1, 1, 4))
  beta = np.linspace(-1.0, 1.0, 4, dtype=np.float32)
  bias_init = lambda key, shape, dtype: beta.astype(dtype)
  layer_bw = bw_and_bn(nn, bw, 1, bias_init=bias_init)[0]
  layer_bn = nn.BatchNorm(epsilon=EPSILON, bias_init=bias_init)  # (ε' = ε(m−1)/m is 0 for one sample)
  for layer in (layer_bw, layer_bn):
    y, variables = layer.init_with_output(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_allclose(y, np.broadcast_to(beta, x.shape), atol=1e-6, err_msg=type(layer).__name__)
  # Training on one sample, and on a batch whose mask counts one sample, outputs β for it too. Such a batch
  # carries no covariance: BW leaves its running statistics as they were and counts a skipped update.
  variables = layer_bw.init(jax.random.key(0), inputs(14, (8, 4)), use_running_average=False)
  for batch, mask, counted in ((x, None, 0), (inputs(15, (8, 4)), np.arange(8)[:, None] == 3, 3)):
    y, updates = layer_bw.apply(variables, batch, use_running_average=False, mask=mask,
                                mutable=['batch_stats', 'bw_health'])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4)[counted], beta, atol=1e-6)
    for name in ('mean', 'cov', 'whitening'):
      np.testing.assert_array_equal(updates['batch_stats'][name], variables['batch_stats'][name], err_msg=name)
    assert updates['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 1.0}


def test_init_returns_batchnorm_s_two_collections_unless_health_is_asked_for(jax_modules):
  jax, nn, bw = jax_modules
  x = inputs(16, (8, 4))
  for layer in (bw.BatchWhitening(group_size=2), nn.BatchNorm()):
    for train in (False, True):
      assert set(layer.init(jax.random.key(0), x, use_running_average=not train)) == {'params', 'batch_stats'}
  asked = {'field': lambda: bw.BatchWhitening(group_size=2, track_health=True).init(
               jax.random.key(0), x, use_running_average=False),
           'mutable': lambda: bw.BatchWhitening(group_size=2).init(
               jax.random.key(0), x, use_running_average=False, mutable=['params', 'batch_stats', 'bw_health'])}
  for how, init in asked.items():
    variables = init()
    assert set(variables) == {'params', 'batch_stats', 'bw_health'}, how
    assert variables['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 0.0}, how


def test_nan_in_masked_out_samples_never_reaches_the_counted_samples(jax_modules):
  # flax's masked BatchNorm test puts NaN where the mask is False: the counted samples' outputs and the
  # running statistics stay finite and equal those of the batch without them.
  jax, nn, bw = jax_modules
  x = inputs(17, (6, 2, 2, 4))
  mask = (np.arange(6) < 4)[:, None, None, None]
  poisoned = np.where(mask, x, np.float32(np.nan))
  counted = int(np.broadcast_to(mask, (6, 2, 2, 1)).sum())
  for fields in (dict(group_size=1), dict(group_size=2)):
    layer_bw, layer_bn = bw_and_bn(nn, bw, counted)
    layer_bw = layer_bw.clone(**fields)
    v_bw = layer_bw.init(jax.random.key(0), x, use_running_average=False)
    y, updates = train_apply(layer_bw, v_bw, poisoned, mask=mask)
    y_clean, updates_clean = train_apply(layer_bw, v_bw, x, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[:4], np.asarray(y_clean)[:4], rtol=1e-6, atol=1e-6)
    for name, value in updates['batch_stats'].items():
      np.testing.assert_allclose(value, updates_clean['batch_stats'][name], rtol=1e-6, atol=1e-7, err_msg=name)
    if fields['group_size'] == 1:  # and equal BatchNorm's, rescaled (BatchNorm takes per-element masks)
      v_bn = layer_bn.init(jax.random.key(0), x, use_running_average=False)
      y_bn, _ = train_apply(layer_bn, v_bn, poisoned, mask=np.broadcast_to(mask, x.shape))
      assert np.all(np.isfinite(np.asarray(y_bn)[:4]))
      np.testing.assert_allclose(np.asarray(y)[:4], batchnorm_scale(counted) * np.asarray(y_bn)[:4],
                                 atol=TOLERANCE)


def test_multi_init_calls_one_layer_twice_as_batchnorm_s(jax_modules):
  # flax's BatchNorm multi-init test: one layer (with an axis_name, initialised outside any mapped axis)
  # applied twice in one call; normalising a normalised batch changes it by ε only.
  jax, nn, bw = jax_modules
  x = inputs(18, (8, 4))

  def twice(make_layer):
    class Twice(nn.Module):
      @nn.compact
      def __call__(self, x):
        layer = make_layer(name='norm')
        y = layer(x)
        return y, layer(y)
    return Twice().init_with_output(jax.random.key(0), x)

  m = 8
  (y1_bw, y2_bw), v_bw = twice(lambda name: bw.BatchWhitening(group_size=2, use_running_average=False,
                                                               axis_name='batch', epsilon=1e-5, name=name))
  (y1_bn, y2_bn), _ = twice(lambda name: nn.BatchNorm(use_running_average=False, axis_name='batch', name=name))
  np.testing.assert_allclose(y2_bn, y1_bn, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y2_bw, y1_bw, rtol=1e-4, atol=1e-4)
  mean, cov = np_masked_moments(x, None, 2)
  np.testing.assert_allclose(y1_bw, np_apply(x, mean, np_cholesky_whitening(cov, 1e-5)), atol=1e-4)
  assert set(v_bw) == {'params', 'batch_stats'} and m == 8


def test_axis_name_under_nn_vmap_reduces_over_the_mapped_axis_as_batchnorm_s(jax_modules):
  # nn.vmap with an axis_name: each mapped slice sees its own rows, and the layer's statistics are those of
  # all slices (one psum), as BatchNorm's are.
  jax, nn, bw = jax_modules
  x = inputs(19, (4, 6, 3))  # 4 mapped slices of 6 samples, 3 channels
  m = 24

  def mapped(layer_class, fields):
    mapped_class = nn.vmap(layer_class, variable_axes={'params': None, 'batch_stats': None},
                           split_rngs={'params': False}, axis_name='batch')
    model = mapped_class(axis_name='batch', use_running_average=False, momentum=MOMENTUM, **fields)
    variables = model.init(jax.random.key(0), x)
    return model.apply(variables, x, mutable=['batch_stats'])

  y_bw, s_bw = mapped(bw.BatchWhitening, dict(group_size=1, epsilon=EPSILON))
  y_bn, s_bn = mapped(nn.BatchNorm, dict(epsilon=EPSILON * (m - 1) / m))
  np.testing.assert_allclose(y_bw, batchnorm_scale(m) * np.asarray(y_bn), atol=TOLERANCE)
  mean, cov = np_masked_moments(x, None, 1)
  np.testing.assert_allclose(s_bw['batch_stats']['mean'], (1 - MOMENTUM) * mean, atol=1e-6)
  np.testing.assert_allclose(s_bn['batch_stats']['mean'], (1 - MOMENTUM) * mean, atol=1e-6)
  np.testing.assert_allclose(s_bw['batch_stats']['cov'], MOMENTUM + (1 - MOMENTUM) * cov, atol=1e-5)


def test_tabulate_with_flops_summarises_a_model_holding_both_layers(jax_modules):
  # A model summary is a daily tool: nn.tabulate(compute_flops=True, show_repeated=True) must list BW's
  # variables with their shapes, as it lists BatchNorm's.
  jax, nn, bw = jax_modules
  import jax.numpy as jnp

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      x = bw.BatchWhitening(group_size=4, use_running_average=not train)(x)
      return nn.Dense(2)(x)

  x = jnp.asarray(inputs(20, (16, 5)))
  plain = {'width': 200, 'no_color': True, 'force_terminal': False}
  for train in (False, True):
    table = nn.tabulate(Net(), jax.random.key(0), compute_flops=True, show_repeated=True,
                        console_kwargs=plain)(x, train)
    rows = {line.split('│')[1].strip(): line for line in table.splitlines() if line.count('│') > 7}
    assert 'BatchWhitening' in rows['BatchWhitening_0'] and 'BatchNorm' in rows['BatchNorm_0'], table
    # Every variable with its shape: BW's batch_stats hold C + 2·G·g² = 8 + 2·2·16 = 72 numbers, BN's 2·C.
    assert 'cov: float32[2,4,4]' in table and 'whitening: float32[2,4,4]' in table, table
    assert '72 (288 B)' in table and '16 (64 B)' in table and 'Total Parameters: 186 (744 B)' in table, table
    # FLOPs from XLA's cost analysis (the CPU kernels' custom calls count none of theirs): a number per row.
    flops = {name: int(rows[name].split('│')[5]) for name in ('BatchWhitening_0', 'BatchNorm_0')}
    assert min(flops.values()) > 0, table
