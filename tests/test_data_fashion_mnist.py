"""Fashion-MNIST: the IDX reader, the real files (when installed) and the missing-data error."""

import gzip
import os
import struct

import numpy as np
import pytest

from bw_jax import data
from bw_jax.data import fashion_mnist

SYSTEM_DIR = fashion_mnist.SYSTEM_DIRS[0]


def require_real_data():
  if fashion_mnist.find_files(SYSTEM_DIR) is None:
    pytest.skip(f'Fashion-MNIST is not installed in {SYSTEM_DIR}: apt-get install dataset-fashion-mnist')


def raw_bytes(name):
  with gzip.open(os.path.join(SYSTEM_DIR, name), 'rb') as f:
    return f.read()


@pytest.fixture
def offline(monkeypatch):
  """Only config.dataset.data_dir is searched: no Debian folder, no TFDS."""
  monkeypatch.setattr(fashion_mnist, 'SYSTEM_DIRS', ())
  monkeypatch.setattr(fashion_mnist, 'USE_TFDS', False)


def config(data_dir=None, **augment):
  cfg = data.default_dataset_config('fashion_mnist')
  cfg.data_dir = data_dir
  cfg.augment.update(augment)
  return cfg


@pytest.mark.parametrize('compress', [False, True])
def test_read_idx_parses_header_and_data(tmp_path, compress):
  values = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  raw = bytes([0, 0, 0x08, 3]) + struct.pack('>3I', 2, 3, 5) + values.tobytes()
  path = str(tmp_path / ('a.idx.gz' if compress else 'a.idx'))
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(raw)
  np.testing.assert_array_equal(fashion_mnist.read_idx(path), values)


def test_read_idx_rejects_other_files(tmp_path):
  path = tmp_path / 'x.idx'
  path.write_bytes(b'PK\x03\x04 not an idx file')
  with pytest.raises(ValueError, match='not an IDX file'):
    fashion_mnist.read_idx(str(path))


def test_missing_data_names_the_install_command(tmp_path, offline):
  cfg = config(data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    data.create_split(cfg, 'train', 8, train=True)
  assert str(tmp_path) in str(error.value)


def test_default_config_matches_the_dataset():
  cfg = data.default_dataset_config('fashion_mnist')
  assert (cfg.name, cfg.image_size, cfg.data_dir, cfg.eval_split) == ('fashion_mnist', 28, None, 'test')
  assert fashion_mnist.INFO.num_classes == 10 and fashion_mnist.INFO.image_shape == (28, 28, 1)


def test_real_files_have_the_published_counts_and_bytes():
  require_real_data()
  train_images, train_labels = fashion_mnist.load_arrays('train', config())
  test_images, test_labels = fashion_mnist.load_arrays('test', config())
  assert train_images.shape == (60_000, 28, 28, 1) and train_images.dtype == np.uint8
  assert test_images.shape == (10_000, 28, 28, 1) and test_images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [6_000] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1_000] * 10)
  # IDX layout: labels start after an 8-byte header (magic, count), images after 16 (magic, n, rows, cols).
  assert train_labels[0] == raw_bytes('train-labels-idx1-ubyte.gz')[8]
  first_image = np.frombuffer(raw_bytes('train-images-idx3-ubyte.gz')[16:16 + 784], np.uint8)
  np.testing.assert_array_equal(train_images[0].ravel(), first_image)
  assert test_labels[-1] == raw_bytes('t10k-labels-idx1-ubyte.gz')[8 + 9_999]


def test_hard_coded_mean_and_std_match_the_training_images():
  require_real_data()
  images = np.frombuffer(raw_bytes('train-images-idx3-ubyte.gz'), np.uint8, offset=16).astype(np.float64)
  assert fashion_mnist.INFO.mean[0] == pytest.approx(images.mean(), rel=1e-12)
  assert fashion_mnist.INFO.std[0] == pytest.approx(images.std(), rel=1e-12)


def test_data_dir_is_searched_first(tmp_path, offline):
  require_real_data()
  for names in fashion_mnist.FILES.values():
    for name in names:
      os.symlink(os.path.join(SYSTEM_DIR, name), tmp_path / name)
  assert fashion_mnist.find_files(str(tmp_path))['test'][1] == str(tmp_path / 't10k-labels-idx1-ubyte.gz')
  _, labels = fashion_mnist.load_arrays('test', config(data_dir=str(tmp_path)))
  np.testing.assert_array_equal(labels[:100], np.frombuffer(raw_bytes('t10k-labels-idx1-ubyte.gz')[8:108],
                                                            np.uint8))


def test_eval_counts_all_10000_test_images_once():
  require_real_data()
  batches, info = data.create_split(config(), 'test', 256, train=False)
  batches = list(batches)
  assert info is fashion_mnist.INFO and len(batches) == 40  # ceil(10000 / 256)
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.sum() == 10_000 and mask.shape == (40 * 256,)
  np.testing.assert_array_equal(np.bincount(labels[mask == 1], minlength=10), [1_000] * 10)
  _, raw_labels = fashion_mnist.load_arrays('test', config())
  np.testing.assert_array_equal(labels[:10_000], raw_labels)  # Eval keeps the file order.


def test_training_batches_are_normalised_training_images():
  require_real_data()
  images, labels = fashion_mnist.load_arrays('train', config())
  label_of = {image.tobytes(): label for image, label in zip(images, labels)}
  batches, info = data.create_split(config(random_crop=False, flip=False), 'train', 32, train=True, seed=0)
  batch = next(batches)
  assert batch['image'].shape == (32, 28, 28, 1) and batch['image'].dtype == np.float32
  pixels = np.rint(batch['image'] * np.float32(info.std) + np.float32(info.mean)).astype(np.uint8)
  assert [label_of[p.tobytes()] for p in pixels] == batch['label'].tolist()


# ----------------------------------------------------------------------------------------------------------
# Bad data is named, never used silently


def write_idx(path, values, dims=None, compress=True):
  """An IDX file of uint8 `values` (its header says `dims`, the array's shape by default)."""
  dims = values.shape if dims is None else dims
  raw = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f'>{len(dims)}I', *dims) + values.tobytes()
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(raw)
  return raw


def link_real_files(directory, except_name=None):
  for names in fashion_mnist.FILES.values():
    for name in names:
      if name != except_name:
        os.symlink(os.path.join(SYSTEM_DIR, name), os.path.join(directory, name))


@pytest.mark.parametrize('make', ['missing', 'empty', 'partial'])
def test_an_explicit_data_dir_without_the_files_is_an_error_not_a_fallback(tmp_path, make):
  require_real_data()  # The system copy is there and must not be used instead.
  directory = tmp_path / 'fmnist'
  if make != 'missing':
    directory.mkdir()
  if make == 'partial':
    link_real_files(str(directory), except_name='t10k-labels-idx1-ubyte.gz')
  with pytest.raises(fashion_mnist.DataNotFoundError) as error:
    fashion_mnist.load('test', config(data_dir=str(directory)))
  message = str(error.value)
  assert f'config.dataset.data_dir={str(directory)!r}' in message
  assert {'missing': 'does not exist', 'empty': 'holds none of',
          'partial': 'lacks t10k-labels-idx1-ubyte.gz'}[make] in message


def test_missing_data_does_not_try_a_tfds_download(monkeypatch):
  """Offline, TFDS would retry its download for minutes: only a copy TFDS already prepared is used."""
  monkeypatch.setattr(fashion_mnist, 'SYSTEM_DIRS', ())
  calls = []
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds, 'load', lambda *args, **kwargs: calls.append(kwargs) or (_ for _ in ()).throw(
      RuntimeError('not prepared')))
  with pytest.raises(fashion_mnist.DataNotFoundError, match='apt-get install dataset-fashion-mnist'):
    fashion_mnist.load('test', config())
  assert [c.get('download') for c in calls] == [False]


@pytest.mark.parametrize('damage, problem', [
    ('truncated', 'truncated'),
    ('corrupt', 'not a valid gzip file'),
    ('labels out of range', 'label 10 outside [0, 10)'),
    ('wrong dims', 'expected 10000 labels'),
    ('short data', 'header says shape'),
])
def test_damaged_files_are_named_with_the_problem(tmp_path, damage, problem):
  require_real_data()
  name = 't10k-labels-idx1-ubyte.gz'
  link_real_files(str(tmp_path), except_name=name)
  path = str(tmp_path / name)
  labels = np.frombuffer(raw_bytes(name)[8:], np.uint8).copy()
  if damage == 'labels out of range':
    labels[1234] = 10
  if damage == 'wrong dims':
    labels = labels[:9999]
  raw = write_idx(path, labels, dims=(10_001,) if damage == 'short data' else None)
  if damage == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  if damage == 'corrupt':
    with open(path, 'wb') as f:
      f.write(gzip.compress(raw)[:10] + b'\xff' * 200)
  with pytest.raises(fashion_mnist.DataError) as error:
    fashion_mnist.load_arrays('test', config(data_dir=str(tmp_path)))
  assert path in str(error.value) and problem in str(error.value)


def test_split_size_is_the_length_of_the_label_files():
  require_real_data()
  for split in ('train', 'test'):
    assert data.split_size(config(), split) == len(read_labels(split)) == fashion_mnist.INFO.num_examples[split]
  assert data.class_count(config()) == len(np.unique(read_labels('train'))) == 10


def read_labels(split):
  """The labels of `split` parsed here from the raw bytes: 8 header bytes, then one uint8 per example."""
  return np.frombuffer(raw_bytes(fashion_mnist.FILES[split][1])[8:], np.uint8)


SLICES = ['test', 'test[:2000]', 'train[:10%]', 'train[-10%:]', 'test[-500:]', 'test[10:-10]', 'train[33%:67%]',
          'train[:0.5%]', 'train[0.05%:0.15%]', 'test[-1%:]', 'test[:-1%]', 'test[-10000:]']
BAD_SLICES = ['val', 'test[5000:20000]', 'test[-20000:]', 'test[-120%:]', 'train[ :5]', 'test[:2000', 'test[a:]']


@pytest.mark.parametrize('split', SLICES)
def test_slices_read_the_rows_tfds_reads(split):
  """TFDS's own reading of the same string (ReadInstruction) is the reference: the rows, and what
  split_size counts and load yields (the labels parsed here from the raw bytes)."""
  import tensorflow_datasets as tfds
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0, filename_template=None)
           for name, count in fashion_mnist.INFO.num_examples.items()}
  reference, = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  name, rows = fashion_mnist.parse_split(split)
  size = fashion_mnist.INFO.num_examples[name]
  assert (name, rows.start, rows.stop) == (reference.splitname, reference.from_ or 0,
                                           size if reference.to is None else reference.to)
  require_real_data()
  expected = read_labels(name)[rows]
  assert data.split_size(config(), split) == len(expected)
  labels = fashion_mnist.load(split, config()).map(lambda example: example['label']).batch(60_000)
  np.testing.assert_array_equal(np.concatenate(list(labels.as_numpy_iterator())), expected)


@pytest.mark.parametrize('split', BAD_SLICES)
def test_bad_slices_are_rejected_as_tfds_rejects_them(split):
  import tensorflow_datasets as tfds
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0, filename_template=None)
           for name, count in fashion_mnist.INFO.num_examples.items()}
  with pytest.raises((ValueError, KeyError, AssertionError)):
    tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  with pytest.raises(ValueError, match=r"Fashion-MNIST has splits|must lie in"):
    fashion_mnist.parse_split(split)
