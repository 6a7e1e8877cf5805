"""Synthetic stand-ins for the datasets, made on the fly: for benchmarks of the input pipeline and tests.

`synthetic_data(name)` makes `bw_jax.data.create_split(...)` read generated examples of dataset `name`
with the layout its `load` yields: for ImageNet, JPEGs of ImageNet-like sizes (~500×375, ~80 kB) served
through TFDS's own `imagenet2012` builder (mocked reading, so `load`'s SkipDecoding path runs as on the
real data); for the others, uint8 images of the native size.
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterator
from unittest import mock

import numpy as np

from bw_jax.data import dataset_module
from bw_jax.data.tf_imports import tf, tfds
from bw_jax.extras import import_extra

# (height, width) of ImageNet-like photos: most are 500 pixels on the long side, landscape or portrait.
IMAGENET_SIZES = ((375, 500), (333, 500), (500, 375), (400, 500), (500, 333), (375, 500), (281, 500))


def photo_like_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """uint8 (height, width, 3): smooth colour waves plus noise, which JPEG compresses as it does photos."""
  rows, cols = np.mgrid[0:height, 0:width]
  phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
  waves = [128 + 100 * np.sin(cols / 17 + p) * np.cos(rows / 23 - p) for p in phase]
  noise = np.random.default_rng(seed).normal(0, 12, (height, width, 3))
  return np.clip(np.stack(waves, -1) + noise, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """PIL's baseline JPEG (4:2:0 chroma, as most of ImageNet's files) of a uint8 (H, W, 3) image."""
  pil_image = import_extra('PIL.Image', __name__, 'train')
  buffer = io.BytesIO()
  pil_image.fromarray(image).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def raw_examples(name: str, num_examples: int, distinct: int = 32, seed: int = 0) -> tf.data.Dataset:
  """{'image', 'label'} as dataset `name`'s `load` yields them; `distinct` images repeated round-robin."""
  info = dataset_module(name).INFO
  labels = np.arange(num_examples, dtype=np.int64) % info.num_classes
  index = np.arange(num_examples) % distinct
  if name == 'imagenet2012':
    jpegs = [encode_jpeg(photo_like_image(*IMAGENET_SIZES[i % len(IMAGENET_SIZES)], seed=seed + i))
             for i in range(distinct)]
    images = np.array(jpegs, dtype=object)[index]
  else:
    images = np.random.default_rng(seed).integers(0, 256, (distinct, *info.image_shape), np.uint8)[index]
  return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})


@contextlib.contextmanager
def synthetic_data(name: str, num_examples: int = 2048) -> Iterator[None]:
  """Within the block, every split of dataset `name` is `raw_examples(name, num_examples)`."""
  examples = raw_examples(name, num_examples)
  if name != 'imagenet2012':
    with mock.patch.object(dataset_module(name), 'load', lambda split, config: examples):
      yield
    return

  def as_dataset(builder, split, decoders=None, **kwargs):
    del builder, split, kwargs
    assert decoders and isinstance(decoders.get('image'), tfds.decode.SkipDecoding), decoders
    return examples

  from tensorflow_datasets import testing  # pylint: disable=g-import-not-at-top  (test helpers: only here)
  # TFDS's builder runs, with its reading mocked; the real one also checks for prepared files first.
  with mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True), \
       testing.mock_data(as_dataset_fn=as_dataset):
    yield
