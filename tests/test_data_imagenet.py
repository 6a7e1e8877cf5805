"""ImageNet 2012: loading on TFDS mock data, preprocessing against coordinate images, NumPy slices and
PIL's decoding of generated JPEGs."""

import io
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from bw_jax import data
from bw_jax.data import imagenet, synthetic

# A coordinate grid: channel 0 holds the row index, channel 1 the column index. Its width / height (1.2) is
# inside the crop's aspect range, so even the whole-image fallback of train_preprocess is a valid crop.
GRID_H, GRID_W = 200, 240


def _grid() -> np.ndarray:
  rows, cols = np.mgrid[0:GRID_H, 0:GRID_W]
  return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def _crop_box(output: np.ndarray) -> tuple[float, float, float, float, bool]:
  """(top, left, height, width, flipped) of the grid region that `output` (S, S, 3) was resized from.

  Resizing samples the crop at evenly spaced points, and interpolation reproduces a linear ramp exactly away
  from the borders, so two interior rows (columns) give the crop's extent: output index i sits at crop
  coordinate (i + 0.5) · extent / S - 0.5.
  """
  size = output.shape[0]
  a, b = size // 4, size - 1 - size // 4
  rows = output[:, :, 0].mean(axis=1)
  cols = output[:, :, 1].mean(axis=0)
  flipped = cols[b] < cols[a]
  if flipped:
    cols = cols[::-1]
  height = (rows[b] - rows[a]) * size / (b - a)
  width = (cols[b] - cols[a]) * size / (b - a)
  top = rows[a] - (a + 0.5) * height / size + 0.5
  left = cols[a] - (a + 0.5) * width / size + 0.5
  return top, left, height, width, flipped


def pil_decode(encoded: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(encoded)).convert('RGB')).astype(np.int64)


@pytest.fixture(scope='module')
def jpeg():
  """(encoded bytes, PIL's decoding as int64 (375, 500, 3)): an ImageNet-sized landscape photo-like JPEG."""
  encoded = synthetic.encode_jpeg(synthetic.photo_like_image(375, 500))
  return encoded, pil_decode(encoded)


# Two JPEG decoders differ by a few levels (IDCT rounding): here TF's and PIL's whole-image decodings by at
# most 4 and about 1 on average. A crop's last column also upsamples its chroma without the column to its
# right, a larger difference confined to that column.
DECODER_LEVELS, MEAN_LEVELS, EDGE_LEVELS = 4, 1.5, 16


def test_training_decodes_only_the_crop_and_it_is_the_pil_crop(jpeg):
  encoded, reference = jpeg
  shape = imagenet.image_shape(tf.constant(encoded))  # From the header: nothing decoded.
  np.testing.assert_array_equal(shape, (375, 500, 3))
  for i in range(8):
    top, left, height, width = imagenet.random_crop_window(shape, tf.constant([3, i])).numpy()
    assert 0 <= top and top + height <= 375 and 0 <= left and left + width <= 500
    assert 0.08 * 375 * 500 * 0.98 <= height * width
    crop = imagenet.decode_crop(tf.constant(encoded), tf.constant([top, left, height, width])).numpy()
    assert crop.shape == (height, width, 3) and crop.dtype == np.uint8
    difference = np.abs(crop.astype(np.int64) - reference[top:top + height, left:left + width])
    assert difference[:, :-1].max() <= DECODER_LEVELS and difference.mean() <= MEAN_LEVELS
    assert difference[:, -1].max() <= EDGE_LEVELS


def test_train_preprocess_of_the_jpeg_is_that_of_the_decoded_image(jpeg):
  # Same seed, same crop window and flip: the encoded path differs only by the decoders' few levels.
  encoded, reference = jpeg
  for i in range(4):
    seed = tf.constant([5, i])
    from_jpeg = imagenet.train_preprocess(tf.constant(encoded), 64, seed).numpy()
    from_pixels = imagenet.train_preprocess(tf.constant(reference.astype(np.uint8)), 64, seed).numpy()
    assert from_jpeg.shape == (64, 64, 3) and from_jpeg.dtype == np.float32
    assert np.abs(from_jpeg - from_pixels).mean() <= MEAN_LEVELS
    assert np.abs(from_jpeg - from_pixels).max() <= EDGE_LEVELS


def test_eval_preprocess_decodes_the_whole_jpeg(jpeg):
  encoded, reference = jpeg
  from_jpeg = imagenet.eval_preprocess(tf.constant(encoded), 64).numpy()
  from_pixels = imagenet.eval_preprocess(tf.constant(reference.astype(np.uint8)), 64).numpy()
  assert from_jpeg.shape == (64, 64, 3)
  assert np.abs(from_jpeg - from_pixels).max() <= DECODER_LEVELS


def test_train_crop_area_and_aspect_are_in_range():
  grid = tf.constant(_grid())
  boxes = [_crop_box(imagenet.train_preprocess(grid, 32, tf.constant([7, i])).numpy()) for i in range(40)]
  for top, left, height, width, _ in boxes:
    # Half a pixel of slack on each side for the rounding of the estimate.
    assert -0.5 <= top and top + height <= GRID_H + 0.5 and -0.5 <= left and left + width <= GRID_W + 0.5
    # 2% for the box's rounding to whole pixels (the sampler draws area and aspect, then rounds the sides).
    area = height * width / (GRID_H * GRID_W)
    assert 0.08 * 0.98 <= area <= 1.0 + 0.01, area
    assert 0.75 * 0.98 <= width / height <= 4 / 3 * 1.02, width / height
  areas = [height * width / (GRID_H * GRID_W) for _, _, height, width, _ in boxes]
  assert min(areas) < 0.3 and max(areas) > 0.6  # The crops really vary over the range.
  flips = [flipped for *_, flipped in boxes]
  assert 0 < sum(flips) < len(flips)


def test_train_preprocess_is_deterministic_per_seed():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
  first = imagenet.train_preprocess(image, 24, tf.constant([1, 2]))
  assert first.shape == (24, 24, 3) and first.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(first)) and float(tf.reduce_max(first)) <= 255.0
  np.testing.assert_array_equal(first, imagenet.train_preprocess(image, 24, tf.constant([1, 2])))
  assert not np.array_equal(first, imagenet.train_preprocess(image, 24, tf.constant([1, 3])))


@pytest.mark.parametrize('height, width', [(64, 80), (80, 64)])
def test_eval_preprocess_is_the_centre_crop(height, width):
  # 56 / 0.875 = 64 is already the shorter side, so the resize is the identity and the result must be the
  # NumPy centre slice exactly.
  image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
  output = imagenet.eval_preprocess(tf.constant(image), 56)
  top, left = (height - 56) // 2, (width - 56) // 2
  assert output.dtype == tf.float32
  np.testing.assert_array_equal(output.numpy(), image[top:top + 56, left:left + 56].astype(np.float32))


def test_eval_preprocess_resizes_the_shorter_side_to_image_size_over_0_875():
  # On the grid, the output's centre pixel tells the scale: the crop is the middle 224/256 of the resized
  # shorter side, so the rows seen span 200 · 224/256 = 175 grid rows.
  output = imagenet.eval_preprocess(tf.constant(_grid()), 224).numpy()
  assert output.shape == (224, 224, 3)
  top, left, height, width, flipped = _crop_box(output)
  assert not flipped
  np.testing.assert_allclose([height, width], [GRID_H * 224 / 256] * 2, atol=0.5)
  np.testing.assert_allclose([top + height / 2, left + width / 2], [GRID_H / 2, GRID_W / 2], atol=0.5)


def test_load_yields_encoded_jpegs_and_labels(tmp_path, monkeypatch):
  # mock_data replaces reading, not the "is it prepared?" check, which looks for real files.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  config = types.SimpleNamespace(data_dir=str(tmp_path), image_size=32)
  with tfds.testing.mock_data(num_examples=5):
    examples = list(imagenet.load('eval', config).as_numpy_iterator())
  assert len(examples) == 5
  for ex in examples:
    assert set(ex) == {'image', 'label'}
    assert isinstance(ex['image'], bytes)  # Still encoded: the shuffle buffer holds the JPEG.
    decoded = pil_decode(ex['image'])
    assert decoded.ndim == 3 and decoded.shape[2] == 3
    assert ex['label'].dtype == np.int64 and 0 <= ex['label'] < imagenet.NUM_CLASSES
    assert imagenet.eval_preprocess(ex['image'], 32).shape == (32, 32, 3)


def test_unprepared_dataset_says_how_to_download(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('must not start preparing without the manual download')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  config = types.SimpleNamespace(data_dir=str(tmp_path), image_size=224)
  with pytest.raises(FileNotFoundError) as error:
    imagenet.load('train', config)
  message = str(error.value)
  for needed in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', str(tmp_path / 'downloads' / 'manual'),
                 'image-net.org'):
    assert needed in message


def test_training_batches_of_synthetic_jpegs_through_the_tfds_builder():
  # End to end: TFDS's imagenet2012 builder (reading mocked) -> encoded JPEGs -> crop decoding -> uint8.
  config = data.default_dataset_config('imagenet2012')
  config.image_size, config.shuffle_buffer = 32, 16
  with synthetic.synthetic_data('imagenet2012', num_examples=16):
    batches, info = data.create_split(config, 'train', 8, train=True, normalise=False)
    first, second = next(batches), next(batches)
  assert info is imagenet.INFO
  for batch in (first, second):
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['image'].std() > 10  # Decoded photo-like content, not blank.
  # One epoch of 16 examples: every label 0..15 once.
  np.testing.assert_array_equal(np.sort(np.concatenate([first['label'], second['label']])), np.arange(16))
