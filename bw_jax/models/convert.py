"""A BatchNorm EfficientNet as any BW variant: `convert(source_model, source_variables, target_model, fresh)`.

Every layer present in both networks with the same shape keeps its trained weights. Where the target puts
BW in place of BatchNorm, the new BW layer starts as the identity (mean 0, S = I, its initial statistics) and
the BatchNorm it replaces, an affine map a ⊙ h + c in evaluation (a = γ/√(var + ε), c = β − a·mean), moves
into the 1×1 conv that the design puts next to it (docs/design.md §3.5):

- expansion, projection, head (conv K → BN becomes BW → conv K·diag(a) + c): exact.
- stem type 2 (depthwise 3×3 → BW → 1×1 conv) for the stem conv 3×3 → BN: the 3×3×C_in×C₀ kernel
  becomes a depthwise kernel d_c and a 1×1 kernel p_c per input channel with d_c p_cᵀ the best rank-one
  approximation (SVD) of its slice for channel c; exact only where the slices have rank one (the report
  gives the fraction of the kernel's energy kept).
- MBConv type 1 (BN → depthwise) for depthwise → BN: the depthwise kernel k is kept and the BN before it
  gets scale a and shift c / Σk, exact away from the borders, where the zero padding meets the shift (a
  channel whose Σk is ~0 loses its shift).
- MBConv type 3 (depthwise alone): a scales the depthwise kernel; the shift c has no place and is dropped.

The evaluation network is then the BatchNorm one (up to the approximations named), while training mode,
which whitens with batch statistics, is not: `calibrate.calibrate` sets the statistics to the data's and
adjusts the layers after them so that evaluation stays (nearly) the same function.
"""

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bw_jax.models.efficientnet import BN_EPSILON, EfficientNet, block_specs

Flat = dict[str, np.ndarray]


@dataclasses.dataclass
class Conversion:
  """The converted variables ({'params', 'batch_stats'}) and what happened to each layer."""
  variables: dict
  kept: list[str]  # layers copied unchanged
  converted: list[str]  # layers rewritten from a BatchNorm placement
  fresh: list[str]  # layers at their initial values (new BW layers; a classifier of another size)
  notes: list[str]  # approximations, one line each

  def summary(self) -> str:
    """Counts, the fresh layers that are not BW (a new classifier), and the notes: a few lines."""
    others = [layer for layer in self.fresh if not layer.endswith('_bw')]
    line = (f'{len(self.kept)} layers kept, {len(self.converted)} converted from BatchNorm, '
            f'{len(self.fresh) - len(others)} new BW layers (identity until calibrated)')
    if others:
      line += f', {len(others)} others at their initial values ({", ".join(others)})'
    return '\n'.join([line] + self.notes)


def flat_variables(variables: dict) -> Flat:
  kept = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  return {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(kept, sep='/').items()}


def bn_affine(flat: Flat, layer: str) -> tuple[np.ndarray, np.ndarray]:
  """BatchNorm `layer` in evaluation as a ⊙ h + c: a = γ/√(var + ε), c = β − a·mean."""
  a = flat[f'params/{layer}/scale'] / np.sqrt(flat[f'batch_stats/{layer}/var'] + BN_EPSILON)
  return a, flat[f'params/{layer}/bias'] - a * flat[f'batch_stats/{layer}/mean']


def conv_with_bn(source: Flat, out: Flat, conv: str, bn: str) -> None:
  """Target `conv` (with bias) = source `conv` followed by source BatchNorm `bn`."""
  a, c = bn_affine(source, bn)
  out[f'params/{conv}/kernel'] = source[f'params/{conv}/kernel'] * a
  out[f'params/{conv}/bias'] = c


def rank_one_stem(source: Flat, out: Flat) -> float:
  """Stem conv 3×3 → BN as depthwise 3×3 → 1×1 conv (+ bias); returns the fraction of energy kept."""
  a, c = bn_affine(source, 'stem_bn')
  kernel = source['params/stem_conv/kernel'] * a  # (k, k, C_in, C₀)
  k, _, channels, features = kernel.shape
  depthwise, pointwise, kept = np.zeros((k, k, 1, channels)), np.zeros((1, 1, channels, features)), 0.0
  for channel in range(channels):
    u, s, vt = np.linalg.svd(kernel[:, :, channel, :].reshape(k * k, features), full_matrices=False)
    depthwise[:, :, 0, channel] = (u[:, 0] * np.sqrt(s[0])).reshape(k, k)
    pointwise[0, 0, channel] = vt[0] * np.sqrt(s[0])
    kept += s[0] ** 2
  out['params/stem_depthwise/kernel'], out['params/stem_conv/kernel'] = depthwise, pointwise
  out['params/stem_conv/bias'] = c
  return kept / float(np.sum(kernel ** 2))


def depthwise_after_bn(source: Flat, out: Flat, block: str) -> int:
  """Depthwise → BN as BN → depthwise (type 1); returns the number of channels that lost their shift."""
  a, c = bn_affine(source, f'{block}/depthwise_bn')
  kernel_sum = source[f'params/{block}/depthwise_conv/kernel'].sum(axis=(0, 1, 2))
  usable = np.abs(kernel_sum) > 1e-3 * np.abs(source[f'params/{block}/depthwise_conv/kernel']).sum(axis=(0, 1, 2))
  shift = np.where(usable, c / np.where(usable, kernel_sum, 1.0), 0.0)
  # The target BN's own statistics (its initial ones) are divided out: BN(h) = a ⊙ h + shift.
  mean, var = out[f'batch_stats/{block}/depthwise_bn/mean'], out[f'batch_stats/{block}/depthwise_bn/var']
  out[f'params/{block}/depthwise_bn/scale'] = a * np.sqrt(var + BN_EPSILON)
  out[f'params/{block}/depthwise_bn/bias'] = shift + a * mean
  out[f'params/{block}/depthwise_conv/kernel'] = source[f'params/{block}/depthwise_conv/kernel']
  return int(np.sum(~usable))


def convert_block(source: Flat, out: Flat, block: str, mbconv_type: int, expands: bool) -> tuple[list[str], list[str]]:
  """MBConv type 0 -> `mbconv_type`; returns (converted layers, notes)."""
  converted, notes = [f'{block}/project_conv'], []
  conv_with_bn(source, out, f'{block}/project_conv', f'{block}/project_bn')
  if expands:
    conv_with_bn(source, out, f'{block}/expand_conv', f'{block}/expand_bn')
    converted.append(f'{block}/expand_conv')
  if mbconv_type == 1:
    lost = depthwise_after_bn(source, out, block)
    converted += [f'{block}/depthwise_conv', f'{block}/depthwise_bn']
    if lost:
      notes.append(f'{block}: {lost} channels of the BN moved before the depthwise conv lost their shift (Σk ≈ 0).')
  elif mbconv_type == 3:
    a, c = bn_affine(source, f'{block}/depthwise_bn')
    out[f'params/{block}/depthwise_conv/kernel'] = source[f'params/{block}/depthwise_conv/kernel'] * a
    converted.append(f'{block}/depthwise_conv')
    notes.append(f'{block}: type 3 has no BN after the depthwise conv: its shift (max |c| {np.abs(c).max():.3g}) '
                 'is dropped.')
  return converted, notes


def check_convertible(source: EfficientNet, target: EfficientNet) -> None:
  if source.scaling[:2] != target.scaling[:2]:
    raise ValueError(f'Cannot convert EfficientNet width/depth {source.scaling[:2]} into {target.scaling[:2]}: '
                     'source and target must have the same variant and multipliers.')
  for part in ('stem_type', 'mbconv_type', 'head_type'):
    was, wanted = getattr(source, part), getattr(target, part)
    bn = {'stem_type': 1, 'mbconv_type': 0, 'head_type': 1}[part]
    if was != wanted and was != bn:
      raise ValueError(f'{part}={was} (BW) cannot become {part}={wanted}: conversion starts from BatchNorm '
                       f'placements ({part}={bn}) or keeps the type.')


def convert(source_model: EfficientNet, source_variables: dict, target_model: EfficientNet, fresh: dict
            ) -> Conversion:
  """`target_model`'s variables from a trained `source_model` (see the module docstring); `fresh` are the
  target's initial variables (`target_model.init`), which new layers keep."""
  check_convertible(source_model, target_model)
  source, out = flat_variables(source_variables), flat_variables(fresh)
  converted, notes = [], []
  if (source_model.stem_type, target_model.stem_type) == (1, 2):
    kept = rank_one_stem(source, out)
    converted += ['stem_depthwise', 'stem_conv']
    notes.append(f'stem: depthwise × 1×1 keeps {100 * kept:.1f}% of the 3×3 conv\'s energy (rank one per channel).')
  if (source_model.head_type, target_model.head_type) == (1, 2):
    conv_with_bn(source, out, 'head_conv', 'head_bn')
    converted.append('head_conv')
  if source_model.mbconv_type == 0 and target_model.mbconv_type != 0:
    width, depth, _ = target_model.scaling
    for index, spec in enumerate(block_specs(width, depth, 0.0)):
      layers, block_notes = convert_block(source, out, f'block_{index}', target_model.mbconv_type,
                                          spec.expand_ratio != 1)
      converted += layers
      notes += block_notes
  kept, fresh_layers = [], []
  for layer, keys in leaves_by_layer(out).items():
    if layer in converted:
      continue
    if all(key in source and source[key].shape == out[key].shape for key in keys):
      out.update({key: source[key] for key in keys})
      kept.append(layer)
    else:
      fresh_layers.append(layer)
  variables = traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in out.items()}, sep='/')
  return Conversion(variables, kept, converted, fresh_layers, notes)


def leaves_by_layer(flat: Flat) -> dict[str, list[str]]:
  """{layer path: its keys in `flat`} ('params/block_0/se/reduce/kernel' belongs to 'block_0/se/reduce')."""
  layers: dict[str, list[str]] = {}
  for key in flat:
    layers.setdefault(key.split('/', 1)[1].rsplit('/', 1)[0], []).append(key)
  return layers


def initial_variables(model: EfficientNet, image_shape: tuple[int, int, int], seed: int = 0) -> dict:
  """`model`'s initial {'params', 'batch_stats'} for (H, W, C) images."""
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)), train=False))
  variables = init(jax.random.key(seed))
  return {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
