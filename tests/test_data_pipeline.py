"""The shared input pipeline on a small synthetic dataset whose every example can be recognised.

Example i has label i and an image whose pixels encode i, so every batch can be checked against NumPy.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from bw_jax import data
from bw_jax.data import pipeline

H, W, C = 4, 4, 3
MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)


def make_images(n):
  """uint8 (n, H, W, C): distinct, non-symmetric content per example, so crops and flips are visible."""
  rng = np.random.default_rng(1234)
  return rng.integers(0, 256, size=(n, H, W, C), dtype=np.uint8)


def make_info(n):
  return pipeline.DatasetInfo(name='synthetic', num_classes=n, image_shape=(H, W, C),
                              num_examples={'train': n, 'test': n}, mean=MEAN, std=STD)


def make_config(image_size=H, random_crop=False, crop_padding=0, flip=False):
  return ml_collections.ConfigDict({
      'name': 'synthetic', 'data_dir': None, 'image_size': image_size, 'shuffle_buffer': 1000,
      'augment': {'random_crop': random_crop, 'crop_padding': crop_padding, 'flip': flip}})


def batches(n, batch_size, *, train, config=None, seed=0, start_batch=0, process_index=0,
            process_count=1, device_count=1, take=None, normalise=True):
  images = make_images(n)
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': np.arange(n, dtype=np.int64)})
  out = pipeline.batched_dataset(
      ds, make_info(n), 'train' if train else 'test', config or make_config(), batch_size, train=train,
      seed=seed, start_batch=start_batch, process_index=process_index, process_count=process_count,
      device_count=device_count, normalise=normalise)
  if take is not None:
    out = out.take(take)
  return list(out.as_numpy_iterator())


def normalised(images):
  return (images.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


def test_eval_covers_every_example_once_with_padding():
  n, b = 23, 5
  out = batches(n, b, train=False)
  assert len(out) == 5  # ceil(23 / 5)
  for batch in out:
    assert batch['image'].shape == (b, H, W, C) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
  mask = np.concatenate([x['mask'] for x in out])
  labels = np.concatenate([x['label'] for x in out])
  images = np.concatenate([x['image'] for x in out])
  assert mask.sum() == n
  np.testing.assert_array_equal(mask, [1.0] * n + [0.0] * 2)
  np.testing.assert_array_equal(np.sort(labels[mask == 1]), np.arange(n))
  np.testing.assert_array_equal(images[mask == 0], 0.0)


def test_masked_accuracy_equals_numpy_accuracy():
  n, b = 23, 5
  predict = lambda labels: np.where(labels % 3 == 0, labels, -1)  # Right on 0, 3, 6, ..., 21: 8 of 23.
  correct = total = 0.0
  for batch in batches(n, b, train=False):
    correct += np.sum((predict(batch['label']) == batch['label']) * batch['mask'])
    total += batch['mask'].sum()
  labels = np.arange(n)
  assert total == n
  assert correct / total == pytest.approx(np.mean(predict(labels) == labels)) == pytest.approx(8 / 23)


def test_normalisation_is_exact_without_augmentation():
  n = 10
  images = make_images(n)
  for train in (False, True):
    for batch in batches(n, 5, train=train, take=2):
      np.testing.assert_allclose(batch['image'], normalised(images[batch['label']]), rtol=0, atol=1e-6)


@pytest.mark.parametrize('train', [False, True])
def test_uint8_batches_are_the_same_examples_as_whole_pixels(train):
  # Crops and flips of native-size images are exact: the uint8 batch is the float batch before
  # normalisation; the eval padding is zeros with mask 0.
  config = make_config(random_crop=True, crop_padding=1, flip=True)
  as_float = batches(23, 5, train=train, config=config, seed=3, take=4)
  as_uint8 = batches(23, 5, train=train, config=config, seed=3, take=4, normalise=False)
  assert len(as_uint8) == 4
  for f, u in zip(as_float, as_uint8):
    assert u['image'].dtype == np.uint8 and u['image'].shape == f['image'].shape
    np.testing.assert_array_equal(u['label'], f['label'])
    np.testing.assert_array_equal(u['mask'], f['mask'])
    np.testing.assert_array_equal(normalised(u['image']), f['image'])


def test_uint8_of_a_resized_image_is_the_rounded_pixel():
  n, size = 6, 8
  m = bilinear_matrix(H, size)
  expected = np.einsum('yh,nhwc,xw->nyxc', m, make_images(n).astype(np.float64), m)
  for batch in batches(n, 3, train=False, config=make_config(image_size=size), normalise=False):
    assert batch['image'].dtype == np.uint8
    # float32 resizing error is ~1e-4 pixel, so only values within that of a half can round either way.
    np.testing.assert_allclose(batch['image'], np.round(expected[batch['label']]), atol=1)
    near_half = np.abs(expected[batch['label']] % 1 - 0.5) < 1e-3
    np.testing.assert_array_equal(batch['image'][~near_half], np.round(expected[batch['label']])[~near_half])


def test_training_epoch_is_a_permutation():
  n, b = 20, 5
  out = batches(n, b, train=True, take=8)  # Two epochs.
  labels = np.concatenate([x['label'] for x in out])
  np.testing.assert_array_equal(np.sort(labels[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(labels[n:]), np.arange(n))
  assert not np.array_equal(labels[:n], np.arange(n))  # Shuffled...
  assert not np.array_equal(labels[:n], labels[n:])  # ...differently each epoch.
  assert all(np.all(x['mask'] == 1.0) for x in out)


def test_training_is_deterministic_given_the_seed():
  config = make_config(random_crop=True, crop_padding=1, flip=True)
  first = batches(23, 4, train=True, config=config, seed=3, take=3)
  again = batches(23, 4, train=True, config=config, seed=3, take=3)
  other = batches(23, 4, train=True, config=config, seed=4, take=3)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(np.stack([x['label'] for x in first]), np.stack([x['label'] for x in other]))


def test_resume_yields_the_same_batches():
  config = make_config(random_crop=True, crop_padding=1, flip=True)
  fresh = batches(23, 4, train=True, config=config, seed=5, take=15)  # Crosses two epoch boundaries.
  for k in (1, 7, 12):
    resumed = batches(23, 4, train=True, config=config, seed=5, start_batch=k, take=15 - k)
    assert len(resumed) == 15 - k
    for x, y in zip(fresh[k:], resumed):
      np.testing.assert_array_equal(x['label'], y['label'])
      np.testing.assert_array_equal(x['image'], y['image'])


def test_two_hosts_read_disjoint_shards():
  n = 23
  eval_labels, eval_batches = [], []
  for host in (0, 1):
    out = batches(n, 8, train=False, process_index=host, process_count=2)
    assert all(x['image'].shape[0] == 4 for x in out)  # Per-host batch: 8 // 2.
    eval_batches.append(len(out))
    eval_labels.append(set(np.concatenate([x['label'][x['mask'] == 1] for x in out]).tolist()))
  assert eval_batches == [3, 3]  # ceil(12 / 4) on both hosts, though host 1 has only 11 examples.
  assert eval_labels[0].isdisjoint(eval_labels[1])
  assert eval_labels[0] | eval_labels[1] == set(range(n))

  train_labels = [np.concatenate([x['label'] for x in batches(n, 8, train=True, process_index=host,
                                                                process_count=2, take=2)])
                  for host in (0, 1)]
  assert set(train_labels[0]).isdisjoint(train_labels[1])
  assert set(train_labels[0]) <= set(range(0, n, 2)) and set(train_labels[1]) <= set(range(1, n, 2))


@pytest.mark.parametrize('batch_size,devices,hosts', [(6, 4, 1), (6, 1, 4), (7, 2, 1)])
def test_batch_size_must_divide_over_devices_and_hosts(batch_size, devices, hosts):
  with pytest.raises(ValueError, match=rf'global_batch_size={batch_size}\b.* {max(devices, hosts)} '):
    batches(23, batch_size, train=True, process_count=hosts, device_count=devices)


def bilinear_matrix(n_in, n_out):
  """(n_out, n_in) half-pixel-centre bilinear interpolation with edge clamping (upsampling)."""
  m = np.zeros((n_out, n_in))
  for j in range(n_out):
    x = np.clip((j + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = int(np.floor(x))
    hi = min(lo + 1, n_in - 1)
    m[j, lo] += 1 - (x - lo)
    m[j, hi] += x - lo
  return m


def test_resize_when_image_size_differs():
  n, size = 6, 8
  images = make_images(n).astype(np.float64)
  m = bilinear_matrix(H, size)
  expected = np.einsum('yh,nhwc,xw->nyxc', m, images, m)
  for train in (False, True):
    out = batches(n, 3, train=train, config=make_config(image_size=size), take=2)
    for batch in out:
      assert batch['image'].shape == (3, size, size, C)
      np.testing.assert_allclose(batch['image'], normalised(expected[batch['label']]), atol=1e-4)


def test_random_crop_is_a_shift_of_the_padded_image():
  n, p = 12, 1
  images = make_images(n)
  out = batches(n, 4, train=True, config=make_config(random_crop=True, crop_padding=p), seed=1, take=3)
  offsets = set()
  for batch in out:
    pixels = batch['image'] * np.float32(STD) + np.float32(MEAN)
    for image, label in zip(pixels, batch['label']):
      padded = np.pad(images[label], [(p, p), (p, p), (0, 0)]).astype(np.float32)
      matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if np.allclose(image, padded[dy:dy + H, dx:dx + W], atol=1e-3)]
      assert matches, f'example {label} is not a crop of its padded image'
      offsets.update(matches)
  assert len(offsets) > 1  # The offsets are random, not all (p, p).


def test_flip_mirrors_some_images():
  n = 12
  images = normalised(make_images(n))
  out = batches(n, 4, train=True, config=make_config(flip=True), seed=2, take=3)
  flipped = 0
  for batch in out:
    for image, label in zip(batch['image'], batch['label']):
      same = np.allclose(image, images[label], atol=1e-6)
      mirrored = np.allclose(image, images[label][:, ::-1], atol=1e-6)
      assert same or mirrored
      flipped += mirrored
  assert 0 < flipped < n


def test_eval_cannot_start_late():
  with pytest.raises(ValueError, match='start_batch=2'):
    batches(23, 4, train=False, start_batch=2)


def test_unknown_dataset_name_lists_the_allowed_ones():
  with pytest.raises(ValueError, match="'cifar10'.*fashion_mnist.*tiny_imagenet.*imagenet2012"):
    data.dataset_module('cifar10')


def test_examples_on_host_and_eval_batches_match_arithmetic():
  assert [pipeline.examples_on_host(23, i, 2) for i in (0, 1)] == [12, 11]
  assert sum(pipeline.examples_on_host(10_000, i, 3) for i in range(3)) == 10_000
  assert pipeline.num_eval_batches(10_000, 256) == 40  # ceil(10000 / 256)
  assert pipeline.num_eval_batches(23, 8, process_count=2) == 3
