"""EfficientNet with BW: published parameter counts, the design's BW placements, and that it trains."""

import functools
import itertools

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bw_jax.models import efficientnet as en
from bw_jax.models.depthwise import DepthwiseConv
from bw_jax.models.fold import fold_for_inference
from bw_jax.nn.whitening import BWSettings
import efficientnet_reference as reference

TINY = dict(width_multiplier=0.25, depth_multiplier=0.1, dropout_rate=0.0, drop_connect_rate=0.0)


def shapes_of(model: en.EfficientNet, size: int, batch: int = 1):
  """Variable shapes without computing anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False))


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# Parameter counts ----------------------------------------------------------------------------------------


def hand_count(stem: int, stages: list[tuple[int, int, int, int]], head: int, classes: int) -> int:
  """Trainable parameters of BN EfficientNet counted layer by layer from a channel list written by hand.

  stages: (expand_ratio, kernel, repeats, out_channels). BN has γ and β; convs before BN have no bias;
  SE has biases and reduces to int(0.25 · block input channels).
  """
  n = 3 * 3 * 3 * stem + 2 * stem
  c_in = stem
  for expand, k, repeats, c_out in stages:
    for _ in range(repeats):
      hidden = c_in * expand
      n += (c_in * hidden + 2 * hidden) if expand != 1 else 0
      n += k * k * hidden + 2 * hidden
      reduced = max(1, int(c_in * 0.25))
      n += hidden * reduced + reduced + reduced * hidden + hidden
      n += hidden * c_out + 2 * c_out
      c_in = c_out
  return n + c_in * head + 2 * head + head * classes + classes


B0_STAGES = [(1, 3, 1, 16), (6, 3, 2, 24), (6, 5, 2, 40), (6, 3, 3, 80), (6, 5, 3, 112), (6, 5, 4, 192),
             (6, 3, 1, 320)]
# B1: width 1.0, depth 1.1 → repeats ⌈1.1·r⌉ = 2, 3, 3, 4, 4, 5, 2.
B1_STAGES = [(e, k, r, c) for (e, k, _, c), r in zip(B0_STAGES, (2, 3, 3, 4, 4, 5, 2))]
# B3: width 1.2 → stem 38.4→40; 16·1.2=19.2 rounds to 16 < 0.9·19.2, so 24; 28.8→32; 48→48; 96→96;
# 134.4→136; 230.4→232; 384→384; head 1536. Depth 1.4 → repeats 2, 3, 3, 5, 5, 6, 2.
B3_STAGES = [(e, k, r, c) for (e, k, _, _), r, c in zip(B0_STAGES, (2, 3, 3, 5, 5, 6, 2),
                                                        (24, 32, 48, 96, 136, 232, 384))]


@pytest.mark.parametrize('variant, classes, expected', [
    ('b0', 1000, 5_288_548),  # torchvision / timm efficientnet_b0
    ('b0', 200, 4_263_748),
    ('b1', 1000, 7_794_184),  # torchvision efficientnet_b1
    ('b3', 1000, 12_233_232),  # torchvision efficientnet_b3
])
def test_batchnorm_parameter_counts_match_published_figures(variant, classes, expected):
  params = shapes_of(en.EfficientNet(variant=variant, num_classes=classes), 64)['params']
  assert count(params) == expected


def test_hand_counts_reproduce_the_published_figures():
  # The hand count is independent of the model code: it agrees with the published B0/B1/B3 figures, so the
  # channel lists written above (and the rounding they illustrate) are right.
  assert hand_count(32, B0_STAGES, 1280, 1000) == 5_288_548
  assert hand_count(32, B1_STAGES, 1280, 1000) == 7_794_184
  assert hand_count(40, B3_STAGES, 1536, 1000) == 12_233_232


@pytest.mark.parametrize('channels, width, expected', [(32, 1.2, 40), (16, 1.2, 24), (112, 1.2, 136),
                                                       (320, 2.0, 640), (1280, 1.1, 1408), (16, 0.25, 8)])
def test_round_filters(channels, width, expected):
  assert en.round_filters(channels, width) == expected


def test_block_table_and_drop_connect_schedule():
  specs = en.block_specs(1.0, 1.0, 0.2)
  assert len(specs) == 16
  assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
  assert (specs[0].in_channels, specs[-1].out_channels) == (32, 320)
  np.testing.assert_allclose([s.drop_connect_rate for s in specs], 0.2 * np.arange(16) / 16)


# Where BW goes -------------------------------------------------------------------------------------------


def expected_norm_layers(stem_type: int, mbconv_type: int, head_type: int, blocks: list[en.BlockSpec]):
  """(BW layer paths, BN layer paths) as docs/design.md §3 draws them."""
  bw, bn = set(), set()
  (bn if stem_type == 1 else bw).add('stem_bn' if stem_type == 1 else 'stem_bw')
  (bn if head_type == 1 else bw).add('head_bn' if head_type == 1 else 'head_bw')
  for i, spec in enumerate(blocks):
    p = f'block_{i}/'
    if mbconv_type == 0:
      bn.update({p + 'depthwise_bn', p + 'project_bn'} | ({p + 'expand_bn'} if spec.expand_ratio != 1 else set()))
      continue
    bw.update({p + 'depthwise_bw'} | ({p + 'expand_bw'} if spec.expand_ratio != 1 else set()))
    if mbconv_type in (1, 2):
      bn.add(p + 'depthwise_bn')
  return bw, bn


def layers_holding(stats, name: str) -> set[str]:
  flat = traverse_util.flatten_dict(stats, sep='/')
  return {path.rsplit('/', 1)[0] for path in flat if path.endswith('/' + name)}


@pytest.mark.parametrize('stem_type, mbconv_type, head_type',
                         list(itertools.product(en.STEM_TYPES, en.MBCONV_TYPES, en.HEAD_TYPES)))
def test_bw_sits_exactly_where_the_seed_draws_it(stem_type, mbconv_type, head_type):
  model = en.EfficientNet(num_classes=10, stem_type=stem_type, mbconv_type=mbconv_type, head_type=head_type,
                          bw=BWSettings(track_health=True))
  variables = shapes_of(model, 64)
  bw, bn = expected_norm_layers(stem_type, mbconv_type, head_type, en.block_specs(1.0, 1.0, 0.2))
  assert layers_holding(variables['batch_stats'], 'cov') == bw
  assert layers_holding(variables['batch_stats'], 'var') == bn
  assert layers_holding(variables.get('bw_health', {}), 'fallbacks') == bw  # BW's counters, apart
  # γ and β dropped: BW layers own no parameters; the conv after a BW layer has the bias β, the convs
  # before a BN have none.
  param_paths = set(traverse_util.flatten_dict(variables['params'], sep='/'))
  assert not {path for path in param_paths if path.rsplit('/', 1)[0] in bw}
  biased = {path.rsplit('/', 1)[0] for path in param_paths if path.endswith('conv/bias')}
  expected = {'stem_conv'} if stem_type == 2 else set()
  expected |= {'head_conv'} if head_type == 2 else set()
  if mbconv_type != 0:
    expected |= {f'block_{i}/project_conv' for i in range(16)}
    expected |= {f'block_{i}/expand_conv' for i in range(1, 16)}  # block 0 has no expansion
  assert {path for path in biased if '/se/' not in path} == expected


@pytest.mark.parametrize('mbconv_type, bn_height', [(1, 32), (2, 16)])
def test_depthwise_bn_comes_before_the_depthwise_conv_in_type_1_and_after_in_type_2(mbconv_type, bn_height):
  # Block 1 halves 32×32 to 16×16 (64×64 input): its BN sees the full map before the conv, half after.
  model = en.EfficientNet(num_classes=10, mbconv_type=mbconv_type)
  images = jnp.zeros((1, 64, 64, 3))

  def bn_output():
    variables = model.init(jax.random.key(0), images, train=False)
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'],
                           capture_intermediates=lambda m, _: m.name == 'depthwise_bn')
    return state['intermediates']['block_1']['depthwise_bn']['__call__'][0]

  assert jax.eval_shape(bn_output).shape == (1, bn_height, bn_height, 96)


@pytest.fixture(scope='module')
def tiny_batch():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32), jnp.asarray([0, 1, 2, 1, 0, 2, 1, 0])


def relative_error(actual, expected) -> float:
  """max |actual − expected| over max |expected|: logits compared at the scale of the largest one."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def test_bw_health_counters_are_kept_only_when_asked_for():
  # BatchNorm's two collections by default (code written for BatchNorm iterates over them); the training
  # loop asks for the counters (bw_jax.train.step.create_model).
  assert set(shapes_of(en.EfficientNet(num_classes=10, mbconv_type=2, **TINY), 32)) == {'params', 'batch_stats'}
  asked = shapes_of(en.EfficientNet(num_classes=10, mbconv_type=2, bw=BWSettings(track_health=True), **TINY), 32)
  assert set(asked) == {'params', 'batch_stats', 'bw_health'}


@pytest.mark.slow  # Runs 16 networks (eagerly: ~75 CPU-s here, most of it the first two).
@pytest.mark.parametrize('stem_type, mbconv_type, head_type',
                         list(itertools.product(en.STEM_TYPES, en.MBCONV_TYPES, en.HEAD_TYPES)))
def test_every_combination_equals_a_hand_composition_of_its_blocks_and_folds_exactly(
    stem_type, mbconv_type, head_type, tiny_batch):
  """Logits in train and eval mode against the float64 NumPy composition of tests/efficientnet_reference.py,
  from the same variables with every statistic, γ and bias drawn at random; the folded inference network
  (`fold_for_inference`) against the unfolded one, ≤ 1e-5 in float32."""
  images, _ = tiny_batch
  model = en.EfficientNet(num_classes=5, stem_type=stem_type, mbconv_type=mbconv_type, head_type=head_type,
                          bw=BWSettings(group_size=4), **TINY)
  # Eager on purpose: the 16 variants share most op shapes, and eager ops are compiled once per shape and
  # cached, where jitting each variant would compile 16 whole networks (minutes on 2 cores). Keys of XLA's
  # RNG ('rbg'): each parameter shape's initialiser compiles a small program instead of a threefry hash.
  variables = reference.with_random_statistics(model.init(jax.random.key(0, impl='rbg'), images, train=False))
  eval_logits = model.apply(variables, images, train=False)
  train_logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert eval_logits.shape == (8, 5) and eval_logits.dtype == jnp.float32
  assert relative_error(eval_logits, reference.logits(model, variables, images, train=False)) < 1e-5
  # Training whitens with S of each batch's covariance; the last blocks see 8 images of 2×2 or 1×1 pixels, so
  # float32 round-off in their moments and factorisations is amplified by the groups' condition numbers:
  # 1.4e-4 apart at most here (stem 1, MBConv 2), where the model run in float64 is 3.5e-8 from the reference.
  # A wrong convention (1/m for 1/(m − 1), ε misplaced) moves the logits by percents.
  assert relative_error(train_logits, reference.logits(model, variables, images, train=True)) < 1e-3
  folded_model, folded_variables = fold_for_inference(model, variables)
  assert relative_error(folded_model.apply(folded_variables, images, train=False), eval_logits) < 1e-5


@pytest.mark.slow  # Compiles a training step of the tiny model.
def test_one_training_step_reduces_the_loss(tiny_batch):
  """BW in every MBConv block (the main placement): BW's closed-form backward pass inside the network. (A
  BatchNorm-only network's gradient is autodiff's, which this test could not fault; the product layouts'
  backward passes are checked against autodiff in test_whitening_vjp.)"""
  images, labels = tiny_batch
  model = en.EfficientNet(num_classes=3, mbconv_type=2, bw=BWSettings(group_size=4), **TINY)
  # Eager, with XLA's RNG keys: the initialisers compiled by the combinations above serve here too.
  variables = model.init(jax.random.key(0, impl='rbg'), images, train=False)

  def loss_fn(params):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))  # one compiled program for both losses
  loss, grads = value_and_grad(variables['params'])
  # One SGD step sized so that, to first order, the loss falls by 2% (lr·‖∇‖²); the step must deliver at
  # least half of that (Armijo's condition), which fails for a wrong or sign-flipped gradient.
  squared_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads))
  lr = 0.02 * float(loss) / squared_norm
  new_loss, _ = value_and_grad(optax.apply_updates(variables['params'], jax.tree.map(lambda g: -lr * g, grads)))
  assert np.isfinite(loss) and squared_norm > 0
  assert loss - new_loss > 0.5 * lr * squared_norm, (loss, new_loss, lr * squared_norm)


# Resolutions, dtypes, initialisation, errors -------------------------------------------------------------


def final_feature_map(model: en.EfficientNet, size: int) -> tuple[int, ...]:
  def run():
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    _, state = model.apply(variables, jnp.zeros((1, size, size, 3)), train=False,
                           capture_intermediates=lambda m, _: m.name == 'head_conv', mutable=['intermediates'])
    return state['intermediates']['head_conv']['__call__'][0]
  return jax.eval_shape(run).shape


@pytest.mark.parametrize('size, stem_stride, expected', [(224, 2, 7), (64, 2, 2), (32, 1, 2)])
def test_b0_builds_at_imagenet_tiny_imagenet_and_cifar_sizes(size, stem_stride, expected):
  model = en.EfficientNet(num_classes=200, stem_stride=stem_stride, stem_type=2, mbconv_type=2, head_type=2)
  assert final_feature_map(model, size) == (1, expected, expected, 1280)


def test_initialisers_follow_tf_efficientnet(tiny_batch):
  model = en.EfficientNet(num_classes=1000, **TINY)  # width 0.25: head 80 → 320, last block 288 channels
  # Jitted with XLA's RNG keys ('rbg'): a small program to compile, where threefry would hash per parameter
  # (the bounds below hold for any draw: they leave 4–6 sampling errors).
  init = jax.jit(functools.partial(model.init, train=False))
  params = init(jax.random.key(0, impl='rbg'), tiny_batch[0])['params']
  head = np.asarray(params['head_conv']['kernel'])  # 1×1 conv: N(0, 2/fan_out), fan_out = 320
  assert head.shape == (1, 1, 80, 320)
  assert abs(head.std() / np.sqrt(2 / 320) - 1) < 0.03  # 25,600 draws: sampling error of the std ≈ 0.5%
  dense = np.asarray(params['classifier']['kernel'])  # U(±1/√1000)
  assert np.abs(dense).max() <= 1 / np.sqrt(1000) and np.abs(dense).max() > 0.99 / np.sqrt(1000)
  depthwise = np.asarray(params['block_6']['depthwise_conv']['kernel'])  # TF's fan_out of 3×3 depthwise: 9
  assert depthwise.shape == (3, 3, 1, 288)
  assert abs(depthwise.std() / np.sqrt(2 / 9) - 1) < 0.06  # 2,592 draws: sampling error ≈ 1.4%


@pytest.mark.parametrize('field, value, allowed', [
    ('variant', 'b8', "'b0', 'b1'"), ('stem_type', 3, '1, 2'), ('mbconv_type', 4, '0, 1, 2, 3'),
    ('head_type', 0, '1, 2'), ('stem_stride', 4, '1, 2'),
])
def test_unknown_values_are_rejected_with_the_allowed_ones(field, value, allowed):
  with pytest.raises(ValueError) as error:
    en.EfficientNet(**{field: value})
  assert f'{field}={value!r} is not supported' in str(error.value) and allowed in str(error.value)


# Stochastic depth ----------------------------------------------------------------------------------------


def test_stochastic_depth_drops_the_residual_branch_of_whole_examples_and_rescales_the_rest():
  """out = inputs + branch·keep/(1 − rate), keep ~ Bernoulli(1 − rate) per example; eval keeps every branch."""
  rate, batch = 0.5, 64

  def block(drop_rate: float) -> en.MBConv:
    spec = en.BlockSpec(expand_ratio=1, kernel_size=3, stride=1, in_channels=8, out_channels=8,
                        drop_connect_rate=drop_rate)
    return en.MBConv(spec=spec, mbconv_type=0, conv=functools.partial(nn.Conv, padding='SAME', use_bias=False),
                     depthwise=DepthwiseConv, norm=functools.partial(nn.BatchNorm, use_running_average=False),
                     whiten=None)

  x = jax.random.normal(jax.random.key(0), (batch, 4, 4, 8))
  variables = block(rate).init(jax.random.key(1), x, train=False)
  run = lambda drop_rate, train: block(drop_rate).apply(variables, x, train=train, mutable=['batch_stats'],
                                                        rngs={'dropout': jax.random.key(2)})[0]
  branch = np.asarray(run(0.0, True) - x, np.float64)
  dropped = np.asarray(run(rate, True) - x, np.float64)
  kept = np.array([np.allclose(d, b / (1 - rate), atol=1e-5) for d, b in zip(dropped, branch)])
  zeroed = np.all(dropped == 0, axis=(1, 2, 3))
  assert np.all(kept ^ zeroed)  # Each example: its whole branch, rescaled, or nothing.
  assert 16 <= zeroed.sum() <= 48  # Binomial(64, 0.5): outside [16, 48] with probability < 1e-4.
  np.testing.assert_array_equal(run(rate, False), run(0.0, False))
