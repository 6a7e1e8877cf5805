"""Depthwise convolution (one k×k filter per channel, TF 'SAME' padding) that is fast on CPU.

XLA's CPU grouped convolution (`feature_group_count=C`) is slow on EfficientNet's depthwise layers: a
training step takes 13–26× longer than with the 'shift' implementation (benchmarks/depthwise_conv.py),
the sum over the k² kernel taps

  y[n, a, b, c] = Σ_{i,j} x_pad[n, s·a + i, s·b + j, c] · kernel[i, j, 0, c]

of strided slices of the padded input. Its backward pass is written by hand (`jax.custom_vjp`): autodiff
turns the input gradient into k² interior pads of input size (for 5×5 stride 2 over ten times slower than
the polyphase form of `_input_grad`) and streams the whole batch from memory once per tap for the kernel
gradient (`_kernel_grad` loops over cache-sized batch chunks instead).
"""

from collections.abc import Callable, Iterator
import math
from typing import Any

from flax import linen as nn
from flax.linen import initializers
import jax
import jax.numpy as jnp

from bw_jax.checks import check_choice
from bw_jax.nn.dtypes import accumulation_dtype
from bw_jax.nn.sharding import sample_axes

IMPLEMENTATIONS = ('auto', 'xla', 'shift')

# The kernel gradient loops over batch chunks of this many padded-input bytes (half a core's L2 cache
# here) once the padded batch exceeds the second number. On a 2-core Xeon with 2 MiB L2 per core that made
# it 1.1–2.6× faster from 9 MiB on, while below 8 MiB the loop cost up to 1 ms more than straight code.
KERNEL_GRAD_CHUNK_BYTES = 1 << 20
CHUNKED_KERNEL_GRAD_BYTES = 8 << 20


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, tuple[int, int]]:
  """Output size ceil(size / stride) and (low, high) padding of TF/lax 'SAME': the odd pixel goes high."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return out, (total // 2, total - total // 2)


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, implementation: str = 'auto') -> jax.Array:
  """Depthwise 'SAME' convolution: x (N, H, W, C), kernel (k, k, 1, C) -> (N, ceil(H/s), ceil(W/s), C).

  The kernel layout is flax.linen.Conv's with feature_group_count=C. The result has x's dtype (the kernel
  is cast to it, as flax does for a given `dtype`); 'shift' accumulates 16-bit inputs in float32. 'shift'
  has a custom VJP, hence reverse-mode only: forward mode (jax.jvp, jacfwd) needs 'xla' or `shift_sum`.

  'auto' is decided per platform when the program is lowered (`jax.lax.platform_dependent`), not from the
  backend at trace time: 'shift' on CPU, XLA's grouped convolution on GPU and TPU, where it is fast. So an
  AOT lowering or `jax.export` for 'cuda' or 'tpu' from a CPU host gets the grouped convolution, a CPU
  device on a GPU host gets 'shift', and a multi-platform export holds both (chosen at compile time).
  """
  check_choice('implementation', implementation, IMPLEMENTATIONS)
  if not isinstance(strides, int) or strides < 1:
    raise ValueError(f'strides must be a positive int (the same along H and W), got {strides!r}.')
  k, channels = kernel.shape[0], x.shape[-1]
  if x.ndim != 4 or kernel.shape != (k, k, 1, channels):
    raise ValueError(f'depthwise_conv expects x (N, H, W, C) and kernel (k, k, 1, C); got x {x.shape} '
                     f'and kernel {kernel.shape}.')
  kernel = kernel.astype(x.dtype)
  xla = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), 'SAME', feature_group_count=channels,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  shift = lambda x, kernel: _shift_conv(x, kernel, strides, x.shape)
  if implementation == 'auto':
    return jax.lax.platform_dependent(x, kernel, cpu=shift, default=xla)
  return xla(x, kernel) if implementation == 'xla' else shift(x, kernel)


def shift_sum(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """The 'shift' forward pass in plain jnp, differentiable by autodiff: same shapes as depthwise_conv."""
  return _sum_of_taps(_pad(x, kernel.shape[0], strides), kernel, strides, x.dtype)


def _sum_of_taps(x_pad: jax.Array, kernel: jax.Array, strides: int, dtype: Any) -> jax.Array:
  acc = accumulation_dtype(dtype)
  taps = _taps(x_pad, kernel.shape[0], strides)
  return sum(tap.astype(acc) * kernel[i, j, 0].astype(acc) for (i, j), tap in taps).astype(dtype)


def _shift_conv_fwd(x, kernel, strides, x_shape):
  x_pad = _pad(x, kernel.shape[0], strides)
  return _sum_of_taps(x_pad, kernel, strides, x.dtype), (x_pad, kernel)  # x_pad: padded once for both


def _shift_conv_bwd(strides, x_shape, saved, g):
  x_pad, kernel = saved
  return _input_grad(g, kernel, x_shape, strides), _kernel_grad(g, x_pad, kernel.shape[0], strides)


# x_shape rides along as a static argument: the backward pass cannot tell H from the padded height.
_shift_conv = jax.custom_vjp(lambda x, kernel, strides, x_shape: shift_sum(x, kernel, strides),
                             nondiff_argnums=(2, 3))
_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def _input_grad(g: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...], strides: int) -> jax.Array:
  """The transposed convolution: g (N, Ho, Wo, C), kernel (k, k, 1, C) -> (N, H, W, C).

  Polyphase form: padded-input pixel s·q + r receives g[q − d]·kernel[r + s·d] only, so each of the s²
  phases (r, t) is a sum of shifted copies of g on the small grid, and interior padding interleaves the
  phases. Work k²·|g| instead of autodiff's k²·|x|.
  """
  (_, h, w, _), k, s = x_shape, kernel.shape[0], strides
  (out_h, pad_h), (out_w, pad_w) = same_padding(h, k, s), same_padding(w, k, s)
  phase_h, phase_w = -(-(h + sum(pad_h)) // s), -(-(w + sum(pad_w)) // s)
  acc = accumulation_dtype(g.dtype)
  zero, g = jnp.zeros((), acc), g.astype(acc)
  shifted = lambda a, d_h, d_w: jax.lax.pad(a, zero, ((0, 0, 0), (d_h, phase_h - out_h - d_h, 0),
                                                       (d_w, phase_w - out_w - d_w, 0), (0, 0, 0)))
  dx_pad = 0
  for r in range(min(s, k)):  # a phase r ≥ k (strides above k) meets no tap: zero gradient
    for t in range(min(s, k)):
      phase = sum(shifted(g * kernel[i, j, 0].astype(acc), (i - r) // s, (j - t) // s)
                  for i in range(r, k, s) for j in range(t, k, s))
      dx_pad += jax.lax.pad(phase, zero, ((0, 0, 0), (r, s - 1 - r, s - 1), (t, s - 1 - t, s - 1), (0, 0, 0)))
  return dx_pad[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w].astype(kernel.dtype)


def _kernel_grad(g: jax.Array, x_pad: jax.Array, kernel_size: int, strides: int) -> jax.Array:
  """Σ over (n, a, b) of g times each tap's window: g (N, Ho, Wo, C), x_pad (N, Hp, Wp, C) -> (k, k, 1, C).

  A padded batch above CHUNKED_KERNEL_GRAD_BYTES is looped over in chunks of KERNEL_GRAD_CHUNK_BYTES, so
  that the k² reductions re-read a chunk from cache instead of the whole batch from memory.
  """
  k, (n, *_, channels) = kernel_size, x_pad.shape
  acc = accumulation_dtype(x_pad.dtype)

  def tap_sums(x_chunk: jax.Array, g_chunk: jax.Array) -> jax.Array:  # (k², C)
    return jnp.stack([jnp.sum(tap.astype(acc) * g_chunk.astype(acc), axis=(0, 1, 2))
                      for _, tap in _taps(x_chunk, k, strides)])

  chunk = max(1, KERNEL_GRAD_CHUNK_BYTES // (math.prod(x_pad.shape[1:]) * x_pad.dtype.itemsize))
  # Under explicit sharding of the batch each device sums its own images (and chunks of a sharded batch
  # would be slices JAX refuses): no loop.
  if x_pad.size * x_pad.dtype.itemsize <= CHUNKED_KERNEL_GRAD_BYTES or chunk >= n or sample_axes(x_pad):
    total = tap_sums(x_pad, g)
  else:
    whole = n - n % chunk  # the n % chunk last images are summed outside the loop
    tail = tap_sums(x_pad[whole:], g[whole:]) if whole < n else jnp.zeros((k * k, channels), acc)
    chunk_of = lambda a, i: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk)  # no copy of x_pad or g
    add_chunk = lambda i, total: total + tap_sums(chunk_of(x_pad, i), chunk_of(g, i))
    total = jax.lax.fori_loop(0, whole // chunk, add_chunk, tail)
  return total.reshape(k, k, 1, channels).astype(x_pad.dtype)


def _pad(x: jax.Array, kernel_size: int, strides: int) -> jax.Array:
  """x (N, H, W, C) with 'SAME' padding."""
  pads = [same_padding(size, kernel_size, strides)[1] for size in x.shape[1:3]]
  return jnp.pad(x, [(0, 0), *pads, (0, 0)])


def _taps(x_pad: jax.Array, kernel_size: int, strides: int) -> Iterator[tuple[tuple[int, int], jax.Array]]:
  """((i, j), the (N, Ho, Wo, C) strided window of x_pad that tap (i, j) multiplies), row-major.

  Ho = (Hp − k) // s + 1 is the 'SAME' output size ceil(H / s) for every 'SAME'-padded height Hp.
  """
  n, h_pad, w_pad, channels = x_pad.shape
  out_h, out_w = (h_pad - kernel_size) // strides + 1, (w_pad - kernel_size) // strides + 1
  for i in range(kernel_size):
    for j in range(kernel_size):
      end = (n, i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1, channels)
      yield (i, j), jax.lax.slice(x_pad, (0, i, j, 0), end, (1, strides, strides, 1))


def efficientnet_depthwise_init(kernel_size: int) -> Callable[..., jax.Array]:
  """TF EfficientNet's depthwise init: normal (not truncated), std sqrt(2 / fan_out) with fan_out = k·k.

  TF counts fan_out of its (k, k, C, 1) depthwise kernel as k·k·1; flax's variance_scaling('fan_out') on
  our (k, k, 1, C) layout would count k·k·C (a √C times smaller std), and its he_normal truncates.
  """
  return initializers.normal(stddev=math.sqrt(2.0 / (kernel_size * kernel_size)))


class DepthwiseConv(nn.Module):
  """Depthwise k×k convolution, TF 'SAME' padding: (N, H, W, C) -> (N, ceil(H/s), ceil(W/s), C).

  Params `kernel` (k, k, 1, C) and `bias` (C,) have the names and layout of flax.linen.Conv(features=C,
  feature_group_count=C, padding='SAME'), so checkpoints are interchangeable; dtypes are promoted as there.

  Attributes:
    kernel_size: k, the same along H and W.
    strides: s, the same along H and W.
    implementation: 'auto' ('shift' on CPU, 'xla' elsewhere, chosen at lowering), 'xla' or 'shift'; see
      `depthwise_conv`.
    use_bias: add a learned per-channel bias.
    dtype: computation dtype (None: promoted from the input and the params).
    param_dtype: dtype of the params.
    kernel_init: initialiser of the kernel (None: `efficientnet_depthwise_init(kernel_size)`).
    bias_init: initialiser of the bias.
  """

  kernel_size: int
  strides: int = 1
  implementation: str = 'auto'
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] | None = None
  bias_init: Callable[..., jax.Array] = initializers.zeros

  def __post_init__(self):
    check_choice('implementation', self.implementation, IMPLEMENTATIONS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (N, H, W, C) -> (N, ceil(H/s), ceil(W/s), C)."""
    channels = x.shape[-1]
    kernel_init = self.kernel_init or efficientnet_depthwise_init(self.kernel_size)
    kernel = self.param('kernel', kernel_init, (self.kernel_size, self.kernel_size, 1, channels),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (channels,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = depthwise_conv(x, kernel, self.strides, self.implementation)
    return y if bias is None else y + bias
