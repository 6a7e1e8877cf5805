"""The input pipeline shared by every dataset: shard, shuffle, augment, normalise, batch, pad.

A dataset module hands over a `tf.data.Dataset` of raw examples `{'image': uint8 (H, W, C), 'label': int}`
(or, with its own preprocessing hooks, still-encoded images: see ImageNet) and a `DatasetInfo`;
`batched_dataset` turns it into batches of

    {'image': float32 (B, S, S, C), 'label': int32 (B,), 'mask': float32 (B,)}      normalise=True
    {'image': uint8 (B, S, S, C), ...}                                                 normalise=False

with `B = global_batch_size // process_count` (this host's share) and `S = dataset_config.image_size`.
Training sends uint8 (a quarter of the bytes) and normalises on the device (`on_device.normalise_images`,
the same float32 formula); a preprocessed image is rounded to whole pixels first.

Guarantees:
- Each host reads a disjoint shard (example i goes to host i % process_count), taken before shuffling.
- Training is a pure function of (seed, process_index, element index): the shuffle of epoch e is seeded by
  (seed, e) and every example's augmentation by stateless random ops seeded with its position in the
  host's stream. So `start_batch=k` yields exactly batches k, k+1, ... of a fresh iterator, and skipping
  is cheap: whole epochs are never read, and the partial epoch is skipped *before* augmentation.
- Evaluation reads the split exactly once, in order; the last batch is padded to full size with zero images
  whose `mask` is 0.0 (real examples have 1.0), and every host yields the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax

from bw_jax.data.tf_imports import tf

# A preprocessing hook. A dataset module may define `train_preprocess` and/or `eval_preprocess` with it:
#
#   preprocess(image, image_size, seed) -> image
#     image:      uint8 tf.Tensor (H, W, C), one raw example (H, W may vary from example to example), or
#                 whatever the dataset's `load` yields as 'image' (ImageNet: the encoded JPEG string).
#     image_size: int, the side S of the square output.
#     seed:       int64 tf.Tensor (2,), a per-example seed for `tf.random.stateless_*` ops; unique for
#                 every (seed, host, position in the stream). Eval hooks get a constant and must ignore it.
#     returns:    float32 tf.Tensor (S, S, C) in pixel units (0..255), NOT normalised: the pipeline
#                 subtracts `DatasetInfo.mean` and divides by `DatasetInfo.std` afterwards.
#
# Without hooks the pipeline uses `augment_image` (train) and `resize_image` (eval).
PreprocessFn = Callable[['tf.Tensor', int, 'tf.Tensor'], 'tf.Tensor']


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline and the model need to know about a dataset."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # Native (H, W, C).
  num_examples: Mapping[str, int]  # Split name -> number of examples.
  mean: tuple[float, ...]  # (C,) per-channel mean of the training images, pixel units 0..255.
  std: tuple[float, ...]  # (C,) per-channel standard deviation, pixel units.


def check_batch_size(global_batch_size: int, device_count: int, process_count: int,
                     name: str = 'global_batch_size') -> None:
  """Raises a ValueError naming `name` unless the global batch splits evenly over devices and hosts."""
  if global_batch_size <= 0:
    raise ValueError(f'{name} must be positive, got {global_batch_size}.')
  for count, what in ((device_count, 'devices (jax.device_count())'),
                      (process_count, 'hosts (jax.process_count())')):
    if global_batch_size % count:
      raise ValueError(
          f'{name}={global_batch_size} does not divide evenly over {count} {what}; '
          f'use a multiple of {count}, e.g. {max(count, global_batch_size // count * count)}.')


def examples_on_host(num_examples: int, process_index: int, process_count: int) -> int:
  """Size of host `process_index`'s shard when examples are dealt round-robin (`Dataset.shard`)."""
  return len(range(process_index, num_examples, process_count))


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
  """Batches each host yields to cover `num_examples` once (the largest shard, padded up to a batch)."""
  per_host_batch = global_batch_size // process_count
  return math.ceil(examples_on_host(num_examples, 0, process_count) / per_host_batch)


def resize_image(image: tf.Tensor, image_size: int, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Eval preprocessing: uint8 (H, W, C) -> float32 (S, S, C) pixels, resized only when (H, W) != (S, S)."""
  del seed  # Deterministic.
  image = tf.cast(image, tf.float32)
  if tuple(image.shape[:2]) == (image_size, image_size):
    return image
  # Antialiasing matters when shrinking; bilinear is the usual choice for small upsampling factors.
  return tf.image.resize(image, (image_size, image_size), method='bilinear', antialias=True)


def augment_image(image: tf.Tensor, image_size: int, seed: tf.Tensor, *, random_crop: bool,
                  crop_padding: int, flip: bool) -> tf.Tensor:
  """Training preprocessing: resize, then random crop from a zero-padded image, then horizontal flip.

  image: uint8 (H, W, C); returns float32 (S, S, C) pixels. Padding is `crop_padding` pixels of 0 on each
  side of the S x S image, so the crop shifts the content by up to +-crop_padding pixels.
  """
  image = resize_image(image, image_size)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  if random_crop and crop_padding > 0:
    p = crop_padding
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
    offset = tf.random.stateless_uniform((2,), crop_seed, minval=0, maxval=2 * p + 1, dtype=tf.int32)
    image = tf.slice(padded, [offset[0], offset[1], 0], [image_size, image_size, image.shape[-1]])
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image


def default_train_preprocess(augment: Any) -> PreprocessFn:
  """The `augment_image` hook with the switches of `dataset_config.augment` bound."""
  def preprocess(image, image_size, seed):
    return augment_image(image, image_size, seed, random_crop=bool(augment.random_crop),
                         crop_padding=int(augment.crop_padding), flip=bool(augment.flip))
  return preprocess


def _normalise(image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  return (image - tf.constant(info.mean, tf.float32)) / tf.constant(info.std, tf.float32)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float32 pixels -> uint8, rounded to the nearest whole pixel (exact for unresized images)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _train_stream(ds: tf.data.Dataset, num_host: int, seed: int, shuffle_buffer: int,
                  start_element: int) -> tf.data.Dataset:
  """Endless (index, example) stream, epoch after epoch, starting at element `start_element`.

  Epoch e is this host's shard shuffled with seed (seed, e); `index` counts elements from the very first
  one, so an example's augmentation seed does not depend on where the iterator was started.
  """
  start_epoch, offset = divmod(start_element, num_host)
  buffer = max(1, min(shuffle_buffer, num_host))

  def one_epoch(epoch):
    shuffled = ds.shuffle(buffer, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
    index = tf.data.Dataset.range(epoch * num_host, (epoch + 1) * num_host)
    return tf.data.Dataset.zip((index, shuffled))

  epochs = tf.data.Dataset.range(start_epoch, 2**62)
  # Only the partial epoch is skipped element by element, and before any augmentation runs.
  return epochs.flat_map(one_epoch).skip(offset)


def batched_dataset(ds: tf.data.Dataset, info: DatasetInfo, split: str, dataset_config: Any,
                    global_batch_size: int, *, train: bool, seed: int = 0, start_batch: int = 0,
                    train_preprocess: Optional[PreprocessFn] = None,
                    eval_preprocess: Optional[PreprocessFn] = None,
                    process_index: Optional[int] = None, process_count: Optional[int] = None,
                    device_count: Optional[int] = None, normalise: bool = True) -> tf.data.Dataset:
  """Batches of this host's share of `split`, ready for `as_numpy_iterator()`.

  ds: raw examples {'image': uint8 (H, W, C), 'label': int}, the whole split in a fixed order.
  dataset_config: reads `image_size`, `augment.{random_crop, crop_padding, flip}` and, optionally,
    `shuffle_buffer` (default: the whole shard).
  train: shuffle, repeat forever and augment; otherwise one ordered, padded and masked pass.
  start_batch: training only; the first batch yielded is batch `start_batch` of a fresh iterator.
  process_index / process_count / device_count: default to jax's; tests pass them to simulate hosts.
  normalise: True: float32 images normalised by info.mean / info.std; False: uint8 pixels.
  Returns batches {'image': float32 or uint8 (B, S, S, C), 'label': int32 (B,), 'mask': float32 (B,)}
  with B = global_batch_size // process_count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  device_count = jax.device_count() if device_count is None else device_count
  check_batch_size(global_batch_size, device_count, process_count)
  base_split = split.split('[')[0]  # TFDS slices such as 'train[:10%]' are subsets of a known split
  if base_split not in info.num_examples:
    raise ValueError(f'{info.name} has no split {split!r}; its splits are {sorted(info.num_examples)}.')
  # The data's own count when tf.data knows it (slices, partial or fake data), else the published one.
  cardinality = int(ds.cardinality())
  num_examples = cardinality if cardinality >= 0 else info.num_examples[base_split]
  if start_batch < 0 or (start_batch and not train):
    raise ValueError(f'start_batch={start_batch}: only training iterators can start late (>= 0).')

  batch = global_batch_size // process_count
  size = int(dataset_config.image_size)
  finish = (lambda image: _normalise(image, info)) if normalise else to_uint8
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options).shard(process_count, process_index)  # Before any shuffle.
  num_host = examples_on_host(num_examples, process_index, process_count)

  if train:
    preprocess = train_preprocess or default_train_preprocess(dataset_config.augment)
    shuffle_buffer = int(getattr(dataset_config, 'shuffle_buffer', None) or num_host)
    stream = _train_stream(ds, num_host, seed, shuffle_buffer, start_batch * batch)

    def prepare(index, example):
      # Unique per (seed, host, position): hosts interleave the second counter.
      example_seed = tf.stack([tf.constant(seed, tf.int64), index * process_count + process_index])
      return {'image': finish(preprocess(example['image'], size, example_seed)),
              'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(1.0)}

    out = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
  else:
    preprocess = eval_preprocess or resize_image
    constant_seed = tf.zeros((2,), tf.int64)

    def prepare(example):
      return {'image': finish(preprocess(example['image'], size, constant_seed)),
              'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(1.0)}

    channels = info.image_shape[-1]
    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros((size, size, channels), tf.float32 if normalise else tf.uint8),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0.0)})
    num_padding = num_eval_batches(num_examples, global_batch_size, process_count) * batch - num_host
    out = (ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
           .concatenate(padding.repeat(num_padding))
           .batch(batch, drop_remainder=True))
  return out.prefetch(tf.data.AUTOTUNE)
