"""EfficientNet's forward pass in float64 NumPy, composed by hand from a variables tree: the independent
reference for the model's logits (train and eval) in every stem / MBConv / head combination.

Only the block table (`block_specs`: channels, kernels, strides, checked against published parameter counts
elsewhere) is taken from the model code; every layer is written here from its formula: TF 'SAME' padding,
convolutions as sums over kernel taps, BatchNorm with the biased batch variance, BW as y = S (x − μ) with
S = L⁻¹ of the unbiased group covariance plus ε·I (training) or the stored running S (evaluation).
"""

import numpy as np
from flax import traverse_util

from bw_jax.models import efficientnet as en

BN_EPSILON = 1e-3


def swish(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def taps(x: np.ndarray, k: int, stride: int):
  """Yields (i, j, strided slice of the 'SAME'-padded x under tap (i, j)) for a k×k kernel."""
  n, h, w, _ = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h, pad_w = max((out_h - 1) * stride + k - h, 0), max((out_w - 1) * stride + k - w, 0)
  padded = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  for i in range(k):
    for j in range(k):
      yield i, j, padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]


def conv(x: np.ndarray, layer: dict, stride: int = 1) -> np.ndarray:
  """Full convolution, kernel (k, k, C, O), optional bias."""
  kernel = layer['kernel']
  y = sum(patch @ kernel[i, j] for i, j, patch in taps(x, kernel.shape[0], stride))
  return y + layer['bias'] if 'bias' in layer else y


def depthwise(x: np.ndarray, layer: dict, stride: int) -> np.ndarray:
  kernel = layer['kernel']  # (k, k, 1, C)
  return sum(patch * kernel[i, j, 0] for i, j, patch in taps(x, kernel.shape[0], stride))


def batchnorm(x: np.ndarray, params: dict, stats: dict, train: bool) -> np.ndarray:
  mean, var = (x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))) if train else (stats['mean'], stats['var'])
  return params['scale'] * (x - mean) / np.sqrt(var + BN_EPSILON) + params['bias']


def batch_whitening(x: np.ndarray, stats: dict, epsilon: float, train: bool) -> np.ndarray:
  channels = x.shape[-1]
  groups, g, _ = stats['whitening'].shape
  samples = x.reshape(-1, channels)
  if train:
    mean = samples.mean(axis=0)
    centred = (samples - mean).reshape(-1, groups, g)
    cov = np.einsum('mgi,mgj->gij', centred, centred) / (samples.shape[0] - 1)
    whitening = np.linalg.inv(np.linalg.cholesky(cov + epsilon * np.eye(g)))
  else:
    mean, whitening = stats['mean'], stats['whitening']
  y = np.einsum('gij,mgj->mgi', whitening, (samples - mean).reshape(-1, groups, g))
  return y.reshape(x.shape)


def squeeze_excite(x: np.ndarray, params: dict) -> np.ndarray:
  s = x.mean(axis=(1, 2), keepdims=True)
  return x * sigmoid(conv(swish(conv(s, params['reduce'])), params['expand']))


def mbconv(x: np.ndarray, spec: en.BlockSpec, mbconv_type: int, p: dict, s: dict, train: bool,
           epsilon: float) -> np.ndarray:
  bw = lambda h, name: batch_whitening(h, s[name], epsilon, train)
  bn = lambda h, name: batchnorm(h, p[name], s[name], train)
  h = x
  if spec.expand_ratio != 1:
    h = swish(bn(conv(h, p['expand_conv']), 'expand_bn') if mbconv_type == 0
              else conv(bw(h, 'expand_bw'), p['expand_conv']))
  dw = lambda h: depthwise(h, p['depthwise_conv'], spec.stride)
  h = {0: lambda: bn(dw(h), 'depthwise_bn'), 1: lambda: dw(bn(h, 'depthwise_bn')),
       2: lambda: bn(dw(h), 'depthwise_bn'), 3: lambda: dw(h)}[mbconv_type]()
  h = swish(h)
  if mbconv_type != 0:
    h = bw(h, 'depthwise_bw')
  h = conv(squeeze_excite(h, p['se']), p['project_conv'])
  if mbconv_type == 0:
    h = bn(h, 'project_bn')
  return h + x if spec.stride == 1 and spec.in_channels == spec.out_channels else h


def logits(model: en.EfficientNet, variables: dict, images: np.ndarray, train: bool) -> np.ndarray:
  """(N, H, W, C) images -> (N, classes) logits in float64, without dropout or stochastic depth."""
  to64 = lambda tree: traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(tree).items()})
  p, s = to64(variables['params']), to64(variables.get('batch_stats', {}))
  width, depth, _ = model.scaling
  epsilon = model.bw.epsilon
  x = np.asarray(images, np.float64)
  if model.stem_type == 1:
    x = batchnorm(conv(x, p['stem_conv'], model.stem_stride), p['stem_bn'], s['stem_bn'], train)
  else:
    x = depthwise(x, p['stem_depthwise'], model.stem_stride)
    x = conv(batch_whitening(x, s['stem_bw'], epsilon, train), p['stem_conv'])
  x = swish(x)
  for index, spec in enumerate(en.block_specs(width, depth, 0.0)):
    name = f'block_{index}'
    x = mbconv(x, spec, model.mbconv_type, p[name], s.get(name, {}), train, epsilon)
  if model.head_type == 1:
    x = batchnorm(conv(x, p['head_conv']), p['head_bn'], s['head_bn'], train)
  else:
    x = conv(batch_whitening(x, s['head_bw'], epsilon, train), p['head_conv'])
  features = swish(x).mean(axis=(1, 2))
  return features @ p['classifier']['kernel'] + p['classifier']['bias']


def with_random_statistics(variables: dict, seed: int = 0) -> dict:
  """`variables` with every running statistic, γ and bias drawn at random (initial values — zero means,
  unit variances, S = I, zero biases — would hide a swapped or ignored one): BN means N(0, 0.3²) and
  variances U(0.5, 2); BW means N(0, 0.3²) and S lower-triangular, diagonal U(0.5, 1.5), below it N(0, 0.3²);
  γ and biases shifted by N(0, 0.2²). float32, as the model stores them."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  drawn = {}
  for path, value in flat.items():
    value = np.asarray(value, np.float64)
    collection, name = path[0], path[-1]
    if collection == 'batch_stats' and name == 'whitening':
      groups, g, _ = value.shape
      value = np.tril(rng.normal(0, 0.3, value.shape), -1) + np.eye(g) * rng.uniform(0.5, 1.5, (groups, 1, g))
    elif collection == 'batch_stats' and name == 'var':
      value = rng.uniform(0.5, 2.0, value.shape)
    elif collection == 'batch_stats' and name == 'mean':
      value = rng.normal(0, 0.3, value.shape)
    elif collection == 'params' and name in ('scale', 'bias'):
      value = value + rng.normal(0, 0.2, value.shape)
    drawn[path] = np.asarray(value, np.float32)
  return traverse_util.unflatten_dict(drawn)
