"""EfficientNet B0–B7 with Batch Whitening at the design's three places: stem, MBConv blocks and head.

The architecture is data: `STAGES` (the reference block table of tensorflow/tpu `efficientnet_builder.py`)
and `VARIANTS` (width, depth, resolution, dropout), read by one builder, `block_specs`. Where BW goes is
chosen by three independent knobs, each one of the design's drawings (docs/design.md §3):

  stem_type   1: conv 3×3 s2 → BN → swish
              2: depthwise 3×3 s2 → BW → conv 1×1 (+β) → swish
  mbconv_type 0: [expand 1×1 → BN → swish] → depthwise → BN → swish → SE → project 1×1 → BN → [skip]
              1|2|3: [BW → expand 1×1 (+β) → swish] → depthwise stage → swish → BW → SE → project 1×1 (+β)
                 → [skip], the depthwise stage being 1: BN → depthwise, 2: depthwise → BN, 3: depthwise
  head_type   1: conv 1×1 → BN → swish;  2: BW → conv 1×1 (+β) → swish
BW layers carry no γ/β of their own: the following 1×1 conv colours the whitened signal and its bias is β.
`folded=True` is the inference network of `bw_jax.models.fold.fold_for_inference`: no BW layers at all.
"""

import dataclasses
import functools
import math
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp

from bw_jax.models.depthwise import DepthwiseConv
from bw_jax.checks import check_choice
from bw_jax.nn.group_products import xla_cpu_layout
from bw_jax.nn.whitening import BWSettings, fit_group_size


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


def published_resolution(variant: str) -> int:
  """The image side `variant` was trained and evaluated at (Tan & Le 2019): 224 for B0 … 600 for B7."""
  check_choice('variant', variant, tuple(VARIANTS))
  return VARIANTS[variant].resolution


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


class Dropout(nn.Dropout):
  """flax's Dropout with its mask drawn sharded as the input is: under explicit sharding flax 0.12 draws a
  replicated mask, which `lax.select` refuses to pair with a sharded batch. Elsewhere the same random bits
  and outputs as flax's."""

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    dropped = {d % inputs.ndim for d in self.broadcast_dims}  # whole along these: the mask has size 1 there
    shape = tuple(1 if d in dropped else n for d, n in enumerate(inputs.shape))
    mask = jax.random.bernoulli(rng, keep, shape, out_sharding=mask_sharding(inputs, dropped))
    return jax.lax.select(jnp.broadcast_to(mask, inputs.shape), inputs / keep, jnp.zeros_like(inputs))


def mask_sharding(inputs: jax.Array, dropped: set[int]) -> jax.sharding.PartitionSpec | None:
  """The input's spec without the `dropped` axes under explicit sharding; None (JAX decides) elsewhere."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.explicit_axes:
    return None
  spec = tuple(jax.typeof(inputs).sharding.spec) + (None,) * inputs.ndim
  return jax.sharding.PartitionSpec(*(None if d in dropped else spec[d] for d in range(inputs.ndim)))


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


class FixedWhitening(nn.Module):
  """BW in evaluation as plain parameters: y = S x + b per group of g channels, x (..., C) -> (..., C).

  What `fold_for_inference` leaves of the BW before squeeze-excite, whose per-channel gate no 1×1 conv can
  be moved past: `kernel` (G, g, g) holds the running S, `bias` (C,) −S μ. Computed with XLA's products, never
  the CPU kernels (custom calls), so that `jax.export` takes the folded network as it is.
  """
  group_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    groups, g = channels // self.group_size, self.group_size
    kernel = self.param('kernel', lambda _, shape: jnp.tile(jnp.eye(g), (groups, 1, 1)), (groups, g, g))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    samples = x.reshape(-1, channels).astype(jnp.float32)
    layout = xla_cpu_layout(channels)  # Per group y_g = x_g Sᵀ.
    y = layout.back(layout.transform(layout.operand(samples, groups), kernel)) + bias
    return y.reshape(x.shape).astype(self.dtype)


def folded_away(channels: int, name: str):
  """The BW layer of a folded network whose 1×1 conv absorbed it: the identity."""
  del channels, name
  return lambda x: x


# A module factory: called with the layer's own arguments (channels, name) it returns a Flax module; the
# network binds the shared ones (train flag, dtype, settings) once with functools.partial, as flax's ResNet.
ModuleDef = Any


class MBConv(nn.Module):
  """Mobile inverted bottleneck with squeeze-excite; `mbconv_type` picks the design's variant (see top).

  Attributes:
    spec: the block's shape (channels, kernel, stride, expansion, stochastic-depth rate).
    mbconv_type: 0 (BN) or 1, 2, 3 (BW; module docstring).
    conv: `conv(features, kernel_size, strides=…, use_bias=…, name=…)` -> nn.Conv-like.
    depthwise: `depthwise(kernel_size, strides, name=…)` -> DepthwiseConv-like.
    norm: `norm(name=…)` -> nn.BatchNorm-like, bound to the train flag.
    whiten: `whiten(channels, name=…)` -> BatchWhitening, bound to the train flag.
    whiten_before_se: the same for the BW before squeeze-excite (None: `whiten`); differs when folded.
  """
  spec: BlockSpec
  mbconv_type: int
  conv: ModuleDef
  depthwise: ModuleDef
  norm: ModuleDef
  whiten: ModuleDef
  whiten_before_se: ModuleDef | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    """inputs: (N, H, W, in_channels) -> (N, H/stride, W/stride, out_channels)."""
    spec, whitened = self.spec, self.mbconv_type != 0
    expanded = spec.in_channels * spec.expand_ratio
    x = inputs
    if spec.expand_ratio != 1:
      if whitened:
        x = self.whiten(spec.in_channels, name='expand_bw')(x)
      x = self.conv(features=expanded, kernel_size=(1, 1), use_bias=whitened, name='expand_conv')(x)
      x = nn.swish(x if whitened else self.norm(name='expand_bn')(x))
    depthwise = self.depthwise(kernel_size=spec.kernel_size, strides=spec.stride, name='depthwise_conv')
    if self.mbconv_type == 1:
      x = depthwise(self.norm(name='depthwise_bn')(x))
    else:
      x = depthwise(x)
      x = x if self.mbconv_type == 3 else self.norm(name='depthwise_bn')(x)
    x = nn.swish(x)
    if whitened:
      x = (self.whiten_before_se or self.whiten)(expanded, name='depthwise_bw')(x)
    x = SqueezeExcite(reduced_channels=max(1, int(spec.in_channels * SE_RATIO)), dtype=self.dtype, name='se')(x)
    x = self.conv(features=spec.out_channels, kernel_size=(1, 1), use_bias=whitened, name='project_conv')(x)
    if not whitened:
      x = self.norm(name='project_bn')(x)
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
      # Stochastic depth: the residual branch of whole examples dropped with probability rate, rescaled.
      x = Dropout(rate=spec.drop_connect_rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                  name='drop_connect')(x) + inputs
    return x


class EfficientNet(nn.Module):
  """EfficientNet-B0…B7 with optional Batch Whitening; NHWC images (N, H, W, 3) -> logits (N, classes).

  `apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key})` trains (batch
  statistics, dropout and drop-connect); `train=False` evaluates with the running statistics.

  Attributes:
    variant: 'b0' … 'b7' (width, depth, dropout of the reference scaling; its published image size,
      `published_resolution`, is the default `dataset.image_size` of configs/imagenet.py).
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
    folded: the inference network of `fold_for_inference` (evaluation only): each BW before a 1×1 conv is
      folded into that conv, the BW before squeeze-excite is a `FixedWhitening`.
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
  folded: bool = False

  def __post_init__(self):
    check_choice('variant', self.variant, tuple(VARIANTS))
    check_choice('stem_type', self.stem_type, STEM_TYPES)
    check_choice('mbconv_type', self.mbconv_type, MBCONV_TYPES)
    check_choice('head_type', self.head_type, HEAD_TYPES)
    check_choice('stem_stride', self.stem_stride, (1, 2))
    if not isinstance(self.bw, BWSettings):
      raise TypeError(f'bw must be a bw_jax.nn.whitening.BWSettings, got {type(self.bw).__name__}; build it '
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
    if self.folded and train:
      raise ValueError('A folded EfficientNet (fold_for_inference) only evaluates: call it with train=False, or '
                       'train the unfolded network.')
    conv = functools.partial(nn.Conv, padding='SAME', use_bias=False, kernel_init=conv_kernel_init,
                             dtype=self.dtype)
    depthwise = functools.partial(DepthwiseConv, implementation=self.depthwise_implementation, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    whiten = functools.partial(self.bw.layer, use_running_average=not train, use_scale=False, use_bias=False,
                               dtype=self.dtype)
    whiten_before_se = whiten
    if self.folded:
      whiten = folded_away
      whiten_before_se = lambda channels, name: FixedWhitening(fit_group_size(channels, self.bw.group_size),
                                                               dtype=self.dtype, name=name)
    x = images.astype(self.dtype)
    stem_channels = round_filters(STEM_CHANNELS, width)
    if self.stem_type == 1:
      x = conv(features=stem_channels, kernel_size=(3, 3), strides=self.stem_stride, name='stem_conv')(x)
      x = norm(name='stem_bn')(x)
    else:
      x = depthwise(kernel_size=3, strides=self.stem_stride, name='stem_depthwise')(x)
      x = whiten(x.shape[-1], name='stem_bw')(x)
      x = conv(features=stem_channels, kernel_size=(1, 1), use_bias=True, name='stem_conv')(x)
    x = nn.swish(x)
    for index, spec in enumerate(block_specs(width, depth, self.drop_connect_rate)):
      x = MBConv(spec=spec, mbconv_type=self.mbconv_type, conv=conv, depthwise=depthwise, norm=norm,
                 whiten=whiten, whiten_before_se=whiten_before_se, dtype=self.dtype,
                 name=f'block_{index}')(x, train=train)
    head_channels = round_filters(HEAD_CHANNELS, width)
    if self.head_type == 1:
      x = conv(features=head_channels, kernel_size=(1, 1), name='head_conv')(x)
      x = norm(name='head_bn')(x)
    else:
      x = whiten(x.shape[-1], name='head_bw')(x)
      x = conv(features=head_channels, kernel_size=(1, 1), use_bias=True, name='head_conv')(x)
    x = jnp.mean(nn.swish(x), axis=(1, 2))
    x = Dropout(rate=dropout, deterministic=not train)(x)
    x = nn.Dense(features=self.num_classes, kernel_init=dense_kernel_init, dtype=self.dtype,
                 name='classifier')(x)
    return x.astype(jnp.float32)
