"""Depthwise convolution: 'shift' against XLA's grouped convolution and a float64 NumPy loop."""

import math
import re

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.models import depthwise as dw

# float32 round-off of sums of at most a few hundred O(1) products (k² taps forward, N·Ho·Wo positions for
# the kernel gradient) stays below ~1e-5; 1e-4 leaves a margin while any wrong tap or offset is O(1).
F32 = dict(rtol=1e-5, atol=1e-4)


def inputs(seed: int, x_shape: tuple[int, ...], kernel_size: int, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape).astype(dtype)
  kernel = rng.normal(size=(kernel_size, kernel_size, 1, x_shape[-1])).astype(dtype)
  return x, kernel


def conv_with(implementation: str, strides: int):
  return lambda x, kernel: dw.depthwise_conv(x, kernel, strides, implementation)


def value_and_grads(conv, x, kernel, seed: int = 7):
  """y, the gradient (x, kernel) of a random-weighted sum Σ r·y, and the weights r; jitted (eager
  dispatch of the k² small ops would dominate the test time)."""
  y_shape = jax.eval_shape(conv, x, kernel)
  weights = np.random.default_rng(seed).normal(size=y_shape.shape).astype(y_shape.dtype)
  loss = lambda x, k: jnp.sum(conv(x, k) * weights)
  y, grads = jax.jit(lambda x, k: (conv(x, k), jax.grad(loss, argnums=(0, 1))(x, k)))(x, kernel)
  return y, grads, weights


def np_depthwise(x: np.ndarray, kernel: np.ndarray, s: int, g: np.ndarray | None = None):
  """Direct float64 loops from TF's 'SAME' definition: Ho = ceil(H/s), padding total max((Ho−1)s + k − H, 0),
  low side floor(total/2). Returns y, and with a cotangent g also the VJP (dx, dkernel)."""
  x, kernel = x.astype(np.float64), kernel.astype(np.float64)
  n, h, w, c = x.shape
  k = kernel.shape[0]
  out_h, out_w = math.ceil(h / s), math.ceil(w / s)
  top = max((out_h - 1) * s + k - h, 0) // 2
  left = max((out_w - 1) * s + k - w, 0) // 2
  y = np.zeros((n, out_h, out_w, c))
  dx, dkernel = np.zeros_like(x), np.zeros_like(kernel)
  for a in range(out_h):
    for b in range(out_w):
      for i in range(k):
        for j in range(k):
          row, col = a * s + i - top, b * s + j - left
          if 0 <= row < h and 0 <= col < w:
            y[:, a, b] += x[:, row, col] * kernel[i, j, 0]
            if g is not None:
              dx[:, row, col] += g[:, a, b] * kernel[i, j, 0]
              dkernel[i, j, 0] += np.sum(g[:, a, b] * x[:, row, col], axis=0)
  return y, dx, dkernel


# Numbers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('hw', [(7, 7), (8, 8), (9, 9), (9, 6)])
def test_shift_equals_xla_in_outputs_and_gradients(kernel_size, strides, hw):
  x, kernel = inputs(0, (2, *hw, 3), kernel_size)
  y_xla, grads_xla, _ = value_and_grads(conv_with('xla', strides), x, kernel)
  y_shift, grads_shift, _ = value_and_grads(conv_with('shift', strides), x, kernel)
  assert y_shift.shape == (2, math.ceil(hw[0] / strides), math.ceil(hw[1] / strides), 3)
  np.testing.assert_allclose(y_shift, y_xla, **F32)
  for shift, xla in zip(grads_shift, grads_xla):
    np.testing.assert_allclose(shift, xla, **F32)


@pytest.mark.parametrize('kernel_size, strides', [(3, 1), (3, 2), (5, 1), (5, 2), (2, 2), (4, 3), (1, 2)])
def test_shift_equals_numpy_loop_float64(kernel_size, strides):
  # Even kernels and strides above 2 or above k (phases without taps in the input gradient) included.
  x, kernel = inputs(1, (2, 7, 6, 3), kernel_size, np.float64)
  with jax.enable_x64(True):
    y, (dx, dkernel), weights = value_and_grads(conv_with('shift', strides), x, kernel)
    assert y.dtype == jnp.float64
  y_np, dx_np, dkernel_np = np_depthwise(x, kernel, strides, weights)
  np.testing.assert_allclose(y, y_np, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dx, dx_np, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dkernel, dkernel_np, rtol=1e-12, atol=1e-12)


def test_float32_implementations_equal_numpy_loop():
  x, kernel = inputs(2, (3, 8, 9, 4), 5)
  y_np = np_depthwise(x, kernel, 2)[0]
  for implementation in ('xla', 'shift'):
    np.testing.assert_allclose(dw.depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), 2, implementation),
                               y_np, **F32)


def test_kernel_gradient_over_batch_chunks_with_a_remainder(monkeypatch):
  # 9 images in chunks of 2: a loop over four chunks plus the remaining image must add up to the full sum.
  x, kernel = inputs(3, (9, 7, 7, 3), 3)
  expected = value_and_grads(conv_with('xla', 2), x, kernel)[1]
  monkeypatch.setattr(dw, 'KERNEL_GRAD_CHUNK_BYTES', 2 * 9 * 9 * 3 * 4)  # two padded 9×9×3 float32 images
  monkeypatch.setattr(dw, 'CHUNKED_KERNEL_GRAD_BYTES', 0)
  chunked = value_and_grads(conv_with('shift', 2), x, kernel)[1]
  kernel_grad = lambda k: jax.grad(lambda k: jnp.sum(dw.depthwise_conv(jnp.asarray(x), k, 2, 'shift')))(k)
  assert 'length=4' in str(jax.make_jaxpr(kernel_grad)(kernel))  # the loop really runs over 4 chunks
  for actual, wanted in zip(chunked, expected):
    np.testing.assert_allclose(actual, wanted, **F32)


def test_custom_vjp_equals_autodiff_of_the_shift_sum():
  x, kernel = inputs(4, (2, 9, 8, 3), 5)
  custom = value_and_grads(conv_with('shift', 2), x, kernel)[1]
  autodiff = value_and_grads(lambda x, k: dw.shift_sum(x, k, 2), x, kernel)[1]
  for actual, wanted in zip(custom, autodiff):
    np.testing.assert_allclose(actual, wanted, **F32)


@pytest.mark.parametrize('implementation', ['xla', 'shift'])
def test_bfloat16_input_gives_bfloat16_output_close_to_float32(implementation):
  x, kernel = inputs(5, (2, 8, 8, 16), 5)
  x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
  y16, (dx, dkernel), _ = value_and_grads(conv_with(implementation, 2), x16, kernel16)
  assert y16.dtype == jnp.bfloat16
  # On the same (bf16-exact) inputs, float32 accumulation leaves one bf16 rounding of the result: 2⁻⁸
  # relative; against the unrounded float32 inputs add two 2⁻⁹ input roundings over 25 taps of size ~1.
  exact = dw.depthwise_conv(x16.astype(jnp.float32), kernel16.astype(jnp.float32), 2, implementation)
  np.testing.assert_allclose(y16.astype(jnp.float32), exact, rtol=2**-8, atol=2**-8)
  y32 = dw.depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), 2, implementation)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=0.02, atol=0.05)
  assert dx.dtype == dkernel.dtype == jnp.bfloat16


# The module ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('use_bias', [False, True])
def test_params_match_flax_grouped_conv_layout_and_outputs(use_bias):
  x = jnp.asarray(inputs(6, (2, 9, 9, 8), 3)[0])
  module = dw.DepthwiseConv(kernel_size=3, strides=2, use_bias=use_bias,
                            bias_init=nn.initializers.normal(1.0))
  variables = module.init(jax.random.key(0), x)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes == ({'kernel': (3, 3, 1, 8), 'bias': (8,)} if use_bias else {'kernel': (3, 3, 1, 8)})
  flax_conv = nn.Conv(features=8, kernel_size=(3, 3), strides=2, padding='SAME', feature_group_count=8,
                      use_bias=use_bias)
  assert jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(0), x)['params']) == shapes
  np.testing.assert_allclose(module.apply(variables, x), flax_conv.apply(variables, x), **F32)


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_default_kernel_init_is_tf_efficientnet_normal(kernel_size):
  variables = dw.DepthwiseConv(kernel_size).init(jax.random.key(1), jnp.ones((1, 4, 4, 4096)))
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  m, std = kernel.size, math.sqrt(2.0) / kernel_size  # m = k²·4096 ≥ 36 864 draws
  # The sample std of m normal draws has relative standard error 1/√(2m) ≤ 0.37%: 3% is ≥ 8 standard
  # errors, and far from flax's fan_out count k²·C (std 64× smaller) or a unit normal.
  assert abs(kernel.std() / std - 1.0) < 0.03
  assert abs(kernel.mean()) < 6 * std / math.sqrt(m)
  # Not truncated (as TF's random_normal): P(|z| > 2) = 4.55%, standard error ≤ 0.11%.
  assert 0.035 < np.mean(np.abs(kernel) > 2 * std) < 0.056


def auto_value_and_grad(x, kernel):
  """jit of (y, d/dx, d/dkernel of Σ y²) for 'auto', stride 2: forward and custom backward both lowered."""
  conv = lambda x, k: dw.depthwise_conv(x, k, 2, 'auto')
  return jax.jit(lambda x, k: (conv(x, k), jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), (0, 1))(x, k)))


@pytest.mark.parametrize('platform, grouped', [('cpu', False), ('cuda', True), ('tpu', True)])
def test_auto_is_chosen_per_lowering_platform_not_by_the_host_backend(platform, grouped):
  # Lowered from this CPU host: cuda and tpu must get XLA's grouped convolution (4 channels, 4 groups), the
  # CPU the shifted slices and no convolution at all.
  x, kernel = inputs(8, (2, 9, 9, 4), 3)
  text = auto_value_and_grad(x, kernel).trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()
  assert ('feature_group_count = 4' in text) == grouped
  assert ('stablehlo.convolution' in text) == grouped


def test_auto_compiles_to_no_convolution_on_cpu_and_matches_numpy():
  x, kernel = inputs(9, (2, 9, 9, 4), 3)
  fn = auto_value_and_grad(x, kernel)
  hlo = fn.lower(x, kernel).compile().as_text()
  assert re.search(r' convolution\(', hlo) is None  # the unused branch is gone (the op, not this name)
  assert re.search(r' slice\(', hlo)  # the check above can fail: the shift's taps are there
  y, (dx, dkernel) = fn(x, kernel)
  y_np, dx_np, dkernel_np = np_depthwise(x, kernel, 2, 2 * np_depthwise(x, kernel, 2)[0])
  for actual, wanted in ((y, y_np), (dx, dx_np), (dkernel, dkernel_np)):
    np.testing.assert_allclose(actual, wanted, **F32)


def test_one_multi_platform_export_holds_both_implementations():
  x, kernel = inputs(10, (2, 9, 9, 4), 3)
  exported = jax.export.export(auto_value_and_grad(x, kernel), platforms=('cpu', 'cuda'))(x, kernel)
  text = exported.mlir_module()
  assert exported.platforms == ('cpu', 'cuda')
  assert 'feature_group_count = 4' in text  # the cuda branch
  assert 'stablehlo.case' in text  # the platform switch, resolved when compiled
  # Run here, the artifact takes the CPU branch: the shift's numbers, equal to the float64 loop's.
  y, (dx, dkernel) = exported.call(x, kernel)
  y_np, dx_np, dkernel_np = np_depthwise(x, kernel, 2, 2 * np_depthwise(x, kernel, 2)[0])
  for actual, wanted in ((y, y_np), (dx, dx_np), (dkernel, dkernel_np)):
    np.testing.assert_allclose(actual, wanted, **F32)


def test_bad_implementation_is_rejected_with_the_allowed_names():
  message = "implementation='cudnn' is not supported; choose one of 'auto', 'xla', 'shift'"
  with pytest.raises(ValueError, match=re.escape(message)):
    dw.DepthwiseConv(3, implementation='cudnn')
  with pytest.raises(ValueError, match=re.escape(message)):
    dw.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, 'cudnn')


@pytest.mark.parametrize('kernel_shape, strides, message', [
    ((3, 3, 1, 5), 1, 'expects x (N, H, W, C) and kernel (k, k, 1, C)'),
    ((3, 3, 2, 2), 1, 'expects x (N, H, W, C) and kernel (k, k, 1, C)'),
    ((3, 3, 1, 2), 0, 'strides must be a positive int'),
])
def test_bad_shapes_and_strides_are_rejected(kernel_shape, strides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    dw.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones(kernel_shape), strides)
