"""Fashion-MNIST (Xiao et al. 2017) from its four original IDX files: the offline default dataset.

Where the data is looked for, in order:
  1. `dataset_config.data_dir`, when set;
  2. SYSTEM_DIRS: `/usr/share/datasets/fashion-mnist/`, where `apt-get install dataset-fashion-mnist` puts
     the original `.gz` files;
  3. TFDS's `fashion_mnist` builder (downloads when online).
The IDX files are parsed here with NumPy instead of going through TFDS: TFDS's builder rejects the Debian
files (its registered checksums are of differently compressed copies), and parsing keeps the bytes exactly.
"""

from __future__ import annotations

import gzip
import os
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from bw_jax.data.pipeline import DatasetInfo

INFO = DatasetInfo(
    name='fashion_mnist',
    num_classes=10,
    image_shape=(28, 28, 1),
    num_examples={'train': 60_000, 'test': 10_000},
    # Mean and population standard deviation over all 47,040,000 pixels of the 60,000 training images
    # (float64 NumPy, `x.mean()`, `x.std()` of train-images-idx3-ubyte), in pixel units.
    mean=(72.94035223214286,),
    std=(90.02118235130526,),
)
# Small shifts help; clothes are mostly left-right symmetric, but flipping is left off like most baselines.
default_augment = {'random_crop': True, 'crop_padding': 2, 'flip': False}
default_shuffle_buffer = 60_000  # The whole training set: 47 MB of uint8.

FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
SYSTEM_DIRS: tuple[str, ...] = ('/usr/share/datasets/fashion-mnist',)
USE_TFDS = True  # Tests switch the TFDS fallback off to simulate a machine without the data.
INSTALL_HINT = ('Install it with `apt-get install dataset-fashion-mnist` (puts the IDX files under '
                '/usr/share/datasets/fashion-mnist/), or set config.dataset.data_dir to a folder holding '
                f'{", ".join(FILES["train"] + FILES["test"])}.')

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


class DataNotFoundError(FileNotFoundError):
  """Fashion-MNIST is in none of the places searched."""


def read_idx(path: str) -> np.ndarray:
  """The array stored in an IDX file (optionally gzipped): 2 zero bytes, a dtype code, ndim, then
  ndim big-endian uint32 sizes and the data in C order."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (magic bytes {data[:4].hex()}).')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  array = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
  if array.size != np.prod(shape):
    raise ValueError(f'{path}: header says shape {shape} but holds {array.size} values.')
  return array.reshape(shape)


def find_files(data_dir: Optional[str]) -> Optional[dict[str, tuple[str, str]]]:
  """{split: (images path, labels path)} when `data_dir` holds all four files (.gz or not), else None."""
  if not data_dir:
    return None
  found = {}
  for split, names in FILES.items():
    paths = []
    for name in names:
      candidates = [os.path.join(data_dir, name), os.path.join(data_dir, name[:-len('.gz')])]
      existing = [p for p in candidates if os.path.isfile(p)]
      if not existing:
        return None
      paths.append(existing[0])
    found[split] = tuple(paths)
  return found


def _search_dirs(dataset_config: Any) -> list[str]:
  data_dir = getattr(dataset_config, 'data_dir', None)
  return ([data_dir] if data_dir else []) + list(SYSTEM_DIRS)


def split_files(split: str, dataset_config: Any) -> Optional[tuple[str, str]]:
  """(images path, labels path) of `split` in the first folder holding the IDX files, or None."""
  if split not in FILES:
    raise ValueError(f'Fashion-MNIST has splits {sorted(FILES)}, not {split!r}.')
  for directory in _search_dirs(dataset_config):
    files = find_files(directory)
    if files:
      return files[split]
  return None


def load_arrays(split: str, dataset_config: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(images uint8 (N, 28, 28, 1), labels uint8 (N,)) from the first folder with the IDX files, or None."""
  paths = split_files(split, dataset_config)
  if paths is None:
    return None
  images_path, labels_path = paths
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.shape != (INFO.num_examples[split], 28, 28) or labels.shape != images.shape[:1]:
    raise ValueError(f'{images_path}, {labels_path}: unexpected shapes {images.shape}, '
                     f'{labels.shape}; expected {INFO.num_examples[split]} images of 28x28.')
  return images[..., None], labels


def count_examples(split: str, dataset_config: Any) -> int:
  """Examples in `split`: the length of its label array (only the small labels file is read), or TFDS's
  split info on the TFDS path."""
  paths = split_files(split, dataset_config)
  if paths is not None:
    return len(read_idx(paths[1]))
  return int(_load_tfds(split, dataset_config).cardinality())


def count_classes(dataset_config: Any) -> int:
  """10: the IDX files carry no class metadata, and the dataset defines ten classes."""
  del dataset_config
  return INFO.num_classes


def _load_tfds(split: str, dataset_config: Any) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # Slow to import; only needed on this fallback path.
  try:
    ds = tfds.load('fashion_mnist', split=split, data_dir=getattr(dataset_config, 'data_dir', None),
                   download=True)
  except Exception as e:  # Offline, or TFDS's own download failed: one message for the user.
    raise DataNotFoundError(
        f'Fashion-MNIST not found in {_search_dirs(dataset_config)} and TFDS could not provide it '
        f'({type(e).__name__}: {e}). {INSTALL_HINT}') from e
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def load(split: str, dataset_config: Any) -> tf.data.Dataset:
  """Raw examples of `split` ('train' or 'test'): {'image': uint8 (28, 28, 1), 'label': uint8}, file order.

  Raises DataNotFoundError (a FileNotFoundError) naming the install command when the data is nowhere.
  """
  arrays = load_arrays(split, dataset_config)
  if arrays is not None:
    images, labels = arrays
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  if not USE_TFDS:
    raise DataNotFoundError(f'Fashion-MNIST not found in {_search_dirs(dataset_config)}. {INSTALL_HINT}')
  return _load_tfds(split, dataset_config)
