"""timm's TensorFlow EfficientNets (`tf_efficientnet_b0` … `b7`) as a bw_jax `EfficientNet`:
`from_timm(state_dict_or_safetensors_file, 'tf_efficientnet_b0')`.

timm's `tf_efficientnet_b*` are the TensorFlow network ported to PyTorch with its weights — TF 'SAME' padding,
BatchNorm ε 1e-3, squeeze-excite on the block's input channels — so they map one to one onto ours:
`conv_stem`/`bn1` → `stem_conv`/`stem_bn`, `blocks.{stage}.{repeat}` → `block_{i}` in order, `conv_head`/`bn2`
→ `head_conv`/`head_bn`, `classifier`. PyTorch's kernels (out, in, k, k) become flax's (k, k, in, out) — a
depthwise (C, 1, k, k) becomes (k, k, 1, C) — and a Linear's (out, in) becomes (in, out).

timm's own `efficientnet_b*` hold the same tensors but compute another function: they pad every convolution
k // 2 on both sides (TF 'SAME' pads a strided one at the bottom and right only) and use BatchNorm ε 1e-5.
Their names are refused: a state dict does not say which of the two it is, hence the required name.

The input normalisation is not in a state dict: timm's pretrained configs give it (`model.pretrained_cfg`'s
'mean' and 'std', on 0–1 pixels; ImageNet's for every tf_efficientnet_b*, the defaults here).
"""

from collections.abc import Mapping
import os
import re
from typing import Any

import numpy as np

from bw_jax.extras import import_extra
from bw_jax.models.efficientnet import EfficientNet, VARIANTS
from bw_jax.models.pretrained import Pretrained, check_fit

TIMM_TOP_LEVEL = {'conv_stem': 'stem_conv', 'bn1': 'stem_bn', 'conv_head': 'head_conv', 'bn2': 'head_bn',
                  'classifier': 'classifier'}
# timm's two block kinds: InvertedResidual (an expansion 1×1 first) and, where the expansion ratio is 1,
# DepthwiseSeparableConv, whose `conv_pw`/`bn2` are the projection.
TIMM_INVERTED_RESIDUAL = {'conv_pw': 'expand_conv', 'bn1': 'expand_bn', 'conv_dw': 'depthwise_conv',
                          'bn2': 'depthwise_bn', 'se.conv_reduce': 'se/reduce', 'se.conv_expand': 'se/expand',
                          'conv_pwl': 'project_conv', 'bn3': 'project_bn'}
TIMM_DEPTHWISE_SEPARABLE = {'conv_dw': 'depthwise_conv', 'bn1': 'depthwise_bn', 'se.conv_reduce': 'se/reduce',
                            'se.conv_expand': 'se/expand', 'conv_pw': 'project_conv', 'bn2': 'project_bn'}
TIMM_BATCHNORM = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN and _STD, on 0–1 pixels
IMAGENET_STD = (0.229, 0.224, 0.225)

StateDict = dict[str, np.ndarray]


def timm_variant(model_name: str) -> str:
  """'tf_efficientnet_b3' or 'tf_efficientnet_b3.ns_jft_in1k' (a pretrained tag) -> 'b3'; other names refused."""
  architecture = model_name.split('.', 1)[0]
  if match := re.fullmatch(r'tf_efficientnet_(b\d)', architecture):
    if match.group(1) in VARIANTS:
      return match.group(1)
  if re.fullmatch(r'efficientnet_b\d', architecture):
    raise ValueError(f"timm's {architecture} pads each convolution k // 2 on both sides and uses BatchNorm ε 1e-5; "
                     f"bw_jax's EfficientNet is the TensorFlow network (padding 'SAME', ε 1e-3), which timm names "
                     f'tf_{architecture}: import that one.')
  raise ValueError(f'model_name={model_name!r} is not one of timm\'s '
                   f'{", ".join(f"tf_efficientnet_{v}" for v in VARIANTS)}.')


def read_state_dict(source: str | Mapping[str, Any]) -> StateDict:
  """{name: float32 NumPy array} of a state dict (NumPy arrays, or PyTorch tensors on any device) or of a
  .safetensors file (read with the safetensors package, without PyTorch)."""
  if isinstance(source, str):
    if not source.endswith('.safetensors'):
      raise ValueError(f'{source}: not a .safetensors file. timm publishes its weights as model.safetensors; '
                       f'for a PyTorch .pth/.bin, load it with torch.load and pass the state dict itself.')
    if not os.path.isfile(source):
      raise ValueError(f'{source} does not exist.')
    safetensors_numpy = import_extra('safetensors.numpy', __name__, 'train')
    source = safetensors_numpy.load_file(source)
  as_numpy = lambda v: np.asarray(v.detach().cpu() if hasattr(v, 'detach') else v)
  return {k: as_numpy(v).astype(np.float32) for k, v in source.items() if not k.endswith('num_batches_tracked')}


def timm_blocks(state: StateDict) -> list[str]:
  """timm's block prefixes ('blocks.0.0.', 'blocks.1.0.', 'blocks.1.1.', …) in network order."""
  found = {(int(m.group(1)), int(m.group(2))) for k in state if (m := re.match(r'blocks\.(\d+)\.(\d+)\.', k))}
  return [f'blocks.{stage}.{repeat}.' for stage, repeat in sorted(found)]


def layer_leaves(ours: str, state: StateDict, prefix: str) -> dict[str, dict[str, np.ndarray]]:
  """timm's tensors `prefix`weight, …bias, …running_mean, …running_var as {'params': …, 'batch_stats': …} of
  our layer `ours`, in flax's layouts."""
  get = lambda name: state.pop(prefix + name)
  if ours.endswith('_bn'):
    leaves = {theirs: get(theirs) for theirs in TIMM_BATCHNORM}
    return {'params': {'scale': leaves['weight'], 'bias': leaves['bias']},
            'batch_stats': {'mean': leaves['running_mean'], 'var': leaves['running_var']}}
  weight = get('weight')
  kernel = weight.T if weight.ndim == 2 else weight.transpose(2, 3, 1, 0)  # Linear, or a convolution
  params = {'kernel': kernel}
  if prefix + 'bias' in state:
    params['bias'] = get('bias')
  return {'params': params}


def efficientnet_variables(state: StateDict) -> dict:
  """timm's state dict as EfficientNet {'params', 'batch_stats'}; raises naming a tensor it did not use."""
  state = dict(state)
  names = {ours: f'{theirs}.' for theirs, ours in TIMM_TOP_LEVEL.items()}
  for index, prefix in enumerate(timm_blocks(state)):
    layers = TIMM_INVERTED_RESIDUAL if f'{prefix}conv_pwl.weight' in state else TIMM_DEPTHWISE_SEPARABLE
    names.update({f'block_{index}/{ours}': f'{prefix}{theirs}.' for theirs, ours in layers.items()})
  variables = {'params': {}, 'batch_stats': {}}
  for ours, prefix in names.items():
    if f'{prefix}weight' not in state:
      continue  # Reported by check_fit, which names the layer the model expects.
    for collection, leaves in layer_leaves(ours, state, prefix).items():
      node = variables[collection]
      for part in ours.split('/'):
        node = node.setdefault(part, {})
      node.update(leaves)
  if state:
    raise ValueError(f'Tensors of the state dict that no layer of the EfficientNet holds: {", ".join(sorted(state))}'
                     f' (not one of timm\'s tf_efficientnet_b0 … b7?).')
  return variables


def from_timm(source: str | Mapping[str, Any], model_name: str, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> Pretrained:
  """timm's `model_name` ('tf_efficientnet_b0' … 'b7', a pretrained tag allowed) from its state dict or its
  .safetensors file, as a `Pretrained` record: our BatchNorm EfficientNet (stem 1, MBConv 0, head 1) whose
  logits equal timm's model in eval mode for images normalised with `mean` and `std` (on 0–1 pixels, as
  timm's `pretrained_cfg` gives them)."""
  variant = timm_variant(model_name)
  variables = efficientnet_variables(read_state_dict(source))
  if 'classifier' not in variables['params']:
    raise ValueError('The state dict has no classifier (a timm model created with num_classes=0); import one '
                     'with its classifier.')
  model = EfficientNet(variant=variant, num_classes=variables['params']['classifier']['bias'].shape[0])
  check_fit(model, variables, f'The weights of {model_name}')
  return Pretrained(model, variables, tuple(255.0 * np.asarray(mean, np.float64)),
                    tuple(255.0 * np.asarray(std, np.float64)))
