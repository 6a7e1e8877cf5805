"""BW folded away for inference: `fold_for_inference(model, variables) -> (folded model, folded variables)`.

In evaluation a BW layer is the affine map y = S (x − μ) of its running statistics (its γ and β, when it has
them, belong to the conv after it: docs/design.md §3.3). In the design's placements the stem's, the
expansion's and the head's BW feed a 1×1 convolution, per pixel z = y K + b (flax's kernel K (1, 1, C, O)
read as a C × O matrix, samples as rows), so

    z = (x − μ) Sᵀ K + b = x K' + b'   with   K' = Sᵀ K,   b' = b − μ Sᵀ K,

and the layer disappears (`absorb_whitening`). The BW before squeeze-excite cannot be folded: SE multiplies
each channel of y by a per-example gate before the projection reads it, and S mixes channels, so S cannot
move past the gate into the projection; through swish it cannot move back either. It stays as a plain
grouped 1×1 map (`efficientnet.FixedWhitening`: S and −S μ as parameters, XLA's products, no custom call),
which costs C·g multiply-adds per pixel against the projection's C·C_out.

The inverse, `extract_whitening`, writes a 1×1 conv on x as one on y = S (x − μ): the conversion from
BatchNorm and the calibration of running statistics (`convert.py`) change a layer's statistics with it while
keeping the function the network computes.
"""

from typing import Any

from flax import traverse_util
import numpy as np

from bw_jax.models.efficientnet import EfficientNet

# Where each BW placement's output goes: the 1×1 conv beside it (same parent module).
CONSUMER_CONV = {'stem_bw': 'stem_conv', 'expand_bw': 'expand_conv', 'head_bw': 'head_conv'}
# The BW before squeeze-excite; SE's reduce conv and, through the gate, the projection read it.
BEFORE_SE = 'depthwise_bw'
SE_READERS = ('se/reduce', 'project_conv')

Path = tuple[str, ...]
Flat = dict[Path, Any]


def block_diagonal(matrices: np.ndarray) -> np.ndarray:
  """(G, g, g) -> (G·g, G·g) float64 with the matrices on the diagonal (a BW layer's S as one matrix)."""
  groups, g, _ = matrices.shape
  full = np.zeros((groups * g, groups * g))
  for k, block in enumerate(np.asarray(matrices, np.float64)):
    full[k * g:(k + 1) * g, k * g:(k + 1) * g] = block
  return full


def absorb_whitening(kernel: np.ndarray, bias: np.ndarray | None, mean: np.ndarray, whitening: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The 1×1 conv (K', b') on x equal to conv (K, b) on y = S (x − μ): K' = Sᵀ K, b' = b − μ Sᵀ K.

  kernel (1, 1, C, O), bias (O,) or None, mean (C,), whitening (G, g, g) -> float64 (1, 1, C, O), (O,).
  """
  folded = block_diagonal(whitening).T @ np.asarray(kernel, np.float64)[0, 0]
  bias = np.zeros(folded.shape[1]) if bias is None else np.asarray(bias, np.float64)
  return folded[None, None], bias - np.asarray(mean, np.float64) @ folded


def extract_whitening(kernel: np.ndarray, bias: np.ndarray, mean: np.ndarray, whitening: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of `absorb_whitening`: conv (K, b) on x as a conv on y = S (x − μ), K' = S⁻ᵀ K, b' = b + μ K.
  S is invertible (a whitening matrix, or a diagonal fallback with positive entries)."""
  kernel = np.asarray(kernel, np.float64)[0, 0]
  unfolded = np.linalg.solve(block_diagonal(whitening).T, kernel)
  return unfolded[None, None], np.asarray(bias, np.float64) + np.asarray(mean, np.float64) @ kernel


def fixed_whitening_params(mean: np.ndarray, whitening: np.ndarray) -> dict[str, np.ndarray]:
  """`FixedWhitening`'s parameters for running statistics (μ, S): kernel S (G, g, g), bias −S μ (C,)."""
  bias = -block_diagonal(whitening) @ np.asarray(mean, np.float64)
  return {'kernel': np.asarray(whitening, np.float32), 'bias': bias.astype(np.float32)}


def bw_layers(flat: Flat) -> list[Path]:
  """Paths (within the collections) of the BW layers of flattened variables: those with running S."""
  return [path[1:-1] for path in flat if path[0] == 'batch_stats' and path[-1] == 'whitening']


def fold_for_inference(model: EfficientNet, variables: dict) -> tuple[EfficientNet, dict]:
  """The folded network and its variables: logits equal `model.apply(variables, x, train=False)`.

  `variables`: {'params', 'batch_stats'[, 'bw_health']} of `model`. Returns `model` with `folded=True` and
  {'params', 'batch_stats'} where every BW layer before a 1×1 conv is folded into it and each BW before
  squeeze-excite is a `FixedWhitening`; BatchNorm layers are kept as they are. Evaluation only.
  """
  if model.folded:
    raise ValueError('This EfficientNet is folded already (folded=True); pass the unfolded model and variables.')
  flat = traverse_util.flatten_dict({k: v for k, v in variables.items() if k in ('params', 'batch_stats')})
  flat = {path: np.asarray(value) for path, value in flat.items()}
  for layer in bw_layers(flat):
    mean, whitening = flat[('batch_stats', *layer, 'mean')], flat[('batch_stats', *layer, 'whitening')]
    for name in ('mean', 'cov', 'whitening'):
      del flat[('batch_stats', *layer, name)]
    parent, name = layer[:-1], layer[-1]
    if name == BEFORE_SE:
      for key, value in fixed_whitening_params(mean, whitening).items():
        flat[('params', *layer, key)] = value
      continue
    conv = ('params', *parent, CONSUMER_CONV[name])
    kernel, bias = absorb_whitening(flat[(*conv, 'kernel')], flat.get((*conv, 'bias')), mean, whitening)
    flat[(*conv, 'kernel')], flat[(*conv, 'bias')] = kernel.astype(np.float32), bias.astype(np.float32)
  folded = traverse_util.unflatten_dict(flat)
  folded.setdefault('batch_stats', {})
  return model.clone(folded=True), folded
