"""EfficientNet B0–B7 with Batch Whitening at the seed's three places: stem, MBConv blocks and head.

The architecture is data: `STAGES` (the reference block table of tensorflow/tpu `efficientnet_builder.py`)
and `VARIANTS` (width, depth, resolution, dropout), read by one builder, `block_specs`. Where BW goes is
chosen by three independent knobs, each the seed's whiteboard drawing (docs/design.md §3):

  stem_type   1: conv 3×3 s2 → BN → swish
              2: depthwise 3×3 s2 → BW → conv 1×1 (+β) → swish
  mbconv_type 0: [expand 1×1 → BN → swish] → depthwise → BN → swish → SE → project 1×1 → BN → [skip]
              1|2|3: [BW → expand 1×1 (+β) → swish] → depthwise stage → swish → BW → SE → project 1×1 (+β)
                 → [skip], the depthwise stage being 1: BN → depthwise, 2: depthwise → BN, 3: depthwise
  head_type   1: conv 1×1 → BN → swish;  2: BW → conv 1×1 (+β) → swish
BW layers carry no γ/β of their own: the following 1×1 conv colours the whitened signal and its bias is β.
"""

import dataclasses
import functools
import math
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp

from bw_jax.depthwise import DepthwiseConv
from bw_jax.checks import check_choice
from bw_jax.whitening import BWSettings


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the reference block table (for B0; other variants scale channels and repeats)."""
  expand_ratio: int
  kernel_size: int
  stride: int
  repeats: int
  channels: int


STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(6, 3, 2, 2, 24),
    Stage(6, 5, 2, 2, 40),
    Stage(6, 3, 2, 3, 80),
    Stage(6, 5, 1, 3, 112),
    Stage(6, 5, 2, 4, 192),
    Stage(6, 3, 1, 1, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
SE_RATIO = 0.25  # of the block's input channels
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
  width: float
  depth: float
  resolution: int
  dropout: float


VARIANTS = {
    'b0': Variant(1.0, 1.0, 224, 0.2),
    'b1': Variant(1.0, 1.1, 240, 0.2),
    'b2': Variant(1.1, 1.2, 260, 0.3),
    'b3': Variant(1.2, 1.4, 300, 0.3),
    'b4': Variant(1.4, 1.8, 380, 0.4),
    'b5': Variant(1.6, 2.2, 456, 0.4),
    'b6': Variant(1.8, 2.6, 528, 0.5),
    'b7': Variant(2.0, 3.1, 600, 0.5),
}
STEM_TYPES = (1, 2)
MBCONV_TYPES = (0, 1, 2, 3)
HEAD_TYPES = (1, 2)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
  """Scale channels by `width`, round to a multiple of `divisor`, never more than 10% down (TF rule)."""
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block, fully resolved."""
  expand_ratio: int
  kernel_size: int
  stride: int
  in_channels: int
  out_channels: int
  drop_connect_rate: float


def block_specs(width: float, depth: float, drop_connect_rate: float) -> list[BlockSpec]:
  """Every MBConv block of the scaled network; the drop-connect rate grows linearly with block index."""
  rows = []
  in_channels = round_filters(STEM_CHANNELS, width)
  for stage in STAGES:
    out_channels = round_filters(stage.channels, width)
    for i in range(round_repeats(stage.repeats, depth)):
      rows.append((stage.expand_ratio, stage.kernel_size, stage.stride if i == 0 else 1, in_channels,
                   out_channels))
      in_channels = out_channels
  return [BlockSpec(*row, drop_connect_rate * index / len(rows)) for index, row in enumerate(rows)]


# TF EfficientNet's initialisers: conv N(0, 2/fan_out) with fan_out = k·k·out; dense U(±1/√out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


class SqueezeExcite(nn.Module):
  """Channel attention: x · sigmoid(W₂ swish(W₁ mean_hw(x))). x: (N, H, W, C) -> (N, H, W, C)."""
  reduced_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_kernel_init, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.swish(conv(self.reduced_channels, name='reduce')(s))
    return x * nn.sigmoid(conv(x.shape[-1], name='expand')(s))


class Layers:
  """Factories for the layers every part of the network shares, bound to the train flag and settings."""

  def __init__(self, train: bool, bw: BWSettings, dtype: Any, depthwise_implementation: str):
    self.train, self.bw, self.dtype, self.depthwise_implementation = train, bw, dtype, depthwise_implementation

  def conv(self, channels: int, kernel_size: int = 1, strides: int = 1, use_bias: bool = False,
           name: str | None = None) -> nn.Conv:
    return nn.Conv(channels, (kernel_size, kernel_size), strides, padding='SAME', use_bias=use_bias,
                   kernel_init=conv_kernel_init, dtype=self.dtype, name=name)

  def depthwise(self, kernel_size: int, strides: int, name: str | None = None) -> DepthwiseConv:
    return DepthwiseConv(kernel_size, strides, implementation=self.depthwise_implementation,
                         dtype=self.dtype, name=name)

  def bn(self, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not self.train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=self.dtype, name=name)

  def bw_layer(self, channels: int, name: str | None = None) -> nn.Module:
    return self.bw.layer(channels, use_running_average=not self.train, use_scale=False, use_bias=False,
                         dtype=self.dtype, name=name)


class MBConv(nn.Module):
  """Mobile inverted bottleneck with squeeze-excite; `mbconv_type` picks the seed's variant (see top)."""
  spec: BlockSpec
  mbconv_type: int
  bw: BWSettings
  dtype: Any = jnp.float32
  depthwise_implementation: str = 'auto'

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    """inputs: (N, H, W, in_channels) -> (N, H/stride, W/stride, out_channels)."""
    spec, whitened = self.spec, self.mbconv_type != 0
    make = Layers(train, self.bw, self.dtype, self.depthwise_implementation)
    expanded = spec.in_channels * spec.expand_ratio
    x = inputs
    if spec.expand_ratio != 1:
      if whitened:
        x = make.bw_layer(spec.in_channels, name='expand_bw')(x)
      x = make.conv(expanded, use_bias=whitened, name='expand_conv')(x)
      x = nn.swish(x if whitened else make.bn(name='expand_bn')(x))
    depthwise = make.depthwise(spec.kernel_size, spec.stride, name='depthwise_conv')
    if self.mbconv_type == 1:
      x = depthwise(make.bn(name='depthwise_bn')(x))
    else:
      x = depthwise(x)
      x = x if self.mbconv_type == 3 else make.bn(name='depthwise_bn')(x)
    x = nn.swish(x)
    if whitened:
      x = make.bw_layer(expanded, name='depthwise_bw')(x)
    x = SqueezeExcite(max(1, int(spec.in_channels * SE_RATIO)), dtype=make.dtype, name='se')(x)
    x = make.conv(spec.out_channels, use_bias=whitened, name='project_conv')(x)
    if not whitened:
      x = make.bn(name='project_bn')(x)
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
      x = drop_connect(self, x, spec.drop_connect_rate, train) + inputs
    return x


def drop_connect(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth: drop the residual branch of whole examples with probability `rate`, rescale."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, (x.shape[0], 1, 1, 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class EfficientNet(nn.Module):
  """EfficientNet-B0…B7 with optional Batch Whitening; NHWC images (N, H, W, 3) -> logits (N, classes).

  `apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key})` trains (batch
  statistics, dropout and drop-connect); `train=False` evaluates with the running statistics.

  Attributes:
    variant: 'b0' … 'b7' (width, depth, dropout of the reference scaling).
    num_classes: size of the classifier.
    stem_type, mbconv_type, head_type: where BW goes (module docstring; 1, 0, 1 is the original network).
    bw: the settings of every BW layer. A layer whose channel count `bw.group_size` does not divide uses
      the largest divisor of its channel count not above it (e.g. 40 channels with g = 16 use g = 10).
    dtype: activation dtype (float32 or bfloat16); parameters and normalisation statistics stay float32.
    stem_stride: 2 as published; 1 keeps resolution for small images (32×32).
    dropout_rate: before the classifier; None takes the variant's (0.2 for B0).
    drop_connect_rate: stochastic depth: block i of n drops its residual branch with rate·i/n (as TF).
    width_multiplier, depth_multiplier: override the variant's scaling (tiny models for tests).
    depthwise_implementation: 'auto' (shifted slices on CPU, XLA's conv elsewhere), 'shift' or 'xla'.
  """
  variant: str = 'b0'
  num_classes: int = 1000
  stem_type: int = 1
  mbconv_type: int = 0
  head_type: int = 1
  bw: BWSettings = BWSettings()
  dtype: Any = jnp.float32
  stem_stride: int = 2
  dropout_rate: float | None = None
  drop_connect_rate: float = 0.2
  width_multiplier: float | None = None
  depth_multiplier: float | None = None
  depthwise_implementation: str = 'auto'

  def __post_init__(self):
    check_choice('variant', self.variant, tuple(VARIANTS))
    check_choice('stem_type', self.stem_type, STEM_TYPES)
    check_choice('mbconv_type', self.mbconv_type, MBCONV_TYPES)
    check_choice('head_type', self.head_type, HEAD_TYPES)
    check_choice('stem_stride', self.stem_stride, (1, 2))
    if not isinstance(self.bw, BWSettings):
      raise TypeError(f'bw must be a bw_jax.whitening.BWSettings, got {type(self.bw).__name__}; build it '
                      f'with BWSettings(**config.bw).')
    super().__post_init__()

  @property
  def scaling(self) -> tuple[float, float, float]:
    """(width, depth, dropout) after overrides."""
    v = VARIANTS[self.variant]
    return (v.width if self.width_multiplier is None else self.width_multiplier,
            v.depth if self.depth_multiplier is None else self.depth_multiplier,
            v.dropout if self.dropout_rate is None else self.dropout_rate)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    width, depth, dropout = self.scaling
    make = Layers(train, self.bw, self.dtype, self.depthwise_implementation)
    x = images.astype(self.dtype)
    stem_channels = round_filters(STEM_CHANNELS, width)
    if self.stem_type == 1:
      x = make.conv(stem_channels, 3, self.stem_stride, name='stem_conv')(x)
      x = make.bn(name='stem_bn')(x)
    else:
      x = make.depthwise(3, self.stem_stride, name='stem_depthwise')(x)
      x = make.bw_layer(x.shape[-1], name='stem_bw')(x)
      x = make.conv(stem_channels, use_bias=True, name='stem_conv')(x)
    x = nn.swish(x)
    for index, spec in enumerate(block_specs(width, depth, self.drop_connect_rate)):
      x = MBConv(spec, self.mbconv_type, self.bw, self.dtype, self.depthwise_implementation,
                 name=f'block_{index}')(x, train)
    head_channels = round_filters(HEAD_CHANNELS, width)
    if self.head_type == 1:
      x = make.bn(name='head_bn')(make.conv(head_channels, name='head_conv')(x))
    else:
      x = make.bw_layer(x.shape[-1], name='head_bw')(x)
      x = make.conv(head_channels, use_bias=True, name='head_conv')(x)
    x = jnp.mean(nn.swish(x), axis=(1, 2))
    x = nn.Dropout(dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)
