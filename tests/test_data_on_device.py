"""Batches on the device: normalisation inside the step against NumPy, and the prefetch's order and resume."""

import itertools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow as tf

from bw_jax.data import fashion_mnist, imagenet, on_device, pipeline
from test_data_pipeline import make_config, make_info, make_images


@pytest.mark.parametrize('info', [fashion_mnist.INFO, imagenet.INFO], ids=lambda info: info.name)
def test_normalise_images_is_the_float32_formula_of_numpy(info):
  channels = info.image_shape[-1]
  images = np.random.default_rng(0).integers(0, 256, (4, 6, 5, channels), dtype=np.uint8)
  images[0, 0, 0] = 0
  images[0, 0, 1] = 255
  out = jax.jit(lambda x: on_device.normalise_images(x, info.mean, info.std))(images)
  expected = (images.astype(np.float32) - np.float32(info.mean)) / np.float32(info.std)
  assert out.dtype == jnp.float32
  # The same IEEE float32 subtraction and division as NumPy's (and tf.data's before): equal, or one ulp
  # apart where a compiler turned the division into a multiplication by the reciprocal.
  np.testing.assert_array_max_ulp(np.asarray(out), expected, maxulp=1)
  np.testing.assert_allclose(np.asarray(out, np.float64),
                             (images - np.float64(info.mean)) / np.float64(info.std), rtol=1e-6, atol=1e-6)


def test_device_normalisation_equals_the_host_pipeline():
  n = 12
  ds = tf.data.Dataset.from_tensor_slices({'image': make_images(n), 'label': np.arange(n, dtype=np.int64)})
  info, config = make_info(n), make_config(random_crop=True, crop_padding=1, flip=True)
  run = lambda normalise: list(pipeline.batched_dataset(
      ds, info, 'train', config, 4, train=True, seed=1, process_index=0, process_count=1, device_count=1,
      normalise=normalise).take(3).as_numpy_iterator())
  for host, raw in zip(run(True), run(False)):
    np.testing.assert_array_max_ulp(np.asarray(on_device.normalise_images(raw['image'], info.mean, info.std)),
                                    host['image'], maxulp=1)


def numbered_batches(count: int, reads: list[int] | None = None):
  """Batch i: {'image': uint8 (4, 2, 2, 1) all i, 'label': (4,) all i}; appends i to `reads` when read."""
  for i in range(count):
    if reads is not None:
      reads.append(i)
    yield {'image': np.full((4, 2, 2, 1), i, np.uint8), 'label': np.full((4,), i, np.int32)}


@pytest.fixture(scope='module')
def data_sharding():
  return NamedSharding(Mesh(jax.devices(), ('data',)), P('data'))


def test_prefetch_keeps_the_order_and_reads_only_size_ahead(data_sharding):
  reads = []
  prefetched = on_device.prefetch_to_device(numbered_batches(5, reads), data_sharding, size=2)
  assert reads == []  # A generator: nothing read before the first batch is asked for.
  first = next(prefetched)
  assert reads == [0, 1]  # The batch handed out and one more in flight.
  assert isinstance(first['image'], jax.Array) and first['image'].sharding == data_sharding
  assert first['image'].dtype == jnp.uint8
  rest = list(prefetched)
  assert reads == [0, 1, 2, 3, 4]
  for i, batch in enumerate([first, *rest]):
    np.testing.assert_array_equal(batch['image'], np.full((4, 2, 2, 1), i, np.uint8))
    np.testing.assert_array_equal(batch['label'], np.full((4,), i))


def test_prefetch_rejects_a_size_below_one(data_sharding):
  with pytest.raises(ValueError, match='prefetch size must be at least 1, got 0'):
    next(on_device.prefetch_to_device(numbered_batches(1), data_sharding, size=0))


def test_prefetched_training_resumes_exactly(data_sharding):
  # A resumed run makes a fresh iterator at start_batch = its step: the prefetched batches must be those
  # of the uninterrupted run from there on, whatever the interrupted run had read ahead.
  n = 23
  ds = tf.data.Dataset.from_tensor_slices({'image': make_images(n), 'label': np.arange(n, dtype=np.int64)})
  info, config = make_info(n), make_config(random_crop=True, crop_padding=1, flip=True)

  def stream(start_batch):
    batches = pipeline.batched_dataset(ds, info, 'train', config, 4, train=True, seed=5, start_batch=start_batch,
                                       process_index=0, process_count=1, device_count=1, normalise=False)
    return on_device.prefetch_to_device(batches.as_numpy_iterator(), data_sharding)

  fresh = list(itertools.islice(stream(0), 10))  # Crosses an epoch boundary (5 batches of 4 per epoch).
  interrupted = stream(0)
  list(itertools.islice(interrupted, 4))  # Stopped after step 4, with batches 4 and 5 read ahead.
  for k, (expected, resumed) in enumerate(zip(fresh[4:], stream(4)), start=4):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(resumed[key], expected[key], err_msg=f'batch {k} {key}')
