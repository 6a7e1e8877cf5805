"""Datasets: one registry, one pipeline (`pipeline.py`), one module per dataset.

`config.dataset` (see `default_dataset_config`) holds:
  name:            one of DATASET_NAMES.
  data_dir:        where to look first for the data (None: the dataset's default places); for TFDS
                   datasets this is also TFDS's data_dir.
  image_size:      side S of the square images fed to the model; images are resized when S differs from
                   the native size.
  train_split:     split used for training ('train').
  eval_split:      split used for evaluation ('test' for Fashion-MNIST, 'validation' otherwise).
  shuffle_buffer:  training shuffle buffer, in examples per host (the whole split when it fits in memory).
  augment:         training augmentation switches, used unless the dataset brings its own
                   `train_preprocess` (ImageNet's inception crop):
    random_crop:   crop S x S at a random offset from the image zero-padded by `crop_padding` pixels.
    crop_padding:  that padding, in pixels of the resized image.
    flip:          random horizontal flip.

A dataset module `bw_jax.data.<module>` provides:
  INFO: pipeline.DatasetInfo                               (required)
  load(split, dataset_config) -> tf.data.Dataset            (required) raw {'image': uint8 (H, W, C),
                                                            'label': int}, the whole split, fixed order.
  count_examples(split, dataset_config) -> int              (required) examples of `split` as the data
                                                            really holds them (slices, partial data).
  count_classes(dataset_config) -> int                      (required) from the data's own metadata.
  default_augment: dict(random_crop=, crop_padding=, flip=) (optional; else DEFAULT_AUGMENT)
  default_image_size: int                                   (optional; else INFO.image_shape[0])
  default_shuffle_buffer: int                               (optional; else DEFAULT_SHUFFLE_BUFFER)
  train_preprocess, eval_preprocess: pipeline.PreprocessFn  (optional; see pipeline.PreprocessFn)
It takes `tf` and `tfds` from `tf_imports`, so that importing it and reading its INFO and defaults does not
import TensorFlow.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator

from bw_jax.extras import require

# Needs the [train] extra. TensorFlow and TFDS are imported when data is first read (`tf_imports.py`): a
# dataset's INFO and defaults, and the configs built from them, need neither.
require('bw_jax.data', 'train', ('ml_collections',))

import ml_collections

from bw_jax.data.pipeline import DatasetInfo, batched_dataset

DATASET_NAMES = ('fashion_mnist', 'tiny_imagenet', 'imagenet2012')
_MODULES = {'fashion_mnist': 'fashion_mnist', 'tiny_imagenet': 'tiny_imagenet',
            'imagenet2012': 'imagenet'}
DEFAULT_AUGMENT = {'random_crop': True, 'crop_padding': 4, 'flip': True}
DEFAULT_SHUFFLE_BUFFER = 16_384


def dataset_module(name: str) -> ModuleType:
  """The module implementing dataset `name`, imported on first use (TFDS builders are slow to import)."""
  if name not in _MODULES:
    raise ValueError(f'Unknown dataset {name!r}; config.dataset.name must be one of {DATASET_NAMES}.')
  return importlib.import_module(f'bw_jax.data.{_MODULES[name]}')


def default_dataset_config(name: str = 'fashion_mnist') -> ml_collections.ConfigDict:
  """`config.dataset` for `name` with the dataset's own defaults (keys documented in this module)."""
  module = dataset_module(name)
  info = module.INFO
  config = ml_collections.ConfigDict()
  config.name = name
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.image_size = getattr(module, 'default_image_size', info.image_shape[0])
  config.train_split = 'train'
  config.eval_split = 'test' if 'test' in info.num_examples else 'validation'
  config.shuffle_buffer = getattr(module, 'default_shuffle_buffer', DEFAULT_SHUFFLE_BUFFER)
  config.augment = ml_collections.ConfigDict(dict(getattr(module, 'default_augment', DEFAULT_AUGMENT)))
  return config


def split_size(dataset_config: Any, split: str) -> int:
  """Examples in `split` of the data that will be read: TFDS slices ('train[:10%]') and a smaller prepared
  dataset count as what they hold. Missing data raises (with instructions) before anything is compiled."""
  return dataset_module(dataset_config.name).count_examples(split, dataset_config)


def class_count(dataset_config: Any) -> int:
  """The class count of the prepared dataset's metadata (TFDS's `label` ClassLabel), not a published one."""
  return dataset_module(dataset_config.name).count_classes(dataset_config)


def open_split(dataset_config: Any, split: str) -> Any:
  """The raw examples of `split` (a `tf.data.Dataset` as the dataset module's `load` gives it), for
  `create_split(..., examples=…)`. Data read whole (Fashion-MNIST's files) is checked here, whole: open the
  splits before writing anything, and damaged data fails first."""
  return dataset_module(dataset_config.name).load(split, dataset_config)


def create_split(dataset_config: Any, split: str, global_batch_size: int, *, train: bool,
                 seed: int = 0, start_batch: int = 0, normalise: bool = True, examples: Any = None
                 ) -> tuple[Iterator[dict], DatasetInfo]:
  """This host's batches of `split` as NumPy arrays, and the dataset's info.

  Batches: {'image': float32 (B, S, S, C), 'label': int32 (B,), 'mask': float32 (B,)}, with
  B = global_batch_size // jax.process_count(); normalise=False gives uint8 pixels instead, for
  `on_device.normalise_images(images, info.mean, info.std)` inside the step. Training iterators are
  endless and start at batch `start_batch` (pass the number of steps already taken when resuming); eval
  iterators cover the split once, the last batch padded with mask 0. Missing data raises before anything
  is compiled. `examples`: the split already opened (`open_split`), else it is opened here.
  """
  module = dataset_module(dataset_config.name)
  ds = module.load(split, dataset_config) if examples is None else examples
  batches = batched_dataset(
      ds, module.INFO, split, dataset_config, global_batch_size, train=train, seed=seed,
      start_batch=start_batch, train_preprocess=getattr(module, 'train_preprocess', None),
      eval_preprocess=getattr(module, 'eval_preprocess', None), normalise=normalise)
  return batches.as_numpy_iterator(), module.INFO
