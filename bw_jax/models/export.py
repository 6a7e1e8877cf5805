"""A trained network as a serialized inference program: `export_inference(record) -> jax.export.Exported`.

The program is the folded network (`fold.fold_for_inference`: no BW layer, no custom call — the CPU kernels
of BW's products are XLA FFI custom calls that `jax.export` refuses, having no compatibility guarantee) with
its weights as constants and the record's input normalisation in front: (N, H, W, C) pixels (0–255, any
float or integer dtype of the export) -> (N, classes) logits, N left symbolic. `exported.serialize()` gives
bytes that `jax.export.deserialize(blob).call(pixels)` runs in any JAX process, bw_jax not needed.
`export_saved_model` writes the same program as a TensorFlow SavedModel (through jax2tf), for TensorFlow
Serving and the rest of TensorFlow's tooling.
"""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from bw_jax.extras import import_extra
from bw_jax.models.fold import fold_for_inference
from bw_jax.models.pretrained import Pretrained


def inference_function(record: Pretrained):
  """pixels (N, H, W, C) -> logits (N, classes) of the folded network, in evaluation mode."""
  model, variables = fold_for_inference(record.model, record.variables)
  return lambda pixels: model.apply(variables, record.normalise(pixels), train=False)


def export_inference(record: Pretrained, image_shape: tuple[int, int, int], dtype: DTypeLike = jnp.float32,
                     platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
  """The folded inference program for (N, H, W, C) = (N, *image_shape) pixels of `dtype`, N symbolic.

  `platforms` ('cpu', 'cuda', 'rocm', 'tpu'): where the program may run (default: this process's backend);
  the depthwise convolution then carries each platform's implementation.
  """
  batch, = jax.export.symbolic_shape('n')
  spec = jax.ShapeDtypeStruct((batch, *image_shape), dtype)
  return jax.export.export(jax.jit(inference_function(record)), platforms=platforms)(spec)


def export_saved_model(record: Pretrained, image_shape: tuple[int, int, int], directory: str,
                       dtype: DTypeLike = jnp.float32, platforms: tuple[str, ...] | None = None) -> None:
  """The folded inference program as a TensorFlow SavedModel in `directory` (written there): its
  'serving_default' signature maps (N, *image_shape) pixels of `dtype` to {'output_0': (N, classes) logits}, N
  any. jax2tf embeds `export_inference`'s program, so TensorFlow runs it with XLA on `platforms` (default:
  this process's backend). Needs TensorFlow (the [train] extra)."""
  tf = import_extra('tensorflow', __name__, 'train')
  from jax.experimental import jax2tf  # Imports TensorFlow: only here.

  # Inference only: with_gradient would export the backward pass too.
  converted = jax2tf.convert(inference_function(record), polymorphic_shapes=['(n, ...)'], with_gradient=False,
                             native_serialization_platforms=platforms)
  serve = tf.function(converted, autograph=False, input_signature=[tf.TensorSpec((None, *image_shape), dtype)])
  module = tf.Module()
  module.serve = serve
  tf.saved_model.save(module, directory, signatures={'serving_default': serve})
