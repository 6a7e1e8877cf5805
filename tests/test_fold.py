"""BW folded into the 1×1 conv beside it (bw_jax/models/fold.py): the algebra against float64 NumPy; the folded
network of every combination against the unfolded one is in test_efficientnet.py (all 16) and test_export.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.models import efficientnet as en
from bw_jax.models.fold import absorb_whitening, block_diagonal, extract_whitening, fold_for_inference


def random_bw_and_conv(seed: int = 0, groups: int = 3, g: int = 4, features: int = 5):
  """Running (μ, S) of a BW layer of G·g channels (S lower-triangular, positive diagonal) and a 1×1 conv."""
  rng = np.random.default_rng(seed)
  whitening = np.tril(rng.normal(size=(groups, g, g)), -1) + np.eye(g) * rng.uniform(0.5, 1.5, (groups, 1, g))
  return (rng.normal(size=groups * g), whitening, rng.normal(size=(1, 1, groups * g, features)),
          rng.normal(size=features), rng.normal(size=(7, groups * g)))


def bw_then_conv(x, mean, whitening, kernel, bias):
  """z = S (x − μ) per group, then x K + b: the unfolded pair, per sample, in float64."""
  groups, g, _ = whitening.shape
  y = np.einsum('gij,ngj->ngi', whitening, (x - mean).reshape(len(x), groups, g)).reshape(x.shape)
  return y @ kernel[0, 0] + bias


def test_absorbing_bw_into_the_conv_after_it_computes_the_same():
  mean, whitening, kernel, bias, x = random_bw_and_conv()
  folded_kernel, folded_bias = absorb_whitening(kernel, bias, mean, whitening)
  np.testing.assert_allclose(x @ folded_kernel[0, 0] + folded_bias, bw_then_conv(x, mean, whitening, kernel, bias),
                             rtol=1e-12, atol=1e-12)


def test_extracting_is_the_inverse_of_absorbing():
  mean, whitening, kernel, bias, x = random_bw_and_conv(seed=1)
  plain_kernel, plain_bias = kernel, bias  # a conv on x
  on_y = extract_whitening(plain_kernel, plain_bias, mean, whitening)
  np.testing.assert_allclose(bw_then_conv(x, mean, whitening, *on_y), x @ plain_kernel[0, 0] + plain_bias,
                             rtol=1e-10, atol=1e-10)
  back = absorb_whitening(*on_y, mean, whitening)
  np.testing.assert_allclose(back[0], plain_kernel, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(back[1], plain_bias, rtol=1e-10, atol=1e-12)


def test_block_diagonal_places_each_group_on_the_diagonal():
  blocks = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
  full = block_diagonal(blocks)
  np.testing.assert_array_equal(full[:3, :3], blocks[0])
  np.testing.assert_array_equal(full[3:, 3:], blocks[1])
  assert not full[:3, 3:].any() and not full[3:, :3].any()


def test_a_folded_network_only_evaluates_and_is_not_folded_twice():
  model = en.EfficientNet(num_classes=3, mbconv_type=2, width_multiplier=0.25, depth_multiplier=0.1)
  with pytest.raises(ValueError, match='only evaluates: call it with train=False'):
    model.clone(folded=True).apply({}, jnp.zeros((1, 32, 32, 3)), train=True)
  with pytest.raises(ValueError, match='folded already'):
    fold_for_inference(model.clone(folded=True), {})
