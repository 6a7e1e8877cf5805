"""Fashion-MNIST (Xiao et al. 2017) from its four original IDX files: the offline default dataset.

Where the data is looked for:
  1. `dataset_config.data_dir`, when set: only there (a folder without the four files is an error, never a
     silent fallback to another copy);
  2. else SYSTEM_DIRS: `/usr/share/datasets/fashion-mnist/`, where `apt-get install dataset-fashion-mnist`
     puts the original `.gz` files;
  3. else a copy TFDS has already prepared (no download: offline, TFDS retries one for minutes).
Every file is checked when a split is opened (gzip stream, IDX header, sizes, label range); an error names
the file and the problem.
The IDX files are parsed here with NumPy instead of going through TFDS: TFDS's builder rejects the Debian
files (its registered checksums are of differently compressed copies), and parsing keeps the bytes exactly.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from typing import Any, Optional

import numpy as np

from bw_jax.data.pipeline import DatasetInfo
from bw_jax.data.tf_imports import tf, tfds  # tfds: slow to import, used only by the fallback to TFDS.

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
  """Fashion-MNIST is not where the config says, nor in any of the places searched."""


class DataError(ValueError):
  """A Fashion-MNIST file is damaged (the message names the file and the problem)."""


def read_bytes(path: str) -> bytes:
  """The (decompressed) bytes of `path`; DataError naming it for a truncated or corrupt gzip file."""
  try:
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
      return f.read()
  except EOFError:
    raise DataError(f'{path} is truncated (its gzip stream ends early); download or install it again.') from None
  except (gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f'{path} is not a valid gzip file ({e}); download or install it again.') from None


def read_idx(path: str) -> np.ndarray:
  """The array stored in an IDX file (optionally gzipped): 2 zero bytes, a dtype code, ndim, then
  ndim big-endian uint32 sizes and the data in C order."""
  data = read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f'{path} is not an IDX file (magic bytes {data[:4].hex()}).')
  ndim = data[3]
  if len(data) < 4 + 4 * ndim:
    raise DataError(f'{path}: the IDX header of {ndim} dimensions is cut short ({len(data)} bytes).')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  itemsize = np.dtype(_IDX_DTYPES[data[2]]).itemsize
  size = (len(data) - 4 - 4 * ndim) // itemsize
  if size != np.prod(shape):
    raise DataError(f'{path}: header says shape {shape} but holds {size} values.')
  return np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim).reshape(shape)


def find_files(data_dir: Optional[str]) -> Optional[dict[str, tuple[str, str]]]:
  """{split: (images path, labels path)} when `data_dir` holds all four files (.gz or not), else None."""
  if not data_dir:
    return None
  found = {split: tuple(_existing(data_dir, name) for name in names) for split, names in FILES.items()}
  return None if any(None in paths for paths in found.values()) else found


def _existing(data_dir: str, name: str) -> Optional[str]:
  """`data_dir/name` or its uncompressed twin, whichever exists."""
  candidates = [os.path.join(data_dir, name), os.path.join(data_dir, name[:-len('.gz')])]
  return next((p for p in candidates if os.path.isfile(p)), None)


def required_files(data_dir: str) -> dict[str, tuple[str, str]]:
  """The four files in an explicit `config.dataset.data_dir`; DataNotFoundError saying what is missing."""
  where = f'config.dataset.data_dir={data_dir!r}'
  if not os.path.isdir(data_dir):
    raise DataNotFoundError(f'{where} does not exist. {INSTALL_HINT}')
  names = [name for split_names in FILES.values() for name in split_names]
  missing = [name for name in names if _existing(data_dir, name) is None]
  if len(missing) == len(names):
    raise DataNotFoundError(f'{where} holds none of the Fashion-MNIST files. {INSTALL_HINT}')
  if missing:
    raise DataNotFoundError(f'{where} lacks {", ".join(missing)}. {INSTALL_HINT}')
  return find_files(data_dir)


def check_arrays(split: str, images_path: str, images: np.ndarray, labels_path: str, labels: np.ndarray) -> None:
  """DataError naming the file unless images are (N, 28, 28), labels (N,) in [0, num_classes), N the split's."""
  count = INFO.num_examples[split]
  if images.shape != (count, 28, 28):
    raise DataError(f'{images_path}: expected {count} images of 28x28, the header says shape {images.shape}.')
  if labels.shape != (count,):
    raise DataError(f'{labels_path}: expected {count} labels, the header says shape {labels.shape}.')
  bad = np.flatnonzero(labels >= INFO.num_classes)
  if bad.size:
    raise DataError(f'{labels_path}: label {labels[bad[0]]} outside [0, {INFO.num_classes}) at index {bad[0]} '
                    f'({bad.size} such labels).')


def _search_dirs(dataset_config: Any) -> list[str]:
  data_dir = getattr(dataset_config, 'data_dir', None)
  return [data_dir] if data_dir else list(SYSTEM_DIRS)


_BOUND = r'(-?\d+(?:\.\d+)?%|-?\d+)'
_SLICE = re.compile(rf'^(\w+)(?:\[{_BOUND}?:{_BOUND}?\])?$')


def parse_split(split: str) -> tuple[str, slice]:
  """A split name and the rows it reads, as TFDS reads the same string: 'test' -> ('test', slice(0, 10000));
  'train[:10%]' -> ('train', slice(0, 6000)); 'test[-500:]' -> ('test', slice(9500, 10000)). Bounds are
  example counts or percentages (rounded to the closest example, TFDS's default), negative from the end;
  an example count beyond the split is an error, as in TFDS."""
  match = _SLICE.match(split)
  if not match or match.group(1) not in FILES:
    raise ValueError(f'Fashion-MNIST has splits {sorted(FILES)}, optionally sliced as TFDS slices them '
                     f"('train[:50000]', 'train[-10%:]', 'test[:2000]'), not {split!r}.")
  name, start, stop = match.groups()
  size = INFO.num_examples[name]

  def absolute(bound: Optional[str], default: int) -> int:
    if bound is None:
      return default
    if bound.endswith('%'):
      percent = float(bound[:-1])
      if abs(percent) > 100:
        raise ValueError(f'{split!r}: a percentage must lie in [-100%, 100%], got {bound}.')
      index = int(round(percent * size / 100))
    else:
      index = int(bound)
      if abs(index) > size:
        raise ValueError(f'{split!r}: {name!r} has {size} examples, so an example bound must lie in '
                         f'[-{size}, {size}], got {index}.')
    return index + size if index < 0 else index
  return name, slice(absolute(start, 0), absolute(stop, size))


def split_files(split: str, dataset_config: Any) -> Optional[tuple[str, str]]:
  """(images path, labels path) of `split` (its slice left out): in `data_dir` when set (DataNotFoundError if
  the files are not there), else in the first system folder with the files, else None."""
  split = parse_split(split)[0]
  data_dir = getattr(dataset_config, 'data_dir', None)
  files = required_files(data_dir) if data_dir else next(filter(None, map(find_files, SYSTEM_DIRS)), None)
  return None if files is None else files[split]


def load_arrays(split: str, dataset_config: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(images uint8 (N, 28, 28, 1), labels uint8 (N,)) of `split_files`, checked whole, then sliced as
  `split` says; None without files."""
  paths = split_files(split, dataset_config)
  if paths is None:
    return None
  name, rows = parse_split(split)
  images_path, labels_path = paths
  images, labels = read_idx(images_path), read_idx(labels_path)
  check_arrays(name, images_path, images, labels_path, labels)
  return images[rows, ..., None], labels[rows]


def count_examples(split: str, dataset_config: Any) -> int:
  """Examples in `split`: the length of its (sliced) label array (only the small labels file is read), or
  TFDS's split info on the TFDS path."""
  paths = split_files(split, dataset_config)
  if paths is not None:
    return len(read_idx(paths[1])[parse_split(split)[1]])
  return int(_load_tfds(split, dataset_config).cardinality())


def count_classes(dataset_config: Any) -> int:
  """10: the IDX files carry no class metadata, and the dataset defines ten classes."""
  del dataset_config
  return INFO.num_classes


def _load_tfds(split: str, dataset_config: Any) -> tf.data.Dataset:
  try:
    ds = tfds.load('fashion_mnist', split=split, download=False)
  except Exception as e:  # Not prepared: one message for the user.
    raise DataNotFoundError(
        f'Fashion-MNIST not found in {_search_dirs(dataset_config)} nor prepared by TFDS '
        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). {INSTALL_HINT}') from e
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def load(split: str, dataset_config: Any) -> tf.data.Dataset:
  """Raw examples of `split` ('train' or 'test', or a TFDS slice of one: `parse_split`): {'image': uint8
  (28, 28, 1), 'label': uint8}, file order.

  Raises DataNotFoundError (a FileNotFoundError) naming the install command when the data is nowhere.
  """
  arrays = load_arrays(split, dataset_config)
  if arrays is not None:
    images, labels = arrays
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  if not USE_TFDS:
    raise DataNotFoundError(f'Fashion-MNIST not found in {_search_dirs(dataset_config)}. {INSTALL_HINT}')
  return _load_tfds(split, dataset_config)
