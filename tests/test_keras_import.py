"""Keras applications EfficientNet weights imported into bw_jax: logits against Keras's own, offline.

Keras's models are built with `weights=None` and every BatchNorm statistic, γ, β, bias and the input
Normalization drawn at random (Keras's initial values — zero means, unit variances, zero biases — would hide
a swapped or dropped weight); the published weights need the internet and are not used.
"""

import os
import re

import jax
import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import keras  # noqa: E402  (installed with TensorFlow, a requirement)

from bw_jax.models import keras_import  # noqa: E402
from bw_jax.models.keras_import import from_keras  # noqa: E402
from bw_jax.models.timm_import import from_timm  # noqa: E402

# Keras's TensorFlow backend converts tensors with NumPy 1's __array__ protocol, once per weight.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


def randomised_keras_efficientnet(variant: str, size: int, seed: int = 0, normalisation=None):
  """Keras's EfficientNet-`variant` for `size`×`size` images, logits out, its statistics drawn at random."""
  rng = np.random.default_rng(seed)
  build = getattr(keras.applications, f'EfficientNet{variant.upper()}')
  model = build(weights=None, classifier_activation=None, input_shape=(size, size, 3))
  for layer in model.layers:
    kind, weights = type(layer).__name__, layer.get_weights()
    if kind == 'BatchNormalization':
      gamma, beta, mean, var = weights
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                         rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    elif kind == 'Normalization':
      mean, variance = normalisation or (rng.uniform(0.3, 0.6, 3), rng.uniform(0.03, 0.08, 3))
      layer.set_weights([np.asarray(mean), np.asarray(variance), weights[2]])
      layer.finalize_state()  # What Keras's loading does: the call reads the finalised values.
    elif kind in ('Conv2D', 'Dense') and len(weights) == 2:
      layer.set_weights([weights[0], rng.normal(0, 0.2, weights[1].shape)])
  return model


def pixels(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def relative_error(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def assert_logits_equal_keras(variant: str, size: int):
  model = randomised_keras_efficientnet(variant, size)
  images = pixels(size)
  expected = np.asarray(model(images, training=False))
  imported = from_keras(model)
  assert imported.model.variant == variant and imported.model.num_classes == 1000
  assert relative_error(jax.jit(imported.logits)(images), expected) <= 1e-4
  return model, imported


@pytest.fixture(scope='module')
def b0_odd():
  """B0 at 97×97: an odd size makes every strided layer pad symmetrically, where even sizes pad high only."""
  return assert_logits_equal_keras('b0', 97)


def test_b0_logits_equal_keras_at_an_odd_size(b0_odd):
  model, imported = b0_odd
  normalisation = next(layer for layer in model.layers if type(layer).__name__ == 'Normalization')
  mean, variance = (np.asarray(w).reshape(-1) for w in normalisation.get_weights()[:2])
  # Keras: (pixels / 255 − mean) / √variance, i.e. pixel mean 255·mean and std 255·√variance.
  np.testing.assert_allclose(imported.mean, 255 * mean, rtol=1e-6)
  np.testing.assert_allclose(imported.std, 255 * np.sqrt(variance), rtol=1e-6)


@pytest.mark.slow  # Keras and bw_jax B0 at 224 px, B2 at 224 and 131 px: ~1 minute on 2 cores.
@pytest.mark.parametrize('variant, size', [('b0', 224), ('b2', 224), ('b2', 131)])
def test_logits_equal_keras(variant, size):
  assert_logits_equal_keras(variant, size)


@pytest.mark.parametrize('suffix', ['.weights.h5', '.h5'])
def test_a_weights_file_imports_what_the_model_holds(b0_odd, tmp_path, suffix):
  """Keras 3's .weights.h5 and the legacy HDF5 format of the published files (model.save('….h5') writes it)."""
  model, imported = b0_odd
  path = str(tmp_path / f'efficientnetb0{suffix}')
  if suffix == '.weights.h5':
    model.save_weights(path)
  else:
    model.save(path)
  from_file = from_keras(path)
  assert from_file.model == imported.model
  jax.tree.map(np.testing.assert_array_equal, from_file.variables, imported.variables)
  np.testing.assert_allclose(from_file.mean, imported.mean, rtol=1e-6)
  np.testing.assert_allclose(from_file.std, imported.std, rtol=1e-6)


@pytest.mark.slow  # Keras's 'imagenet' B0 (224 px, from a local file) and ours.
def test_published_files_are_read_as_keras_reads_them_with_weights_imagenet(tmp_path, monkeypatch):
  """The published files store the ImageNet standard deviation as the Normalization's variance, and
  `weights='imagenet'` adds a Rescaling that makes it one. Keras's 'imagenet' model is built here from a
  local file (its download replaced by that file) and compared with our import of the file."""
  path = str(tmp_path / 'efficientnetb0.h5')
  imagenet = ((0.485, 0.456, 0.406), keras_import.IMAGENET_STDDEV_RGB)
  randomised_keras_efficientnet('b0', 224, normalisation=imagenet).save(path)
  from keras.src.applications import efficientnet as keras_efficientnet
  monkeypatch.setattr(keras_efficientnet.file_utils, 'get_file', lambda *args, **kwargs: path)
  published = keras.applications.EfficientNetB0(weights='imagenet', classifier_activation=None)
  images = pixels(224)
  imported = from_keras(path)
  np.testing.assert_allclose(imported.std, 255 * np.asarray(keras_import.IMAGENET_STDDEV_RGB), rtol=1e-6)
  assert relative_error(jax.jit(imported.logits)(images), published(images, training=False)) <= 1e-4
  assert from_keras(published).std == pytest.approx(imported.std, rel=1e-6)


def test_bad_sources_are_refused_in_one_line(b0_odd):
  model, _ = b0_odd
  with pytest.raises(ValueError, match="variant='b3', but the Keras weights are EfficientNet-B0"):
    from_keras(model, variant='b3')
  headless = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(64, 64, 3))
  with pytest.raises(ValueError, match='include_top=False'):
    from_keras(headless)


# ----------------------------------------------------------------------------------------------------------
# timm's tf_efficientnet_b0 is Keras's B0 in PyTorch: Keras's weights renamed and laid out as timm's state dict
# (by hand, from timm's module names) import as `from_keras` imports the model, and give Keras's logits.
# Against timm's own model: tests/test_timm_import.py, in the optional environment of `make test-timm`.


def timm_state_dict(model) -> dict[str, np.ndarray]:
  """Keras EfficientNet weights under timm's names and in PyTorch's layouts (O, I, kh, kw), (O, I)."""
  torch_conv = lambda kernel: np.transpose(kernel, (3, 2, 0, 1))  # (kh, kw, I, O) -> (O, I, kh, kw)
  state = {}

  def put(prefix, layer):
    kind, weights = type(layer).__name__, layer.get_weights()
    if kind == 'BatchNormalization':
      state.update(zip((prefix + n for n in ('weight', 'bias', 'running_mean', 'running_var')), weights))
      state[prefix + 'num_batches_tracked'] = np.zeros((), np.int64)  # PyTorch's counter, ignored
    elif kind == 'DepthwiseConv2D':
      state[prefix + 'weight'] = np.transpose(weights[0], (2, 3, 0, 1))  # (k, k, C, 1) -> (C, 1, k, k)
    elif kind == 'Dense':
      state[prefix + 'weight'], state[prefix + 'bias'] = weights[0].T, weights[1]
    else:
      state[prefix + 'weight'] = torch_conv(weights[0])
      if len(weights) == 2:
        state[prefix + 'bias'] = weights[1]

  top = {'stem_conv': 'conv_stem.', 'stem_bn': 'bn1.', 'top_conv': 'conv_head.', 'top_bn': 'bn2.',
         'predictions': 'classifier.'}
  layer_names = {layer.name for layer in model.layers}
  for layer in model.layers:
    if layer.name in top:
      put(top[layer.name], layer)
    elif match := re.fullmatch(r'block(\d)([a-z])_(\w+)', layer.name):
      stage, repeat, part = int(match.group(1)) - 1, ord(match.group(2)) - ord('a'), match.group(3)
      expanded = f'block{match.group(1)}{match.group(2)}_expand_conv' in layer_names
      names = ({'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dwconv': 'conv_dw', 'bn': 'bn2',
                'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand', 'project_conv': 'conv_pwl',
                'project_bn': 'bn3'} if expanded else
               {'dwconv': 'conv_dw', 'bn': 'bn1', 'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand',
                'project_conv': 'conv_pw', 'project_bn': 'bn2'})
      if part in names:
        put(f'blocks.{stage}.{repeat}.{names[part]}.', layer)
  # Contiguous, as PyTorch's tensors are (safetensors writes an array's buffer as it lies in memory).
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def test_a_timm_tf_efficientnet_state_dict_imports_as_the_keras_model_it_was_ported_from(b0_odd, tmp_path):
  model, imported = b0_odd
  state = timm_state_dict(model)
  normalisation = next(layer for layer in model.layers if type(layer).__name__ == 'Normalization')
  mean, variance = (np.asarray(w, np.float64).reshape(-1) for w in normalisation.get_weights()[:2])
  record = from_timm(state, 'tf_efficientnet_b0.in1k', mean=tuple(mean), std=tuple(np.sqrt(variance)))
  assert record.model == imported.model
  jax.tree.map(np.testing.assert_array_equal, record.variables, imported.variables)
  np.testing.assert_allclose(record.mean, imported.mean, rtol=1e-6)
  np.testing.assert_allclose(record.std, imported.std, rtol=1e-6)
  images = pixels(97)
  assert relative_error(record.logits(images), model(images, training=False)) <= 1e-4
  # timm's published files: model.safetensors, read without PyTorch.
  from safetensors.numpy import save_file
  path = str(tmp_path / 'model.safetensors')
  save_file(state, path)
  jax.tree.map(np.testing.assert_array_equal, from_timm(path, 'tf_efficientnet_b0').variables, record.variables)


def test_timm_sources_that_are_not_the_tensorflow_network_are_refused_in_one_line(b0_odd, tmp_path):
  state = timm_state_dict(b0_odd[0])
  with pytest.raises(ValueError, match=r"timm's efficientnet_b0 pads each convolution k // 2 on both sides .* "
                                       r'tf_efficientnet_b0: import that one'):
    from_timm(state, 'efficientnet_b0.ra_in1k')
  with pytest.raises(ValueError, match=r"model_name='resnet50' is not one of timm's tf_efficientnet_b0, "):
    from_timm(state, 'resnet50')
  with pytest.raises(ValueError, match=r'The weights of tf_efficientnet_b2 do not fit EfficientNet-b2: '):
    from_timm(state, 'tf_efficientnet_b2')
  with pytest.raises(ValueError, match=r"^1 tensors of the state dict are held by no layer of the EfficientNet: "
                                       r"blocks\.0\.0\.aa\.weight \(not one of timm's"):
    from_timm({**state, 'blocks.0.0.aa.weight': np.zeros(3)}, 'tf_efficientnet_b0')
  wrapped = {f'module.{k}': v for k, v in state.items()}  # torch.nn.DataParallel's names
  with pytest.raises(ValueError, match=r"^\d+ tensors .*: module\.blocks\.0\.0\.bn1\.bias, .*, … \(a wrapper's "
                                       r"prefix: strip 'module\.' from the names\)\.$"):
    from_timm(wrapped, 'tf_efficientnet_b0')
  truncated = {k: v for k, v in state.items() if k != 'bn2.running_var'}
  with pytest.raises(ValueError, match=r'^The state dict has no bn2\.running_var, which head_bn needs'):
    from_timm(truncated, 'tf_efficientnet_b0')
  with pytest.raises(ValueError, match=r"tf_efficientnet_b0_ap is timm's old name of tf_efficientnet_b0\.ap_in1k"):
    from_timm(state, 'tf_efficientnet_b0_ap')
  with pytest.raises(ValueError, match=r'mean=\(123\.7, 116\.3, 103\.5\), .*give three values each on 0–1 pixels'):
    from_timm(state, 'tf_efficientnet_b0', mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))
  with pytest.raises(ValueError, match=r'model\.pth: not a \.safetensors file.*torch\.load'):
    from_timm(tmp_path / 'model.pth', 'tf_efficientnet_b0')


def test_timm_normalisation_defaults_to_the_tags(b0_odd):
  """timm's pretrained configs (tests/test_timm_import.py checks every tag against timm): ImageNet's mean and std,
  but (0.5, 0.5, 0.5) for both for the AdvProp weights."""
  state = timm_state_dict(b0_odd[0])
  for name in ('tf_efficientnet_b0', 'tf_efficientnet_b0.ns_jft_in1k', 'tf_efficientnet_b0.aa_in1k'):
    record = from_timm(state, name)
    np.testing.assert_allclose(record.mean, [123.675, 116.28, 103.53], rtol=1e-12)
    np.testing.assert_allclose(record.std, [58.395, 57.12, 57.375], rtol=1e-12)
  advprop = from_timm(state, 'tf_efficientnet_b0.ap_in1k')
  assert advprop.mean == advprop.std == (127.5, 127.5, 127.5)
