"""`jax.export` of the folded inference network (bw_jax/models/export.py): serialized, reloaded, the same
logits as the unfolded network, with BW's CPU kernels on or off; and as a TensorFlow SavedModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.models import efficientnet as en
from bw_jax.models.export import export_inference, export_saved_model
from bw_jax.models.pretrained import Pretrained, plain_variables
from bw_jax.nn import kernels
from bw_jax.nn.whitening import BWSettings
import efficientnet_reference as reference

IMAGE_SHAPE = (32, 32, 3)


@pytest.fixture(scope='module')
def record():
  """A tiny BW network (stem 2, MBConv 2, head 2: every BW placement) with random statistics."""
  model = en.EfficientNet(num_classes=5, stem_type=2, mbconv_type=2, head_type=2, bw=BWSettings(group_size=4),
                          width_multiplier=0.25, depth_multiplier=0.1)
  init = jax.jit(model.init, static_argnames='train')  # One program, not B0's operations one by one.
  variables = init(jax.random.key(0, impl='rbg'), jnp.zeros((1, *IMAGE_SHAPE)), train=False)
  return Pretrained(model, plain_variables(reference.with_random_statistics(variables)), (120.0, 110.0, 100.0),
                    (60.0, 61.0, 62.0))


def pixels(batch: int) -> np.ndarray:
  return np.random.default_rng(batch).integers(0, 256, (batch, *IMAGE_SHAPE)).astype(np.float32)


def relative_error(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize('cpu_kernels', ['on', pytest.param('off', marks=pytest.mark.slow)])
def test_the_folded_network_exports_reloads_and_gives_the_unfolded_logits(record, cpu_kernels, patch_layer):
  if cpu_kernels == 'off':  # patch_layer: the traces made with the kernels off do not outlive this test
    patch_layer(kernels, 'available', lambda: False)
  elif not kernels.available():
    pytest.skip('the CPU kernels are not built here (no C++ compiler, or BW_JAX_CPU_KERNELS=0)')
  exported = export_inference(record, IMAGE_SHAPE)
  assert 'custom_call @Bw' not in exported.mlir_module()  # no BW kernel: nothing jax.export would refuse
  reloaded = jax.export.deserialize(exported.serialize())
  for batch in (2, 3):  # the batch dimension is symbolic
    assert relative_error(reloaded.call(pixels(batch)), record.logits(pixels(batch))) <= 1e-5


@pytest.mark.slow  # Traces the unfolded network once more (~20 s on 2 cores).
def test_the_unfolded_network_holds_the_kernels_custom_calls_that_export_refuses(record):
  """Why the folding: BW's evaluation uses the CPU kernels, custom calls without a stability guarantee."""
  if not kernels.available():
    pytest.skip('the CPU kernels are not built here (no C++ compiler, or BW_JAX_CPU_KERNELS=0)')
  unfolded = jax.jit(record.logits)
  with pytest.raises(ValueError, match='custom calls whose targets have no compatibility guarantees'):
    jax.export.export(unfolded)(jax.ShapeDtypeStruct((2, *IMAGE_SHAPE), jnp.float32))


def test_a_tensorflow_saved_model_serves_the_unfolded_logits(record, tmp_path):
  tf = pytest.importorskip('tensorflow', reason='TensorFlow ([train] extra) is not installed')
  export_saved_model(record, IMAGE_SHAPE, str(tmp_path / 'saved_model'))
  serve = tf.saved_model.load(str(tmp_path / 'saved_model')).signatures['serving_default']
  for batch in (2, 3):  # any batch size
    logits = serve(tf.constant(pixels(batch)))['output_0'].numpy()
    assert relative_error(logits, record.logits(pixels(batch))) <= 1e-5
