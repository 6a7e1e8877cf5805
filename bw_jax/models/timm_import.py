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
'mean' and 'std', on 0–1 pixels). By default it is taken from the name's pretrained tag as timm has it:
ImageNet's mean and std, except for the AdvProp weights (`.ap_in1k`), which expect (0.5, 0.5, 0.5) for both.
"""

from collections.abc import Mapping
import os
import re
from typing import Any

import numpy as np

from bw_jax.extras import import_extra
from bw_jax.models.efficientnet import EfficientNet, VARIANTS
from bw_jax.models.pretrained import Pretrained, check_fit, put_layer

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
ADVPROP_NORMALISATION = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN and _STD: the '.ap_in1k' weights'

StateDict = dict[str, np.ndarray]


def default_normalisation(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) on 0–1 pixels of timm's pretrained config for `model_name`'s tag (ImageNet's without one:
  timm's default tag for these models is 'ns_jft_in1k')."""
  tag = model_name.split('.', 1)[1] if '.' in model_name else ''
  if tag.startswith('ap_'):
    return ADVPROP_NORMALISATION, ADVPROP_NORMALISATION
  return IMAGENET_MEAN, IMAGENET_STD


def check_normalisation(mean: Any, std: Any) -> None:
  """Raises unless mean and std are three values on 0–1 pixels (std > 0), as timm's pretrained configs give."""
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if mean.shape != (3,) or std.shape != (3,) or not (np.all((mean >= 0) & (mean <= 1)) and
                                                     np.all((std > 0) & (std <= 1))):
    shown = lambda values: tuple(float(v) for v in values.ravel())
    raise ValueError(f'mean={shown(mean)}, std={shown(std)}: give three values each on 0–1 pixels '
                     f"as timm's pretrained_cfg does (ImageNet's: {IMAGENET_MEAN}, {IMAGENET_STD}), not in 0–255.")


def timm_variant(model_name: str) -> str:
  """'tf_efficientnet_b3' or 'tf_efficientnet_b3.ns_jft_in1k' (a pretrained tag) -> 'b3'; other names refused."""
  architecture = model_name.split('.', 1)[0]
  if match := re.fullmatch(r'tf_efficientnet_(b\d)', architecture):
    if match.group(1) in VARIANTS:
      return match.group(1)
  if match := re.fullmatch(r'tf_efficientnet_(b\d)_(ap|ns)', architecture):
    tag = {'ap': 'ap_in1k', 'ns': 'ns_jft_in1k'}[match.group(2)]
    raise ValueError(f"{architecture} is timm's old name of tf_efficientnet_{match.group(1)}.{tag}: give that "
                     f'name (its normalisation depends on the tag).')
  if re.fullmatch(r'efficientnet_b\d', architecture):
    raise ValueError(f"timm's {architecture} pads each convolution k // 2 on both sides and uses BatchNorm ε 1e-5; "
                     f"bw_jax's EfficientNet is the TensorFlow network (padding 'SAME', ε 1e-3), which timm names "
                     f'tf_{architecture}: import that one.')
  raise ValueError(f'model_name={model_name!r} is not one of timm\'s '
                   f'{", ".join(f"tf_efficientnet_{v}" for v in VARIANTS)}.')


def read_state_dict(source: str | Mapping[str, Any]) -> StateDict:
  """{name: float32 NumPy array} of a state dict (NumPy arrays, or PyTorch tensors on any device) or of a
  .safetensors file (read with the safetensors package, without PyTorch)."""
  if isinstance(source, (str, os.PathLike)):
    source = os.fspath(source)
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
  def get(name: str) -> np.ndarray:
    if prefix + name not in state:
      raise ValueError(f'The state dict has no {prefix + name}, which {ours} needs (a truncated or edited '
                       f'state dict?).')
    return state.pop(prefix + name)
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
    put_layer(variables, ours, layer_leaves(ours, state, prefix))
  if state:
    left = sorted(state)
    hint = (" (a wrapper's prefix: strip 'module.' from the names)" if all(k.startswith('module.') for k in left)
            else " (not one of timm's tf_efficientnet_b0 … b7?)")
    raise ValueError(f'{len(left)} tensors of the state dict are held by no layer of the EfficientNet: '
                     f'{", ".join(left[:5])}{", …" if len(left) > 5 else ""}{hint}.')
  return variables


def from_timm(source: str | os.PathLike | Mapping[str, Any], model_name: str,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Pretrained:
  """timm's `model_name` ('tf_efficientnet_b0' … 'b7', with or without a pretrained tag such as '.ap_in1k') from
  its state dict or its .safetensors file, as a `Pretrained` record: our BatchNorm EfficientNet (stem 1, MBConv
  0, head 1) whose logits equal timm's model in eval mode. `mean` and `std` (on 0–1 pixels, as timm's
  `pretrained_cfg` gives them) default to those of the name's tag (`default_normalisation`)."""
  variant = timm_variant(model_name)
  default_mean, default_std = default_normalisation(model_name)
  mean, std = default_mean if mean is None else mean, default_std if std is None else std
  check_normalisation(mean, std)
  variables = efficientnet_variables(read_state_dict(source))
  if 'classifier' not in variables['params']:
    raise ValueError('The state dict has no classifier (a timm model created with num_classes=0); import one '
                     'with its classifier.')
  model = EfficientNet(variant=variant, num_classes=variables['params']['classifier']['bias'].shape[0])
  check_fit(model, variables, f'The weights of {model_name}')
  return Pretrained(model, variables, tuple(255.0 * np.asarray(mean, np.float64)),
                    tuple(255.0 * np.asarray(std, np.float64)))
