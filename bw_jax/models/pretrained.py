"""A trained network as one record: the EfficientNet, its variables and the input normalisation it expects,
saved as a folder of two files (`model.json`, `variables.msgpack`) that `config.init_from` reads.

`model.json` holds the model's fields in the form of the config's `model` keys (`config.model`, with `bw`
as a dict) and the normalisation: the network's input is (pixels − mean) / std per channel, in pixel units
(0–255), as `bw_jax.data` normalises images.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from bw_jax.models.efficientnet import EfficientNet
from bw_jax.nn.whitening import BWSettings

MODEL_FILE = 'model.json'
VARIABLES_FILE = 'variables.msgpack'
# The EfficientNet fields a saved model records (the config's `model` keys); dtype and `folded` are not:
# a record is the trainable network, in float32.
MODEL_FIELDS = ('variant', 'num_classes', 'stem_type', 'mbconv_type', 'head_type', 'stem_stride', 'dropout_rate',
                'drop_connect_rate', 'width_multiplier', 'depth_multiplier', 'depthwise_implementation')


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A network with its variables ({'params', 'batch_stats'}) and the normalisation of its input images.

  `model.apply(variables, normalise(pixels), train=False)` gives its logits for (N, H, W, C) pixels.
  """
  model: EfficientNet
  variables: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def normalise(self, pixels: Any) -> jax.Array:
    """(…, C) pixels in 0–255 -> float32 (pixels − mean) / std."""
    pixels = jnp.asarray(pixels, jnp.float32)
    return (pixels - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def logits(self, pixels: Any) -> jax.Array:
    """Evaluation-mode logits (N, classes) of (N, H, W, C) pixels, in one compiled program per model and
    input shape (called op by op, a B0's first call would compile each of its operations alone)."""
    return evaluation_logits(self.model, self.variables, pixels, self.mean, self.std)


@functools.partial(jax.jit, static_argnames=('model', 'mean', 'std'))
def evaluation_logits(model: EfficientNet, variables: dict, pixels: Any, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> jax.Array:
  """`Pretrained(model, variables, mean, std).logits(pixels)`; the variables are an argument, not constants of
  the program."""
  return model.apply(variables, Pretrained(model, variables, mean, std).normalise(pixels), train=False)


def model_fields(model: EfficientNet) -> dict[str, Any]:
  """`model` as the config's `model` keys: {'variant': 'b0', …, 'bw': {'method': …, 'group_size': …}}."""
  fields = {name: getattr(model, name) for name in MODEL_FIELDS}
  fields['bw'] = dataclasses.asdict(model.bw)
  return fields


def model_from_fields(fields: dict[str, Any], **overrides: Any) -> EfficientNet:
  """The EfficientNet of `model_fields` (or of a config's `model` keys)."""
  fields = {**fields, **overrides}
  return EfficientNet(**{**fields, 'bw': BWSettings(**fields['bw'])})


def plain_variables(variables: dict) -> dict:
  """{'params', 'batch_stats'} of `variables` as float32 NumPy arrays (what a record stores)."""
  kept = {name: variables.get(name, {}) for name in ('params', 'batch_stats')}
  return jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), kept)


def save(pretrained: Pretrained, directory: str) -> None:
  """Writes `directory/model.json` and `directory/variables.msgpack` (the folder is created)."""
  os.makedirs(directory, exist_ok=True)
  record = {'model': model_fields(pretrained.model), 'mean': list(pretrained.mean), 'std': list(pretrained.std)}
  with open(os.path.join(directory, MODEL_FILE), 'w') as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(directory, VARIABLES_FILE), 'wb') as f:
    f.write(serialization.msgpack_serialize(plain_variables(pretrained.variables)))


def is_saved(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MODEL_FILE))


def load(directory: str) -> Pretrained:
  """The record `save` wrote in `directory`."""
  with open(os.path.join(directory, MODEL_FILE)) as f:
    record = json.load(f)
  with open(os.path.join(directory, VARIABLES_FILE), 'rb') as f:
    variables = serialization.msgpack_restore(f.read())
  return Pretrained(model_from_fields(record['model']), variables, tuple(record['mean']), tuple(record['std']))


def pixel_normalisation(scale: Sequence[float], offset: Sequence[float]) -> tuple[tuple[float, ...], ...]:
  """(mean, std) in pixel units of the per-channel map pixels · scale + offset."""
  scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
  return tuple(float(v) for v in -offset / scale), tuple(float(v) for v in 1.0 / scale)


def put_layer(variables: dict, layer: str, collections: dict[str, dict[str, Any]]) -> None:
  """Puts one layer's leaves, {'params': {'kernel': …}, 'batch_stats': …}, at the path `layer`
  ('block_0/se/reduce') of `variables` ({'params': {}, 'batch_stats': {}}), as float32 NumPy arrays."""
  for collection, leaves in collections.items():
    node = variables[collection]
    for part in layer.split('/'):
      node = node.setdefault(part, {})
    node.update({name: np.asarray(leaf, np.float32) for name, leaf in leaves.items()})


def check_fit(model: EfficientNet, variables: dict, source: str) -> None:
  """Raises naming the first leaf of `model`'s {'params', 'batch_stats'} that `variables` (imported from
  `source`, e.g. 'The Keras weights') lacks, or holds with another shape, or holds in excess."""
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  flat_expected = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(
      {k: expected[k] for k in ('params', 'batch_stats')})}
  flat_found = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  for key in sorted(set(flat_expected) | set(flat_found)):
    if flat_expected.get(key) != flat_found.get(key):
      raise ValueError(f'{source} do not fit EfficientNet-{model.variant}: {key} has shape '
                       f'{flat_found.get(key)} there, {flat_expected.get(key)} here (weights of another variant?).')
