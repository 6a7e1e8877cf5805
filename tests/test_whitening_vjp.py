"""The closed-form backward pass, the one-pass moments, the product layouts and bf16 products of BatchWhitening.

References: JAX autodiff of the same forward pass (`autodiff_backward()`), which test_whitening.py checks
against finite differences, and float64 NumPy formulas.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.nn import group_products as gp
from bw_jax.nn import kernels
from bw_jax.nn import whitening as bw
from bw_jax.nn.vjp import autodiff_backward, whiten_training
from test_whitening import (correlated, degenerate_batches, group_covariances, np_apply, np_moments, np_whitening,
                            train_apply)

# (group_size, channels, center_with/whiten_with) cases of the layer: g = 3, 2 in XLA's products, g = 4, 8 in
# the CPU kernels (group_products.KERNEL_GROUP_SIZES) where they are built.
LAYER_CASES = [(3, 6, 'batch'), (2, 6, 'running'), (4, 8, 'batch'), (8, 16, 'running')]


def layer_gradient_fn(module, autodiff: bool):
  """jit((variables, x, weights) -> d/d(x, params) of Σ weights·y) for one training step."""
  def loss(x, params, variables, weights):
    y, _ = train_apply(module, {**variables, 'params': params}, x)
    return jnp.sum(weights * y)

  with autodiff_backward(autodiff):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda variables, x, weights: grad(x, variables['params'], variables, weights)


def layer_gradients(module, variables, x, weights, autodiff: bool):
  return layer_gradient_fn(module, autodiff)(variables, x, weights)


def skip_without_kernels(layout):
  if layout == 'kernel' and kernels.unavailable_reason():  # A failing compiler fails the test instead.
    pytest.skip(f'the CPU kernels are not used here ({kernels.unavailable_reason()})')


def started_layer(module, x, warm_up):
  """Variables after one training step on `warm_up`, so that 'running' mode mixes old and batch moments."""
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  return {**variables, **train_apply(module, variables, warm_up)[1]}


@pytest.mark.parametrize('group_size, channels, source', LAYER_CASES)
@pytest.mark.parametrize('method', bw.METHODS)
def test_closed_form_gradient_equals_autodiff_float64(method, group_size, channels, source):
  with jax.enable_x64(True):
    module = bw.BatchWhitening(group_size=group_size, method=method, momentum=0.6, epsilon=1e-2,
                               center_with=source, whiten_with=source)
    x = jnp.asarray(correlated(70, (10, channels)))
    variables = started_layer(module, x, jnp.asarray(correlated(71, (10, channels))))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(10, channels)))
    closed, auto = (layer_gradients(module, variables, x, weights, autodiff) for autodiff in (False, True))
  assert np.abs(np.asarray(auto[0])).max() > 1e-2, 'the reference gradient must not vanish'
  for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(auto)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('method', bw.METHODS)
def test_closed_form_gradient_equals_autodiff_on_degenerate_batches(method):
  with jax.enable_x64(True):
    module = bw.BatchWhitening(group_size=8, method=method, momentum=0.9, epsilon=1e-5)
    cases = {k: jnp.asarray(v, jnp.float64) for k, v in degenerate_batches().items()
             if k in ('duplicated_at_scale_1e6', 'constant_channels', 'all_zero')}  # one shape: one compile
    variables = module.init(jax.random.key(0), cases['all_zero'], use_running_average=False)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=cases['all_zero'].shape))
    closed_fn, auto_fn = (layer_gradient_fn(module, autodiff) for autodiff in (False, True))
    for case, x in cases.items():
      closed, auto = closed_fn(variables, x, weights), auto_fn(variables, x, weights)
      scale = max(np.abs(np.asarray(leaf)).max() for leaf in jax.tree.leaves(auto))
      for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(auto)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale, err_msg=case)


def test_closed_form_takes_the_fallback_on_a_rank_deficient_group_at_large_scale():
  # The same case as above, but checking that it exercises the fallback, in float32 as in training.
  x = jnp.asarray(degenerate_batches()['duplicated_at_scale_1e6'])
  module = bw.BatchWhitening(group_size=8)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  assert train_apply(module, variables, x)[1]['bw_health']['fallbacks'] >= 1
  grad = jax.grad(lambda x: jnp.sum(jnp.tanh(train_apply(module, variables, x)[0])))(x)
  assert np.all(np.isfinite(grad))


def test_whiten_gradient_equals_autodiff_float64():
  with jax.enable_x64(True):
    x = jnp.asarray(correlated(72, (40, 8)))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(40, 8)))
    grads = []
    for autodiff in (False, True):
      with autodiff_backward(autodiff):
        grads.append(jax.grad(lambda x: jnp.sum(weights * bw.whiten(x, 4, 'zca')))(x))
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-10)


# Second order: reverse over reverse works, forward mode of the layer itself needs the autodiff flag.


@pytest.mark.slow  # Second order in float64.
@pytest.mark.parametrize('group_size, channels', [(3, 6), (4, 8)])  # XLA products, CPU kernels
def test_hessian_vector_product_equals_autodiff_float64(group_size, channels):
  with jax.enable_x64(True):
    module = bw.BatchWhitening(group_size=group_size, momentum=0.6, epsilon=1e-2, use_bias=False)
    x = jnp.asarray(correlated(73, (10, channels)))
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    direction = jnp.asarray(np.random.default_rng(4).normal(size=(10, channels)))
    loss = lambda x: jnp.sum(jnp.sin(train_apply(module, variables, x)[0]))
    products = []
    for autodiff in (False, True):
      with autodiff_backward(autodiff):
        products.append(jax.jvp(jax.grad(loss), (x,), (direction,))[1])  # jax.hessian's jacfwd(jacrev)
  assert np.abs(np.asarray(products[1])).max() > 1e-2
  np.testing.assert_allclose(products[0], products[1], rtol=1e-8, atol=1e-8)


def test_forward_mode_of_the_layer_raises_unless_autodiff():
  x = jnp.asarray(correlated(74, (10, 6)).astype(np.float32))
  f = lambda x: bw.whiten(x, 3)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(f, (x,), (x,))
  with autodiff_backward():
    assert np.all(np.isfinite(jax.jvp(f, (x,), (x,))[1]))


# Forward passes


def test_one_pass_moments_keep_their_digits_for_a_large_mean():
  # Mean 1e4 × the standard deviation: naive one-pass float32 moments (E[xxᵀ] − μμᵀ) lose all digits.
  x = correlated(75, (4096, 8), offset=0.0) + 1e4 * np.linspace(1.0, 2.0, 8)
  mean, cov = np_moments(x, 4)
  x32 = jnp.asarray(x, jnp.float32)
  j_mean, j_cov = bw.batch_moments(x32, 4)
  naive = np.asarray(gp.group_scatter(x32, 2)) / 4096 - np.stack(
      [np.outer(m, m) for m in np.asarray(jnp.mean(x32, 0)).reshape(2, 4)])
  scale = np.abs(cov).max()
  assert np.abs(naive * 4096 / 4095 - cov).max() > 0.1 * scale, 'the naive formula should fail here'
  np.testing.assert_allclose(j_mean, mean, rtol=1e-6)
  np.testing.assert_allclose(j_cov, cov, atol=1e-4 * scale)
  # The whitened output keeps its digits too: the centring folded into the product reads x − x₀.
  y = np.asarray(bw.whiten(x32, 4), np.float64)
  np.testing.assert_allclose(group_covariances(y, 4), np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-3)


@pytest.mark.parametrize('layout', gp.LAYOUTS)
@pytest.mark.parametrize('channels', [24, 96])
def test_every_layout_computes_the_numpy_products(layout, channels):
  skip_without_kernels(layout)
  rng = np.random.default_rng(5)
  a, b = (rng.normal(size=(40, channels)) for _ in range(2))
  mats = rng.normal(size=(channels // 8, 8, 8))
  blocks = lambda v: v.reshape(40, -1, 8)
  with jax.enable_x64(True):
    cross = gp.group_cross(jnp.asarray(a), jnp.asarray(b), channels // 8, accumulate=jnp.float64, layout=layout)
    sums = gp.group_sums(jnp.asarray(a), channels // 8, accumulate=jnp.float64, layout=layout)
    transform = gp.group_transform([(jnp.asarray(a), jnp.asarray(mats)), (jnp.asarray(b), jnp.asarray(mats))],
                                   layout=layout)
  np.testing.assert_allclose(cross, np.einsum('mgi,mgj->gij', blocks(a), blocks(b)), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sums, blocks(a).sum(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(transform, np.einsum('mgj,gij->mgi', blocks(a) + blocks(b), mats).reshape(40, -1),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('layout', ['dense', 'batched', 'transposed', 'kernel'])
def test_whitening_with_affine_equals_numpy_and_autodiff_in_every_layout_float64(layout):
  skip_without_kernels(layout)
  # γ and β ride in the whitening GEMM's matrix and offset column; their gradients come from the backward
  # pass's cross product. Reference: the float64 NumPy formula, and autodiff for the gradient.
  rng = np.random.default_rng(6)
  x, weights = correlated(77, (40, 24)), rng.normal(size=(40, 24))
  scale, bias = rng.uniform(0.5, 2.0, size=24), rng.normal(size=24)
  statistics = functools.partial(bw._batch_statistics, method='cholesky', epsilon=1e-3, newton_iterations=5)
  with jax.enable_x64(True):
    whiten = lambda x, scale, bias: whiten_training(x, 3, statistics, scale=scale, bias=bias, layout=layout)[0]
    loss = lambda *args: jnp.sum(weights * whiten(*args))
    args = tuple(map(jnp.asarray, (x, scale, bias)))
    y = whiten(*args)
    grads = []
    for autodiff in (False, True):
      with autodiff_backward(autodiff):
        grads.append(jax.grad(loss, argnums=(0, 1, 2))(*args))
  mean, cov = np_moments(x, 8)
  np.testing.assert_allclose(y, scale * np_apply(x, mean, np_whitening(cov, 'cholesky', 1e-3)) + bias,
                             rtol=1e-10, atol=1e-10)
  for closed, auto in zip(*grads):
    assert np.abs(np.asarray(auto)).max() > 1e-2
    np.testing.assert_allclose(closed, auto, rtol=1e-10, atol=1e-10)


def test_layout_cost_model_follows_the_measured_table():
  # Without the CPU kernels (test_kernels.py covers the choice with them).
  assert [gp.xla_cpu_layout(c) for c in (32, 64, 96, 240, 1152)] == ['dense'] * 2 + ['batched'] * 3


# bfloat16


def test_bfloat16_input_whitens_within_twice_the_float32_error():
  # bf16 activations are cast to float32 inside the shifting pass; with d rounded back to bf16 for bf16
  # GEMMs (f32 accumulation) this measured 0.038 against 0.0042: the products therefore stay float32.
  x = jnp.asarray(correlated(76, (64, 8, 8, 16)), jnp.bfloat16)
  identity = np.broadcast_to(np.eye(16), (1, 16, 16))
  error = lambda y: np.linalg.norm(group_covariances(np.asarray(y, np.float64), 16) - identity)
  bf16_error = error(bw.whiten(x, None))
  f32_error = error(bw.whiten(x.astype(jnp.float32), None))
  assert bf16_error <= 2.0 * f32_error + 1e-4, (bf16_error, f32_error)
  assert bf16_error > 1e-4, 'the comparison needs a measurable error'
