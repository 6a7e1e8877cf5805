"""TensorFlow and TFDS for the input pipeline, imported when first used and kept off the accelerators.

The dataset modules bind `tf` and `tfds` from here. What they declare without reading data (`INFO`, the
defaults of `config.dataset`, ImageNet's MEAN and STD) and the config schema built from it then need neither
package: a train step runs where TensorFlow is not installed (an accelerator image, the core install), and
reading data there fails with one line naming the [train] extra.
"""

import functools
import types

from bw_jax.extras import import_extra, import_on_first_use

PART = 'bw_jax.data'


@functools.cache
def tensorflow() -> types.ModuleType:
  """TensorFlow, with the GPUs hidden from it before it creates any device: tf.data only needs the CPU, and a
  TensorFlow that sees a GPU reserves most of its memory before JAX does."""
  tf = import_extra('tensorflow', PART, 'train')
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow's devices were already created by someone else; nothing to do.
    pass
  return tf


def tensorflow_datasets() -> types.ModuleType:
  tensorflow()  # TFDS imports TensorFlow: hide the GPUs from it first.
  return import_extra('tensorflow_datasets', PART, 'train')


tf = import_on_first_use('tensorflow', tensorflow)
tfds = import_on_first_use('tensorflow_datasets', tensorflow_datasets)
