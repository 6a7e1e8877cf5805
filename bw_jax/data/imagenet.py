"""ImageNet 2012 (ILSVRC 2012) through TFDS `imagenet2012`, with Inception-style training crops.

ImageNet cannot be downloaded automatically: register at https://image-net.org/download-images, put
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in `<data_dir>/downloads/manual/` (`data_dir` being
`config.dataset.data_dir`, default `~/tensorflow_datasets`), and the first run prepares the TFDS dataset
(hours, about 150 GB).

`train_preprocess` and `eval_preprocess` turn a decoded uint8 image of any size into float32
(image_size, image_size, 3) pixels in 0..255; normalising by MEAN/STD is left to the pipeline.
"""

import os
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from bw_jax.data.pipeline import DatasetInfo
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


def manual_download_instructions(manual_dir: str) -> str:
  return (f'ImageNet 2012 is not prepared and must be downloaded by hand: register at '
          f'https://image-net.org/download-images, download {" and ".join(MANUAL_FILES)}, put them in '
          f'{manual_dir}/ (TFDS\'s manual dir, <data_dir>/downloads/manual), then run again: the first run '
          f'prepares the dataset (hours, about 150 GB of disk).')


def load(split: str, dataset_config: Any) -> tf.data.Dataset:
  """{'image': uint8 (H, W, 3) of varying size, 'label': int64} examples of `split` ('train' or
  'validation', alias 'test'/'eval'/'val'; TFDS slices work). Prepares the dataset on the first run when the
  manual download is in place; raises FileNotFoundError with instructions when it is not."""
  return image_and_label(_builder(dataset_config).as_dataset(split=canonical_split(split)))


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


def train_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor) -> tf.Tensor:
  """Random-resized crop then random horizontal flip, both from the stateless `seed`.

  Args:
    image: uint8 (H, W, 3).
    image_size: side S of the square output.
    seed: int32/int64 (2,): the same seed gives the same crop and flip.

  Returns:
    float32 (S, S, 3) in 0..255. The crop covers CROP_AREA_RANGE of the image area with a width / height in
    CROP_ASPECT_RANGE; when 10 draws all fail to fit (very elongated images) it is the whole image.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed,
      # The box is the whole image, so the covered fraction is the crop's area fraction: the same floor.
      min_object_covered=CROP_AREA_RANGE[0],
      aspect_ratio_range=CROP_ASPECT_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  image = _resize(tf.slice(image, begin, size), image_size, image_size)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor | None = None) -> tf.Tensor:
  """Resize the shorter side to round(image_size / 0.875) (bicubic), then take the central S×S square.

  Args:
    image: uint8 (H, W, 3).
    image_size: side S of the square output.
    seed: unused; accepted so train and eval preprocessing share a signature.

  Returns:
    float32 (S, S, 3) in 0..255.
  """
  del seed
  resized_short = round(image_size / EVAL_CROP_FRACTION)
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  scale = resized_short / tf.reduce_min(shape)
  height, width = tf.unstack(tf.cast(tf.round(shape * scale), tf.int32))
  image = _resize(image, height, width)
  top, left = (height - image_size) // 2, (width - image_size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
