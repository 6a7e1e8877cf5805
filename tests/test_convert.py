"""BatchNorm EfficientNet -> BW variants (bw_jax/models/convert.py) and calibration (calibrate.py): the
converted evaluation network against the BatchNorm one, calibrated statistics against float64 NumPy moments.

A tiny network with every statistic, γ and bias drawn at random is the trained source (initial values would
make BatchNorm the identity and hide a swapped or ignored statistic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.models import efficientnet as en
from bw_jax.models.calibrate import calibrate
from bw_jax.models.convert import convert
from bw_jax.nn.whitening import BWSettings, whitening_matrix
import efficientnet_reference as reference

TINY = dict(num_classes=5, width_multiplier=0.25, depth_multiplier=0.1, dropout_rate=0.0, drop_connect_rate=0.0)
BATCHES = 3


def relative_error(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope='module')
def data():
  """(test images, calibration batches): (8, 32, 32, 3) normal draws."""
  rng = np.random.default_rng(0)
  draw = lambda: jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  return draw(), [draw() for _ in range(BATCHES)]


@pytest.fixture(scope='module')
def source(data):
  """The BatchNorm network (stem 1, MBConv 0, head 1), its random 'trained' variables and eval logits."""
  model = en.EfficientNet(**TINY)
  variables = reference.with_random_statistics(model.init(jax.random.key(0, impl='rbg'), data[0], train=False))
  return model, variables, model.apply(variables, data[0], train=False)


@functools.cache
def target(stem_type: int, mbconv_type: int, head_type: int) -> en.EfficientNet:
  return en.EfficientNet(stem_type=stem_type, mbconv_type=mbconv_type, head_type=head_type,
                         bw=BWSettings(group_size=4), **TINY)


def converted(source, data, *types):
  model = target(*types)
  return model, convert(source[0], source[1], model, model.init(jax.random.key(1, impl='rbg'), data[0],
                                                                 train=False))


@pytest.fixture(scope='module')
def main_job(source, data):
  """The main job's placements (stem 1, MBConv 2, head 2), converted and then calibrated."""
  model, conversion = converted(source, data, 1, 2, 2)
  return model, conversion, calibrate(model, conversion.variables, iter(data[1]), BATCHES)


def test_conversion_to_the_main_jobs_placements_keeps_the_evaluation_network(source, data, main_job):
  """Expansion, projection and head: conv → BN becomes BW → conv·diag(a) + c, exact with BW at its initial
  statistics; every layer present in both networks keeps its weights."""
  model, conversion, _ = main_job
  assert relative_error(model.apply(conversion.variables, data[0], train=False), source[2]) < 1e-5
  params, trained = conversion.variables['params'], source[1]['params']
  for layer in ('stem_conv', 'classifier'):
    jax.tree.map(np.testing.assert_array_equal, params[layer], trained[layer])
  jax.tree.map(np.testing.assert_array_equal, params['block_1']['se'], trained['block_1']['se'])
  jax.tree.map(np.testing.assert_array_equal, conversion.variables['batch_stats']['block_1']['depthwise_bn'],
               source[1]['batch_stats']['block_1']['depthwise_bn'])
  assert 'head_bw' in conversion.fresh and 'block_1/expand_conv' in conversion.converted


def test_calibrated_statistics_are_the_pooled_moments_of_each_layers_input(source, data, main_job):
  """head_bw's input is the last block's output, which conversion leaves as the BatchNorm network's."""
  model, conversion, calibrated = main_job
  last = f'block_{len(en.block_specs(*model.scaling[:2], 0.0)) - 1}'

  def last_block_output(images):
    _, state = source[0].apply(source[1], images, train=False, mutable=['intermediates'],
                               capture_intermediates=lambda m, _: m.name == last)
    return np.asarray(state['intermediates'][last]['__call__'][0], np.float64)

  samples = np.concatenate([last_block_output(x) for x in data[1]])
  samples = samples.reshape(-1, samples.shape[-1])
  groups = samples.reshape(len(samples), -1, 4) - samples.mean(axis=0).reshape(-1, 4)
  cov = np.einsum('mgi,mgj->gij', groups, groups) / (len(samples) - 1)
  stats = calibrated['batch_stats']['head_bw']
  np.testing.assert_allclose(stats['mean'], samples.mean(axis=0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['cov'], cov, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['whitening'], whitening_matrix(jnp.asarray(cov, jnp.float32), 'cholesky', 1e-3),
                             rtol=1e-4, atol=1e-5)


def test_calibration_keeps_evaluation_and_brings_training_mode_to_it(source, data, main_job):
  """Evaluation: only the BW before squeeze-excite is compensated approximately (per-example gates); measured
  2e-4 of the logits' scale here. Training mode whitens with each batch's statistics: before calibration BW
  is the identity in evaluation but whitens in training, so the two networks differ completely."""
  model, conversion, calibrated = main_job
  images = data[0]
  train_logits = lambda variables: model.apply(variables, images, train=True, mutable=['batch_stats'])[0]
  assert relative_error(model.apply(calibrated, images, train=False), source[2]) < 1e-3
  before, after = relative_error(train_logits(conversion.variables), source[2]), relative_error(
      train_logits(calibrated), source[2])
  assert before > 1 and after < 1e-2, (before, after)


@pytest.mark.slow  # Three more networks (~1 minute on 2 cores).
@pytest.mark.parametrize('mbconv_type', [1, 2, 3])
def test_calibration_is_exact_when_squeeze_excite_gates_are_constant(source, data, mbconv_type):
  """With every SE gate one constant (expand kernel 0, one bias), the projection's compensation is exact,
  and so is calibration as a whole: BN (moved before the depthwise conv in type 1) and every BW."""
  model, conversion = converted(source, data, 2, mbconv_type, 2)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (np.zeros_like(leaf) if 'kernel' in str(path[-1]) else np.full_like(leaf, 0.3))
      if "'se'" in str(path) and "'expand'" in str(path) else leaf, conversion.variables)
  before = model.apply(variables, data[0], train=False)
  after = model.apply(calibrate(model, variables, iter(data[1]), BATCHES), data[0], train=False)
  assert relative_error(after, before) < 1e-5


def test_a_rank_one_stem_converts_exactly(source, data):
  """Stem conv 3×3 → BN to depthwise 3×3 → BW → 1×1: exact when each input channel's 3×3×C₀ slice has
  rank one (the SVD then loses nothing); MBConv 0 and head 1 are kept."""
  rng = np.random.default_rng(2)
  variables = jax.tree.map(np.asarray, source[1])
  kernel = variables['params']['stem_conv']['kernel']
  variables['params']['stem_conv']['kernel'] = np.einsum('ijc,co->ijco', rng.normal(size=kernel.shape[:3]),
                                                         rng.normal(size=kernel.shape[2:])).astype(np.float32)
  model, conversion = converted((source[0], variables), data, 2, 0, 1)
  expected = source[0].apply(variables, data[0], train=False)
  assert relative_error(model.apply(conversion.variables, data[0], train=False), expected) < 1e-5
  assert 'keeps 100.0%' in conversion.notes[0]


def test_conversion_refuses_what_it_cannot_do(source, data, main_job):
  model, conversion, _ = main_job
  with pytest.raises(ValueError, match='mbconv_type=2 \\(BW\\) cannot become mbconv_type=3'):
    convert(model, conversion.variables, target(1, 3, 2), conversion.variables)
  wider = en.EfficientNet(**{**TINY, 'width_multiplier': 0.5})
  with pytest.raises(ValueError, match='same variant and multipliers'):
    convert(source[0], source[1], wider, source[1])
