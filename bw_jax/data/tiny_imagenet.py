"""Tiny ImageNet (200 classes, 64×64 RGB): a TFDS builder over the official zip or its extracted folder.

Tiny ImageNet is not in the TFDS catalog, so `TinyImagenet` builds it from the manual download:

    # download http://cs231n.stanford.edu/tiny-imagenet-200.zip into MANUAL_DIR (unzipping is optional)
    python -m bw_jax.data.tiny_imagenet --manual_dir MANUAL_DIR [--data_dir DATA_DIR]

Labels are the index of the image's wnid in `wnids.txt`; the label names are the wnids and the human-readable
names from `words.txt` are kept in `info.metadata['class_names']`. The official test split has no labels
and is not built.
"""

import argparse
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from bw_jax.data.pipeline import DatasetInfo
from bw_jax.data.tf_imports import tf, tfds
from bw_jax.data.tfds_utils import (canonical_split, default_manual_dir, image_and_label, label_classes,
                                   split_examples)

NUM_CLASSES = 200
IMAGE_SHAPE = (64, 64, 3)
NUM_EXAMPLES = {'train': 100_000, 'validation': 10_000}
# The channel statistics commonly published for Tiny ImageNet's training set, (0.4802, 0.4481, 0.3975) and
# (0.2302, 0.2265, 0.2262) in 0..1 units, here in 0..255 pixel units.
MEAN = (122.451, 114.2655, 101.3625)
STD = (58.701, 57.7575, 57.681)
INFO = DatasetInfo(name='tiny_imagenet', num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
                   num_examples=NUM_EXAMPLES, mean=MEAN, std=STD)

DOWNLOAD_URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
ZIP_NAME = 'tiny-imagenet-200.zip'
FOLDER_NAME = 'tiny-imagenet-200'

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {DOWNLOAD_URL} into the manual directory (default `<data_dir>/downloads/manual/`); it may stay zipped
as {ZIP_NAME} or be extracted there as {FOLDER_NAME}/. Then prepare it once with
`python -m bw_jax.data.tiny_imagenet --manual_dir DIR [--data_dir DIR]`.
"""


class _OfficialLayout:
  """Reads files of the official layout, relative to `tiny-imagenet-200/`, from the folder or the zip."""

  def __init__(self, manual_dir: os.PathLike | str):
    folder = os.path.join(manual_dir, FOLDER_NAME)
    zip_path = os.path.join(manual_dir, ZIP_NAME)
    self._zip = None
    if os.path.isdir(folder):  # Preferred when both exist: no decompression.
      self._folder = folder
    elif os.path.isfile(zip_path):
      self._zip = zipfile.ZipFile(zip_path)
      self._zip_dirs = {}  # 'train/n01443537/images' -> sorted file names in it.
      for name in self._zip.namelist():
        head, sep, rest = name.partition('/')
        if head == FOLDER_NAME and sep and not name.endswith('/'):
          directory, _, base = rest.rpartition('/')
          self._zip_dirs.setdefault(directory, []).append(base)
      for names in self._zip_dirs.values():
        names.sort()
    else:
      raise FileNotFoundError(
          f'Neither {folder}/ nor {zip_path} exists.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')

  def read_bytes(self, path: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(f'{FOLDER_NAME}/{path}')
    with open(os.path.join(self._folder, path), 'rb') as f:
      return f.read()

  def read_lines(self, path: str) -> list[str]:
    return [line for line in self.read_bytes(path).decode('utf-8').splitlines() if line.strip()]

  def jpegs(self, directory: str) -> list[str]:
    """Sorted names of the .JPEG files in `directory`."""
    if self._zip is not None:
      names = self._zip_dirs.get(directory, [])
    else:
      names = sorted(os.listdir(os.path.join(self._folder, directory)))
    return [name for name in names if name.endswith('.JPEG')]


def read_class_names(layout: _OfficialLayout) -> tuple[list[str], list[str]]:
  """(wnids in `wnids.txt` order, their human-readable names from `words.txt`)."""
  wnids = [line.strip() for line in layout.read_lines('wnids.txt')]
  words = dict(line.split('\t', 1) for line in layout.read_lines('words.txt'))
  missing = [wnid for wnid in wnids if wnid not in words]
  if missing:
    raise ValueError(f'words.txt has no name for the wnids {missing[:5]} of wnids.txt.')
  return wnids, [words[wnid].strip() for wnid in wnids]


def _image_feature_value(data: bytes, path: str) -> bytes | np.ndarray:
  """The original JPEG when it is already 64×64 RGB; otherwise (greyscale) its pixels as RGB."""
  image = tf.io.decode_image(data, expand_animations=False)  # Native channel count.
  if tuple(image.shape[:2]) != IMAGE_SHAPE[:2]:
    raise ValueError(f'{path} is {image.shape[1]}×{image.shape[0]}, expected 64×64.')
  if image.shape[2] == 3 and tf.io.is_jpeg(data):
    return data  # Kept bit-exact: no JPEG re-encoding.
  # Grey replicated to R = G = B; TFDS re-encodes it as JPEG (quality 95), whose chroma stays neutral.
  return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


class TinyImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """Tiny ImageNet 200: 100,000 training and 10,000 validation 64×64 images."""
  # Run as `python -m`, this file is `__main__` and the package may also import it: registering the name
  # `tiny_imagenet` twice would be an error, so only the importable module registers it.

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: train and validation splits.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Tiny ImageNet 200 (CS231n): 200 ImageNet classes at 64×64, 500 training and 50 '
                    'validation images per class.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE, encoding_format='jpeg'),
            # Names (the wnids) are only known from the download; they are set in _split_generators.
            'label': tfds.features.ClassLabel(),
            'id': tfds.features.Text(),  # The file name without extension, e.g. 'n01443537_0' or 'val_0'.
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.kaggle.com/c/tiny-imagenet',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    layout = _OfficialLayout(dl_manager.manual_dir)
    wnids, class_names = read_class_names(layout)
    self.info.features['label'].names = wnids
    self.info.metadata['class_names'] = class_names
    label_of = {wnid: index for index, wnid in enumerate(wnids)}
    return {
        'train': self._generate_examples(layout, _train_files(layout, wnids), label_of),
        'validation': self._generate_examples(layout, _validation_files(layout), label_of),
    }

  def _generate_examples(self, layout: _OfficialLayout, files: list[tuple[str, str]],
                         label_of: dict[str, int]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, wnid in files:
      if wnid not in label_of:
        raise ValueError(f'{path} is labelled {wnid}, which is not in wnids.txt.')
      yield path, {
          'image': _image_feature_value(layout.read_bytes(path), path),
          'label': label_of[wnid],
          'id': os.path.splitext(os.path.basename(path))[0],
      }


def _train_files(layout: _OfficialLayout, wnids: list[str]) -> list[tuple[str, str]]:
  """(path, wnid) of every training image: `train/<wnid>/images/*.JPEG`."""
  return [(f'train/{wnid}/images/{name}', wnid)
          for wnid in wnids for name in layout.jpegs(f'train/{wnid}/images')]


def _validation_files(layout: _OfficialLayout) -> list[tuple[str, str]]:
  """(path, wnid) of every validation image, from `val/val_annotations.txt` (file, wnid, bounding box)."""
  files = []
  for line in layout.read_lines('val/val_annotations.txt'):
    name, wnid = line.split('\t')[:2]
    files.append((f'val/images/{name}', wnid))
  return files


def prepare(manual_dir: str | None = None, data_dir: str | None = None) -> TinyImagenet:
  """Builds the TFDS dataset in `data_dir` (None: TFDS's default) from the download in `manual_dir`."""
  builder = TinyImagenet(data_dir=data_dir)
  if not builder.is_prepared():
    manual_dir = manual_dir or default_manual_dir(builder)
    _OfficialLayout(manual_dir)  # Fails now, with the instructions, when the download is missing.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load(split: str, dataset_config: Any) -> tf.data.Dataset:
  """{'image': uint8 (64, 64, 3), 'label': int64} examples of `split` ('train' or 'validation', alias
  'test'/'eval'/'val'; TFDS slices such as 'train[:10%]' work), preparing the dataset on first use."""
  return image_and_label(_builder(dataset_config).as_dataset(split=canonical_split(split)))


def _builder(dataset_config: Any) -> TinyImagenet:
  return prepare(getattr(dataset_config, 'manual_dir', None), dataset_config.data_dir)


def count_examples(split: str, dataset_config: Any) -> int:
  """Examples in `split` as prepared (a fake or partial download counts what it holds; slices work)."""
  return split_examples(_builder(dataset_config), split)


def count_classes(dataset_config: Any) -> int:
  """Classes of the prepared dataset: the wnids of its `wnids.txt` (200 in the official release)."""
  return label_classes(_builder(dataset_config))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m bw_jax.data.tiny_imagenet',
      description='Prepare the Tiny ImageNet TFDS dataset from the official download.')
  parser.add_argument('--manual_dir', default=None,
                      help=f'folder holding {ZIP_NAME} or {FOLDER_NAME}/ '
                           '(default: <data_dir>/downloads/manual)')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (default: TFDS\'s own, ~/tensorflow_datasets)')
  args = parser.parse_args(argv)
  print(f'Preparing tiny_imagenet from {args.manual_dir or "<data_dir>/downloads/manual"} …', flush=True)
  try:
    builder = prepare(args.manual_dir, args.data_dir)  # TFDS prints a progress bar per split.
  except FileNotFoundError as error:
    raise SystemExit(str(error)) from None
  for split, expected in NUM_EXAMPLES.items():
    count = builder.info.splits[split].num_examples
    note = '' if count == expected else f'  (WARNING: the official release has {expected:,})'
    print(f'{split}: {count:,} examples{note}')
  # builder.data_dir is TFDS's versioned folder inside; configs take the data_dir above it.
  print(f'Ready. Train on it with --config.dataset.data_dir={builder.data_dir_root} (bw_jax.main) or '
        f'--config.train.dataset.data_dir={builder.data_dir_root} (bw_jax.sweep run).')


if __name__ == '__main__':
  main()
