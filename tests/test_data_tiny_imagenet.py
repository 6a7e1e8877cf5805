"""Tiny ImageNet builder on a small fake download written in the official layout (folder and zip)."""

import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bw_jax.data import tiny_imagenet

WNIDS = ['n01443537', 'n01629819', 'n01641577']
WORDS = {'n01443537': 'goldfish, Carassius auratus',
         'n01629819': 'European fire salamander, Salamandra salamandra',
         'n01641577': 'bullfrog, Rana catesbeiana'}
TRAIN_PER_CLASS = 4
GREY_TRAIN_ID = 'n01629819_2'
# Validation images in an order that is not by class, as in the real val_annotations.txt.
VAL_WNIDS = ['n01641577', 'n01443537', 'n01629819', 'n01443537', 'n01641577', 'n01629819']


def _jpeg(pixels: np.ndarray) -> bytes:
  """A baseline JPEG of `pixels` (H, W, 1) grey or (H, W, 3) RGB uint8, as a camera or PIL would write."""
  return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _rgb_image(rng: np.random.Generator) -> np.ndarray:
  # Smooth colour gradients plus a little noise: compresses like a photograph, not like pure noise.
  y, x = np.mgrid[0:64, 0:64]
  base = np.stack([2 * y + 30, 3 * x + 20, y + x + 60], axis=-1) + rng.integers(0, 20, (64, 64, 3))
  return base.clip(0, 255).astype(np.uint8)


def _grey_image() -> np.ndarray:
  y, x = np.mgrid[0:64, 0:64]
  return (40 + 2 * y + x).astype(np.uint8)[..., None]


def _write_fake_download(root) -> dict[str, bytes]:
  """Writes `root/tiny-imagenet-200/` in the official layout; returns {image id: JPEG bytes}."""
  rng = np.random.default_rng(0)
  top = os.path.join(root, tiny_imagenet.FOLDER_NAME)
  os.makedirs(top)
  with open(os.path.join(top, 'wnids.txt'), 'w') as f:
    f.write(''.join(f'{wnid}\n' for wnid in WNIDS))
  # The real words.txt names all 82,115 ImageNet synsets, not only the 200 of wnids.txt.
  extra = {'n00001740': 'entity', 'n00002137': 'abstraction, abstract entity', 'n99999999': 'unused'}
  with open(os.path.join(top, 'words.txt'), 'w') as f:
    f.write(''.join(f'{wnid}\t{name}\n' for wnid, name in sorted({**WORDS, **extra}.items())))
  jpegs = {}
  for wnid in WNIDS:
    folder = os.path.join(top, 'train', wnid, 'images')
    os.makedirs(folder)
    with open(os.path.join(top, 'train', wnid, f'{wnid}_boxes.txt'), 'w') as f:
      f.write(''.join(f'{wnid}_{i}.JPEG\t0\t0\t63\t63\n' for i in range(TRAIN_PER_CLASS)))
    for i in range(TRAIN_PER_CLASS):
      image_id = f'{wnid}_{i}'
      jpegs[image_id] = _jpeg(_grey_image() if image_id == GREY_TRAIN_ID else _rgb_image(rng))
      with open(os.path.join(folder, f'{image_id}.JPEG'), 'wb') as f:
        f.write(jpegs[image_id])
  os.makedirs(os.path.join(top, 'val', 'images'))
  with open(os.path.join(top, 'val', 'val_annotations.txt'), 'w') as f:
    for i, wnid in enumerate(VAL_WNIDS):
      f.write(f'val_{i}.JPEG\t{wnid}\t{i}\t{2 * i}\t{40 + i}\t{50 + i}\n')
      jpegs[f'val_{i}'] = _jpeg(_rgb_image(rng))
      with open(os.path.join(top, 'val', 'images', f'val_{i}.JPEG'), 'wb') as f_image:
        f_image.write(jpegs[f'val_{i}'])
  return jpegs


def _expected_wnid(image_id: str) -> str:
  return VAL_WNIDS[int(image_id[4:])] if image_id.startswith('val_') else image_id.split('_')[0]


@pytest.fixture(scope='module', params=['folder', 'zip'])
def prepared(request, tmp_path_factory):
  """(builder, {image id: JPEG bytes}, config) for a fake download given as a folder or as the zip."""
  manual_dir = str(tmp_path_factory.mktemp('manual'))
  jpegs = _write_fake_download(manual_dir)
  if request.param == 'zip':
    shutil.make_archive(os.path.join(manual_dir, 'tiny-imagenet-200'), 'zip', manual_dir, 'tiny-imagenet-200')
    shutil.rmtree(os.path.join(manual_dir, tiny_imagenet.FOLDER_NAME))
    assert os.listdir(manual_dir) == [tiny_imagenet.ZIP_NAME]
  config = types.SimpleNamespace(data_dir=str(tmp_path_factory.mktemp('tfds')), manual_dir=manual_dir,
                                 image_size=64)
  builder = tiny_imagenet.prepare(config.manual_dir, config.data_dir)
  return builder, jpegs, config


def _examples(builder, split):
  return {ex['id'].decode(): ex for ex in builder.as_dataset(split=split).as_numpy_iterator()}


def test_counts_labels_and_shapes(prepared):
  builder, jpegs, _ = prepared
  assert builder.info.splits['train'].num_examples == len(WNIDS) * TRAIN_PER_CLASS
  assert builder.info.splits['validation'].num_examples == len(VAL_WNIDS)
  for split, expected_ids in [('train', {i for i in jpegs if not i.startswith('val_')}),
                              ('validation', {f'val_{i}' for i in range(len(VAL_WNIDS))})]:
    examples = _examples(builder, split)
    assert set(examples) == expected_ids
    for image_id, ex in examples.items():
      assert ex['label'] == WNIDS.index(_expected_wnid(image_id)), image_id
      assert ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8


def test_rgb_images_are_stored_as_the_original_jpeg_bytes(prepared):
  builder, jpegs, _ = prepared
  raw = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  stored = {ex['id'].decode(): ex['image'] for ex in raw.as_numpy_iterator()}
  for image_id, data in stored.items():
    if image_id != GREY_TRAIN_ID:
      assert data == jpegs[image_id], image_id


def test_greyscale_image_becomes_three_equal_channels(prepared):
  builder, jpegs, _ = prepared
  image = _examples(builder, 'train')[GREY_TRAIN_ID]['image'].astype(int)
  grey = tf.io.decode_jpeg(jpegs[GREY_TRAIN_ID]).numpy().astype(int)  # Native channels.
  assert grey.shape == (64, 64, 1)  # The fixture really is a one-channel JPEG.
  grey = grey[..., 0]
  # Grey replicated to RGB has neutral chroma, which JPEG stores exactly: the channels stay equal.
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  # TFDS re-encodes the RGB pixels as JPEG at quality 95: on this smooth ramp that moved them by at most 2
  # grey levels (0.55 on average) from the original's decoded values; the bounds leave a little margin.
  error = np.abs(image[..., 0] - grey)
  assert error.max() <= 3 and error.mean() < 0.75, (error.max(), error.mean())


def test_class_names_survive_a_reload(prepared):
  builder, _, config = prepared
  reloaded = tiny_imagenet.TinyImagenet(data_dir=config.data_dir)  # Metadata read back from the files.
  assert reloaded.info.features['label'].names == WNIDS
  assert reloaded.info.metadata['class_names'] == [WORDS[wnid] for wnid in WNIDS]


def test_load_maps_aliases_and_keeps_image_and_label(prepared):
  builder, _, config = prepared
  examples = list(tiny_imagenet.load('test', config).as_numpy_iterator())
  assert len(examples) == len(VAL_WNIDS)
  assert all(set(ex) == {'image', 'label'} for ex in examples)
  by_order = list(builder.as_dataset(split='validation').as_numpy_iterator())
  assert [ex['label'] for ex in examples] == [ex['label'] for ex in by_order]


def test_missing_download_says_where_to_get_it(tmp_path):
  config = types.SimpleNamespace(data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path), image_size=64)
  with pytest.raises(FileNotFoundError, match='cs231n.stanford.edu/tiny-imagenet-200.zip'):
    tiny_imagenet.load('train', config)


def training_config(prepared_config, **values):
  """A training config of the real schema reading the fake download, with `values` set."""
  from bw_jax.train.config import schema as config_schema
  config = config_schema.get_config()
  config.dataset = tiny_imagenet_dataset_config(prepared_config.data_dir)
  for key, value in values.items():
    config[key] = value
  return config


def tiny_imagenet_dataset_config(data_dir):
  from bw_jax.data import default_dataset_config
  dataset = default_dataset_config('tiny_imagenet')
  dataset.data_dir = data_dir
  return dataset


@pytest.mark.parametrize('split', ['train', 'train[:50%]', 'validation', 'eval[:2]', 'train[3:]'])
def test_split_size_counts_the_examples_actually_read(prepared, split):
  from bw_jax import data
  _, _, config = prepared
  dataset = tiny_imagenet_dataset_config(config.data_dir)
  read = len(list(tiny_imagenet.load(split, dataset).as_numpy_iterator()))  # The reference: count by reading.
  assert data.split_size(dataset, split) == read
  assert read < tiny_imagenet.NUM_EXAMPLES['train']  # Not the published size of the full release.


def test_training_length_uses_the_split_actually_read(prepared):
  from bw_jax.train.plan import resolve_plan
  _, _, config = prepared
  # 'train[:50%]' of 12 images is 6: 3 steps of 2 per epoch, 2.5 epochs -> 7.5 -> 8 steps.
  cfg = training_config(config, batch_size=2, num_epochs=2.5)
  cfg.dataset.train_split = 'train[:50%]'
  length = lambda plan: (plan.train_examples, plan.steps_per_epoch, plan.num_train_steps)
  assert length(resolve_plan(cfg)) == (6, 3, 8)
  cfg.num_train_steps = 5
  assert length(resolve_plan(cfg)) == (6, 3, 5)
  cfg.batch_size = 8
  with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 6 examples of tiny_imagenet split "
                                       r"'train\[:50%\]'; use at most 6"):
    resolve_plan(cfg)


def test_unknown_split_names_the_splits(prepared):
  from bw_jax import data
  _, _, config = prepared
  with pytest.raises(ValueError, match=r"tiny_imagenet has no split 'trian'.*\['train', 'validation'\]"):
    data.split_size(tiny_imagenet_dataset_config(config.data_dir), 'trian')


def test_class_count_comes_from_the_prepared_metadata(prepared):
  from bw_jax import data
  from bw_jax.train.step import model_num_classes
  _, _, config = prepared
  cfg = training_config(config)
  assert data.class_count(cfg.dataset) == len(WNIDS) != tiny_imagenet.NUM_CLASSES
  assert model_num_classes(cfg, len(WNIDS)) == len(WNIDS)
  cfg.model.num_classes = len(WNIDS)
  assert model_num_classes(cfg, len(WNIDS)) == len(WNIDS)


def test_a_head_that_does_not_match_the_data_fails_before_training(prepared, tmp_path):
  from bw_jax.train import loop as train
  _, _, config = prepared
  cfg = training_config(config, batch_size=2, num_train_steps=1)  # Today's code trains it, and quickly.
  cfg.model.num_classes = 200
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r'config.model.num_classes=200, but the prepared tiny_imagenet data has '
                                       r'3 classes; set it to 3 or leave it None'):
    train.train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()


def test_preparer_prints_the_data_dir_that_configs_take(prepared, capsys):
  builder, _, config = prepared
  tiny_imagenet.main(['--manual_dir', config.manual_dir, '--data_dir', config.data_dir])  # Already prepared.
  out = capsys.readouterr().out
  assert f'--config.dataset.data_dir={config.data_dir} (bw_jax.main)' in out
  assert f'--config.train.dataset.data_dir={config.data_dir} (bw_jax.sweep run)' in out
  assert builder.data_dir != config.data_dir and builder.data_dir not in out  # Not TFDS's versioned folder.
