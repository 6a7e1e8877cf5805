"""ImageNet 2012 (ILSVRC 2012) through TFDS `imagenet2012`, with Inception-style training crops.

ImageNet cannot be downloaded automatically: register at https://image-net.org/download-images, put
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in `<data_dir>/downloads/manual/` (`data_dir` being
`config.dataset.data_dir`, default `~/tensorflow_datasets`), and the first run prepares the TFDS dataset
(hours, about 150 GB).

Images stay JPEG-encoded through the shuffle (TFDS `SkipDecoding`): the shuffle buffer holds ~110 kB
per example (ImageNet's mean file size) instead of ~560 kB decoded, so the default buffer of
DEFAULT_SHUFFLE_BUFFER = 16,384 examples takes about 1.8 GB of host memory per host (9 GB decoded).
Training decodes only its random-resized crop (`tf.io.decode_and_crop_jpeg`); eval decodes the whole image.

`train_preprocess` and `eval_preprocess` turn an encoded JPEG (or, for tests and other sources, a decoded
uint8 image) of any size into float32 (image_size, image_size, 3) pixels in 0..255; normalising by
MEAN/STD is left to the pipeline or the device.
"""

from __future__ import annotations

import os
from typing import Any

from bw_jax.data.pipeline import DatasetInfo
from bw_jax.data.tf_imports import tf, tfds
from bw_jax.data.tfds_utils import (canonical_split, default_manual_dir, image_and_label, label_classes,
                                   split_examples)

NUM_CLASSES = 1000
# Originals vary in size; this is the usual training resolution, and train_preprocess / eval_preprocess
# produce whatever `image_size` the config asks for.
IMAGE_SHAPE = (224, 224, 3)
NUM_EXAMPLES = {'train': 1_281_167, 'validation': 50_000}
MEAN = (123.675, 116.28, 103.53)  # The usual ImageNet channel statistics, (0.485, 0.456, 0.406) × 255.
STD = (58.395, 57.12, 57.375)  # (0.229, 0.224, 0.225) × 255.
INFO = DatasetInfo(name='imagenet2012', num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
                   num_examples=NUM_EXAMPLES, mean=MEAN, std=STD)

MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# Random-resized-crop ranges of Inception (Szegedy et al. 2015): fraction of the image area, width / height.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
# Eval resizes the shorter side to image_size / EVAL_CROP_FRACTION before the centre crop (224 -> 256).
EVAL_CROP_FRACTION = 0.875
# Examples in the training shuffle buffer: ~1.8 GB of encoded JPEGs per host (module docstring).
default_shuffle_buffer = 16_384


def manual_download_instructions(manual_dir: str) -> str:
  return (f'ImageNet 2012 is not prepared and must be downloaded by hand: register at '
          f'https://image-net.org/download-images, download {" and ".join(MANUAL_FILES)}, put them in '
          f'{manual_dir}/ (TFDS\'s manual dir, <data_dir>/downloads/manual), then run again: the first run '
          f'prepares the dataset (hours, about 150 GB of disk).')


def load(split: str, dataset_config: Any) -> tf.data.Dataset:
  """{'image': the encoded JPEG (tf.string), 'label': int64} examples of `split` ('train' or 'validation',
  alias 'test'/'eval'/'val'; TFDS slices work). Prepares the dataset on the first run when the manual
  download is in place; raises FileNotFoundError with instructions when it is not."""
  return image_and_label(_builder(dataset_config).as_dataset(split=canonical_split(split),
                                                            decoders={'image': tfds.decode.SkipDecoding()}))


def _builder(dataset_config: Any) -> tfds.core.DatasetBuilder:
  """The prepared `imagenet2012` builder (preparing it when the manual download is in place)."""
  builder = tfds.builder('imagenet2012', data_dir=dataset_config.data_dir)
  if not builder.is_prepared():
    manual_dir = default_manual_dir(builder)
    if not all(os.path.isfile(os.path.join(manual_dir, name)) for name in MANUAL_FILES):
      raise FileNotFoundError(manual_download_instructions(manual_dir))
    builder.download_and_prepare()
  return builder


def count_examples(split: str, dataset_config: Any) -> int:
  """Examples in `split` of the prepared dataset (slices work); FileNotFoundError when it is missing."""
  return split_examples(_builder(dataset_config), split)


def count_classes(dataset_config: Any) -> int:
  return label_classes(_builder(dataset_config))


def _resize(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
  """Bicubic resize (as the flax ImageNet example) to float32 0..255; clipped, as bicubic overshoots."""
  image = tf.image.resize(image, [height, width], method='bicubic', antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def _is_encoded(image: tf.Tensor) -> bool:
  return image.dtype == tf.string


def image_shape(image: tf.Tensor) -> tf.Tensor:
  """int32 (H, W, C) of an encoded JPEG (read from its header, nothing decoded) or a decoded image."""
  return tf.io.extract_jpeg_shape(image) if _is_encoded(image) else tf.shape(image)


def decode_crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """uint8 (h, w, 3) crop at window = (top, left, h, w); an encoded JPEG decodes only that window."""
  if _is_encoded(image):
    return tf.io.decode_and_crop_jpeg(image, window, channels=3)
  return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])


def decode_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3): an encoded JPEG decoded, a decoded image unchanged."""
  return tf.io.decode_jpeg(image, channels=3) if _is_encoded(image) else image


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """int32 (top, left, height, width) of an Inception crop of an image of `shape` (H, W, C).

  The crop covers CROP_AREA_RANGE of the image area with a width / height in CROP_ASPECT_RANGE; when 10
  draws all fail to fit (very elongated images) it is the whole image.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      # The box is the whole image, so the covered fraction is the crop's area fraction: the same floor.
      min_object_covered=CROP_AREA_RANGE[0],
      aspect_ratio_range=CROP_ASPECT_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def train_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor) -> tf.Tensor:
  """Random-resized crop (`random_crop_window`) then random horizontal flip, both from the stateless `seed`.

  Args:
    image: an encoded JPEG (tf.string; only the crop is decoded) or uint8 (H, W, 3).
    image_size: side S of the square output.
    seed: int32/int64 (2,): the same seed gives the same crop and flip.

  Returns:
    float32 (S, S, 3) in 0..255.
  """
  image = tf.convert_to_tensor(image)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  crop = decode_crop(image, random_crop_window(image_shape(image), crop_seed))
  image = _resize(crop, image_size, image_size)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor | None = None) -> tf.Tensor:
  """Resize the shorter side to round(image_size / 0.875) (bicubic), then take the central S×S square.

  Args:
    image: an encoded JPEG (tf.string) or uint8 (H, W, 3).
    image_size: side S of the square output.
    seed: unused; accepted so train and eval preprocessing share a signature.

  Returns:
    float32 (S, S, 3) in 0..255.
  """
  del seed
  image = decode_image(tf.convert_to_tensor(image))
  resized_short = round(image_size / EVAL_CROP_FRACTION)
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  scale = resized_short / tf.reduce_min(shape)
  height, width = tf.unstack(tf.cast(tf.round(shape * scale), tf.int32))
  image = _resize(image, height, width)
  top, left = (height - image_size) // 2, (width - image_size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
