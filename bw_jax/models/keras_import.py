"""Keras applications EfficientNetB0–B7 as a bw_jax `EfficientNet`: `from_keras(model_or_h5_file)`.

Keras's network is the reference implementation layer for layer (TF 'SAME' padding equals its
`correct_pad` zero padding before strided convolutions, BatchNorm ε 1e-3, squeeze-excite on the block's input
channels), so its weights map one to one: `stem_conv`/`stem_bn`, `block{s}{r}_` (stage s, repeat r as a
letter) → `block_{i}` in order, `top_conv`/`top_bn` → `head_conv`/`head_bn`, `predictions` → `classifier`;
depthwise kernels (k, k, C, 1) become flax's (k, k, 1, C). Keras's input layers (Rescaling 1/255,
Normalization, and for `weights='imagenet'` a second Rescaling) become the record's pixel mean and std.

A file is read with h5py (Keras itself is only needed for a model object): the legacy HDF5 format of the
published `efficientnetb0.h5` … files (Keras 2) and Keras 3's `.weights.h5`. A file holds no Rescaling
layers: the 1/255 of every Keras application is assumed, and a Normalization whose variance is the ImageNet
standard deviation (0.229, 0.224, 0.225) — the published files store it there — is read as Keras reads it
with `weights='imagenet'`, as the standard deviation itself.
"""

import re
from typing import Any

import numpy as np

from bw_jax.extras import import_extra
from bw_jax.models.efficientnet import EfficientNet, HEAD_CHANNELS, STAGES, VARIANTS, round_filters, round_repeats
from bw_jax.models.pretrained import Pretrained, check_fit, pixel_normalisation, put_layer

KERAS_TOP_LEVEL = {'stem_conv': 'stem_conv', 'stem_bn': 'stem_bn', 'head_conv': 'top_conv', 'head_bn': 'top_bn',
                   'classifier': 'predictions'}
KERAS_BLOCK_LAYERS = {'expand_conv': 'expand_conv', 'expand_bn': 'expand_bn', 'depthwise_conv': 'dwconv',
                      'depthwise_bn': 'bn', 'se/reduce': 'se_reduce', 'se/expand': 'se_expand',
                      'project_conv': 'project_conv', 'project_bn': 'project_bn'}
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
KERAS_EPSILON = 1e-7  # keras.config.epsilon(): Normalization divides by max(√variance, it).

LayerWeights = dict[str, list[np.ndarray]]


def keras_layer_weights(source: Any) -> LayerWeights:
  """{Keras layer name: its weights in Keras's order} of a keras.Model or an .h5 / .weights.h5 file."""
  if isinstance(source, str):
    return h5_layer_weights(source)
  return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in source.layers if layer.weights}


def h5_layer_weights(path: str) -> LayerWeights:
  h5py = import_extra('h5py', __name__, 'train')  # Only a file import needs it.

  text = lambda value: value.decode() if isinstance(value, bytes) else str(value)
  with h5py.File(path, 'r') as f:
    if 'layers' in f:  # Keras 3: layers/<key>/vars/<i>, the layer's name an attribute of `vars`.
      found = {}
      for group in f['layers'].values():
        if 'vars' in group and len(group['vars']):
          variables = group['vars']
          found[text(variables.attrs['name'])] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
      return found
    root = f['model_weights'] if 'model_weights' in f else f  # a whole saved model, or its weights
    if 'layer_names' not in root.attrs:
      raise ValueError(f'{path} is neither a Keras 3 .weights.h5 nor a legacy Keras HDF5 weights file.')
    return {text(name): [np.asarray(root[text(name)][text(w)]) for w in root[text(name)].attrs['weight_names']]
            for name in root.attrs['layer_names'] if len(root[text(name)].attrs['weight_names'])}


def block_prefixes(weights: LayerWeights) -> list[str]:
  """Keras's block prefixes ('block1a_', 'block2a_', 'block2b_', …) in network order."""
  found = {m.group(1) for name in weights if (m := re.match(r'(block(\d+)([a-z]+)_)', name))}
  return sorted(found, key=lambda p: (int(re.match(r'block(\d+)', p).group(1)), len(p), p))


def keras_variant(weights: LayerWeights) -> str:
  """'b0' … 'b7', from the block count and the head's width."""
  if 'top_conv' not in weights:
    raise ValueError('No top_conv layer: not a Keras applications EfficientNet (keras.applications.EfficientNetB0 '
                     '… B7).')
  blocks, head = len(block_prefixes(weights)), weights['top_conv'][0].shape[-1]
  for name, v in VARIANTS.items():
    count = sum(round_repeats(stage.repeats, v.depth) for stage in STAGES)
    if count == blocks and round_filters(HEAD_CHANNELS, v.width) == head:
      return name
  raise ValueError(f'A Keras EfficientNet with {blocks} blocks and a {head}-channel head is none of B0–B7 '
                   f'({", ".join(VARIANTS)}).')


def layer_variables(name: str, arrays: list[np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """One Keras layer's weights as {'params': …, 'batch_stats': …} of the bw_jax layer `name`."""
  if name.endswith('_bn'):
    gamma, beta, mean, var = arrays
    return {'params': {'scale': gamma, 'bias': beta}, 'batch_stats': {'mean': mean, 'var': var}}
  if name.endswith('depthwise_conv'):
    return {'params': {'kernel': np.swapaxes(arrays[0], 2, 3)}}  # (k, k, C, 1) -> (k, k, 1, C)
  return {'params': dict(zip(('kernel', 'bias'), arrays))}


def efficientnet_variables(weights: LayerWeights) -> dict:
  """Keras's layer weights as EfficientNet {'params', 'batch_stats'} (float32)."""
  names = dict(KERAS_TOP_LEVEL)
  for index, prefix in enumerate(block_prefixes(weights)):
    names.update({f'block_{index}/{ours}': prefix + theirs for ours, theirs in KERAS_BLOCK_LAYERS.items()})
  variables = {'params': {}, 'batch_stats': {}}
  for ours, theirs in names.items():
    if theirs not in weights:
      continue  # a block without expansion; checked against the model's shapes afterwards
    put_layer(variables, ours, layer_variables(ours, weights[theirs]))
  return variables


def input_normalisation(source: Any, weights: LayerWeights) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in pixel units equal to the model's input layers (see the module docstring for files)."""
  scale, offset = np.ones(3), np.zeros(3)
  if isinstance(source, str):
    scale = scale / 255.0
    stats = [w for name, w in weights.items() if name.startswith('normalization')]
    if stats:
      mean, variance = stats[0][0], stats[0][1]
      std = variance if np.allclose(variance, IMAGENET_STDDEV_RGB, atol=1e-6) else np.sqrt(variance)
      scale, offset = scale / np.maximum(std, KERAS_EPSILON), (offset - mean) / np.maximum(std, KERAS_EPSILON)
    return pixel_normalisation(scale, offset)
  for layer in source.layers:
    kind = type(layer).__name__
    if kind in ('ZeroPadding2D', 'Conv2D'):
      break
    if kind == 'Rescaling':
      scale, offset = scale * np.asarray(layer.scale), offset * np.asarray(layer.scale) + np.asarray(layer.offset)
    elif kind == 'Normalization':
      # The values its call uses (set by `finalize_state` from its weights, or given to its constructor).
      mean, variance = (np.asarray(w, np.float64).reshape(-1) for w in (layer.mean, layer.variance))
      std = np.maximum(np.sqrt(variance), KERAS_EPSILON)
      scale, offset = scale / std, (offset - mean) / std
  return pixel_normalisation(scale, offset)


def from_keras(source: Any, variant: str | None = None) -> Pretrained:
  """A Keras applications EfficientNetB0–B7 (a `keras.Model`, or the path of its .h5 / .weights.h5 weights)
  as a `Pretrained` record: our BatchNorm EfficientNet (stem 1, MBConv 0, head 1) with Keras's weights and
  input normalisation; its logits equal the Keras model's before the softmax (build Keras's model with
  `classifier_activation=None` to compare). `variant` ('b0' … 'b7'), if given, must match the weights.
  """
  weights = keras_layer_weights(source)
  found = keras_variant(weights)
  if variant is not None and variant != found:
    raise ValueError(f'variant={variant!r}, but the Keras weights are EfficientNet-{found.upper()}.')
  if 'predictions' not in weights:
    raise ValueError('The Keras model has no classifier (include_top=False); import a model built with '
                     'include_top=True.')
  model = EfficientNet(variant=found, num_classes=weights['predictions'][1].shape[0])
  variables = efficientnet_variables(weights)
  check_fit(model, variables, 'The Keras weights')
  mean, std = input_normalisation(source, weights)
  return Pretrained(model, variables, mean, std)
