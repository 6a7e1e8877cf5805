"""timm's tf_efficientnet_b* imported into bw_jax (`from_timm`): logits against timm's own PyTorch model.

Needs PyTorch and timm, which `make test` does not install (8 GB with PyTorch's CUDA libraries): `make
test-timm` builds that environment (.venv-timm, requirements-timm.txt) and runs this module there; elsewhere
it is skipped, saying so. `make test` checks the names and layouts against Keras's B0 instead
(tests/test_keras_import.py). timm's models are created with random weights and every BatchNorm statistic,
γ, β and bias drawn at random; nothing is downloaded.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch is not installed here; `make test-timm` runs this module')
timm = pytest.importorskip('timm', reason='timm is not installed here; `make test-timm` runs this module')

from bw_jax.models.timm_import import default_normalisation, from_timm  # noqa: E402


def randomised_timm_model(name: str, seed: int = 0):
  """timm's `name` in eval mode, its BatchNorm statistics, γ, β and biases drawn at random (timm's initial
  zeros and ones would hide a swapped or dropped tensor)."""
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.3)
        module.running_var.uniform_(0.5, 2.0)
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        module.bias.normal_(0, 0.2)
  return model


def timm_logits(model, pixels: np.ndarray) -> np.ndarray:
  """timm's logits for (N, H, W, 3) pixels in 0–255, normalised as its pretrained config says."""
  cfg = model.pretrained_cfg
  x = (pixels / 255.0 - np.asarray(cfg['mean'])) / np.asarray(cfg['std'])
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()


@pytest.mark.parametrize('name, size', [('tf_efficientnet_b0', 224), ('tf_efficientnet_b0', 97),
                                        ('tf_efficientnet_b2', 131), ('tf_efficientnet_b7', 49)])
def test_logits_equal_timms_own_model(name, size):
  """An odd size makes every strided layer pad on both sides; even sizes pad at the bottom and right only. B7
  has 13 blocks in a stage: block 10 must come after block 9, not after block 1."""
  model = randomised_timm_model(name)
  pixels = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  expected = timm_logits(model, pixels)
  record = from_timm(model.state_dict(), name, mean=model.pretrained_cfg['mean'], std=model.pretrained_cfg['std'])
  assert record.model.variant == name[-2:] and record.model.num_classes == expected.shape[1] == 1000
  actual = np.asarray(record.logits(pixels), np.float64)
  assert np.max(np.abs(actual - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_the_default_normalisation_is_timms_for_every_pretrained_tag():
  names = timm.list_pretrained('tf_efficientnet_b[0-7].*')
  assert len(names) >= 30 and any(name.endswith('.ap_in1k') for name in names)
  for name in names:
    cfg = timm.models.get_pretrained_cfg(name)
    assert default_normalisation(name) == (tuple(cfg.mean), tuple(cfg.std)), name


def test_a_safetensors_file_written_by_timm_imports_as_its_state_dict(tmp_path):
  from safetensors.torch import save_file

  model = randomised_timm_model('tf_efficientnet_b0')
  path = str(tmp_path / 'model.safetensors')
  save_file(model.state_dict(), path)
  from_file, from_state = from_timm(path, 'tf_efficientnet_b0'), from_timm(model.state_dict(), 'tf_efficientnet_b0')
  jax.tree.map(np.testing.assert_array_equal, from_file.variables, from_state.variables)


def test_timms_pytorch_efficientnet_is_another_function_and_is_refused():
  """timm's efficientnet_b0 holds the same tensors as tf_efficientnet_b0 but pads symmetrically: imported as
  the TensorFlow network its logits would differ, so its name is refused."""
  tf_model, torch_model = randomised_timm_model('tf_efficientnet_b0'), randomised_timm_model('efficientnet_b0')
  assert {k: v.shape for k, v in tf_model.state_dict().items()} == {k: v.shape for k, v in
                                                                     torch_model.state_dict().items()}
  torch_model.load_state_dict(tf_model.state_dict())
  pixels = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
  assert not np.allclose(timm_logits(torch_model, pixels), timm_logits(tf_model, pixels), rtol=1e-2)
  with pytest.raises(ValueError, match='pads each convolution k // 2 on both sides'):
    from_timm(torch_model.state_dict(), 'efficientnet_b0')
