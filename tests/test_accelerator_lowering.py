"""The project's own train step, B0 at 224 px in bfloat16, lowered from this CPU host for 'cuda' and 'tpu'.

Lowering only (no compile, no device): what an accelerator would be handed must use XLA's grouped
convolution for every depthwise layer, hold no host callback (a round-trip per step) and no float64.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from bw_jax.train import step as train
from bw_jax.train.config.validation import base_config
from bw_jax.data import default_dataset_config, imagenet
from bw_jax.data.on_device import normalise_images
from bw_jax.train.optim import (Schedule, create_optimizer, learning_rate_fn, optimizer_from_rates, optimizer_rates,
                                peak_learning_rate)
from bw_jax.train.step import create_model, TrainState

pytestmark = pytest.mark.slow  # Traces B0 at 224 px twice (BN and BW everywhere) and lowers each twice.
PLATFORMS = ('cuda', 'tpu')
BATCH = 8  # The program's structure does not depend on the batch; a small one keeps the text small.
# B0's depthwise layers see these channel counts (Tan & Le 2019, Table 1: stage input width × expansion
# 1, 6, 6, 6, 6, 6, 6 → 32, 16·6, 24·6, 40·6, 80·6, 112·6, 192·6); stem type 2 adds one over the 3 RGB channels.
B0_DEPTHWISE_CHANNELS = {32, 96, 144, 240, 480, 672, 1152}
LAYOUTS = {'bn_1_0_1': (1, 0, 1), 'bw_2_2_2': (2, 2, 2)}


def b0_imagenet_config(stem_type: int, mbconv_type: int, head_type: int):
  config = base_config()
  config.dataset = default_dataset_config('imagenet2012')
  config.half_precision = True
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = stem_type, mbconv_type, head_type
  return config


def lowered_train_step_texts(config) -> dict[str, str]:
  """StableHLO text of `train.train_step` for each of PLATFORMS: traced once, lowered per platform."""
  size = config.dataset.image_size
  model = create_model(config, 1000)
  schedule = Schedule('cosine', warmup_steps=100, decay_steps=900)  # 1,000 steps, the first 100 warming up.
  tx = create_optimizer(config, learning_rate_fn(schedule, 1.0), weight_decay=config.weight_decay)

  def init():
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'], ema_params={})

  state = jax.eval_shape(init)  # Shapes only: nothing of B0 is computed here.
  # As train_and_evaluate: uint8 pixels in, normalised inside the step.
  batch = {'image': jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  normalise = functools.partial(normalise_images, mean=imagenet.MEAN, std=imagenet.STD)
  # As train_and_evaluate: the dropout key and the optimizer's rates are arguments.
  step = jax.jit(functools.partial(train.train_step, model=model, num_classes=1000, label_smoothing=0.1,
                                   ema_decay=0.0, normalise=normalise, optimizer_from_rates=functools.partial(
                                       optimizer_from_rates, config, schedule)))
  rates = optimizer_rates(peak_learning_rate(config.learning_rate, config.batch_size), config.weight_decay)
  traced = step.trace(state, batch, jax.random.key(1), rates)
  return {platform: traced.lower(lowering_platforms=(platform,)).as_text() for platform in PLATFORMS}


@pytest.fixture(scope='module', params=list(LAYOUTS))
def lowered(request):
  """(layout name, (stem, mbconv, head) types, {platform: StableHLO text})."""
  types = LAYOUTS[request.param]
  return request.param, types, lowered_train_step_texts(b0_imagenet_config(*types))


def grouped_convolution_channels(text: str) -> set[int]:
  return {int(n) for n in re.findall(r'feature_group_count = (\d+)', text)} - {1}


@pytest.mark.parametrize('platform', PLATFORMS)
def test_depthwise_layers_are_xla_grouped_convolutions(lowered, platform):
  _, (stem_type, _, _), texts = lowered
  expected = B0_DEPTHWISE_CHANNELS | ({3} if stem_type == 2 else set())
  assert grouped_convolution_channels(texts[platform]) == expected
  # bfloat16 activations: the grouped convolutions take bf16 operands.
  assert re.search(r'stablehlo\.convolution[^\n]*feature_group_count = 1152[^\n]*xbf16>', texts[platform])


@pytest.mark.parametrize('platform', PLATFORMS)
def test_no_host_callbacks_and_no_float64(lowered, platform):
  text = lowered[2][platform]
  assert 'stablehlo.convolution' in text  # The text really is the train step...
  assert re.search(r'tensor<8x224x224x3xui8>', text)  # ...taking uint8 images.
  for host_round_trip in ('callback', 'outfeed', 'infeed', 'stablehlo.send', 'stablehlo.recv'):
    assert host_round_trip not in text, host_round_trip
  assert re.search(r'\bf64\b', text) is None


def test_factorisations_are_the_platforms_own(lowered):
  # Cholesky (BW's default method) is cuSOLVER's potrf on cuda and the native op on TPU; BN has none.
  name, _, texts = lowered
  whitened = name.startswith('bw')
  assert ('custom_call @cusolver_potrf' in texts['cuda']) == whitened
  assert ('stablehlo.cholesky' in texts['tpu']) == whitened
