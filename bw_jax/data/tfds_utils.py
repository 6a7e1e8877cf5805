"""Small TFDS conventions shared by the dataset modules built on TFDS (Tiny ImageNet, ImageNet 2012)."""

from __future__ import annotations

import os

from bw_jax.data.tf_imports import tf, tfds

# Other names by which callers may ask for the labelled held-out split (both datasets' test splits are
# unlabelled, so 'validation' is the evaluation split).
SPLIT_ALIASES = {'test': 'validation', 'eval': 'validation', 'val': 'validation'}


def canonical_split(split: str) -> str:
  """'test', 'eval' or 'val' -> 'validation', keeping any TFDS slice: 'eval[:10%]' -> 'validation[:10%]'."""
  base, bracket, rest = split.partition('[')
  return SPLIT_ALIASES.get(base, base) + bracket + rest


def default_manual_dir(builder: tfds.core.DatasetBuilder) -> str:
  """Where TFDS looks for manual downloads by default: `<data_dir>/downloads/manual`."""
  return os.path.join(builder.data_dir_root, 'downloads', 'manual')


def image_and_label(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Keeps only the {'image', 'label'} features of each example."""
  return dataset.map(lambda example: {'image': example['image'], 'label': example['label']},
                     num_parallel_calls=tf.data.AUTOTUNE)


def split_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in `split` of a prepared dataset, TFDS slices included ('train[:10%]', 'validation[10:20]'):
  TFDS's split info counts them from the files' shard lengths, without reading any example."""
  name = canonical_split(split)
  try:
    return int(builder.info.splits[name].num_examples)
  except (KeyError, ValueError, AssertionError) as e:  # TFDS raises all three for unknown or bad slices.
    raise ValueError(f'{builder.name} has no split {split!r} ({e}); its splits are '
                     f'{sorted(builder.info.splits)}, optionally sliced as in \'train[:10%]\'.') from None


def label_classes(builder: tfds.core.DatasetBuilder) -> int:
  """The class count of a prepared dataset's `label` feature (a ClassLabel, as written when it was built)."""
  return int(builder.info.features['label'].num_classes)
