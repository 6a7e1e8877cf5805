"""Running statistics set to the data's, the evaluation network kept: `calibrate(model, variables, batches)`.

One pass over N batches in evaluation mode records the input moments of every BatchNorm and BW layer (and
the mean gate of every squeeze-excite); the moments of all N batches pooled (Chan's formulas, float64)
become the layers' running statistics. Each change of statistics is compensated in the parameters after
it, so that the evaluation network computes the same function:

- BatchNorm (mean m → m', var v → v'): γ' = γ √(v' + ε)/√(v + ε), β' = β + γ (m' − m)/√(v + ε). Exact.
- BW before a 1×1 conv (μ, S → μ', S'): that conv becomes K' = S'⁻ᵀ Sᵀ K, b' = b + (μ' − μ) Sᵀ K
  (`fold.absorb_whitening` then `fold.extract_whitening`). Exact.
- BW before squeeze-excite: SE's reduce conv reads the spatial mean of y, an affine image of x's, and is
  compensated exactly; the projection reads y gated per channel and per example, g ⊙ y, so the same kernel
  change is exact only where g is constant within each group, and the shift term uses the mean gate ḡ
  (b' = b + (ḡ ⊙ (μ' − μ) Sᵀ) K). This is the one approximation (`tests/test_pretrained.py` measures it).

Statistics of a layer are those of its input in the network before this calibration: a layer after an
approximately compensated one sees slightly different inputs afterwards; another pass narrows the gap.
"""

from typing import Any, Iterable

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bw_jax.models.convert import flat_variables
from bw_jax.models.efficientnet import BN_EPSILON, EfficientNet, SqueezeExcite
from bw_jax.models.fold import BEFORE_SE, CONSUMER_CONV, absorb_whitening, block_diagonal, extract_whitening
from bw_jax.nn.whitening import BatchWhitening, batch_moments, whitening_matrix

COLLECTION = 'calibration'


def record_inputs(next_fun, args, kwargs, context):
  """A flax method interceptor: sows (count, mean, scatter) of each BN and BW input, and SE's mean gate."""
  module = context.module
  if context.method_name == '__call__' and isinstance(module, (nn.BatchNorm, BatchWhitening)):
    x = args[0]
    samples = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if isinstance(module, BatchWhitening):
      mean, cov = batch_moments(samples, module.group_size)
      scatter = cov * (samples.shape[0] - 1)
    else:
      mean = jnp.mean(samples, axis=0)
      scatter = jnp.sum((samples - mean) ** 2, axis=0)
    module.sow(COLLECTION, 'moments', (jnp.float32(samples.shape[0]), mean, scatter))
  y = next_fun(*args, **kwargs)
  if context.method_name == '__call__' and module.name == 'expand' and isinstance(module.parent, SqueezeExcite):
    module.sow(COLLECTION, 'gate', jnp.mean(nn.sigmoid(y.astype(jnp.float32)), axis=(0, 1, 2)))
  return y


def pool(a: tuple, b: tuple) -> tuple:
  """Chan's parallel combination of (count, mean, scatter) — scatter per channel (C,) or per group (G, g, g)."""
  (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
  n = n_a + n_b
  delta = mean_b - mean_a
  if m2_a.ndim == 1:
    cross = delta ** 2
  else:
    d = delta.reshape(m2_a.shape[0], -1)
    cross = d[:, :, None] * d[:, None, :]
  return n, mean_a + delta * n_b / n, m2_a + m2_b + cross * n_a * n_b / n


def input_statistics(model: EfficientNet, variables: dict, batches: Iterable[Any], num_batches: int
                     ) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
  """({layer path: (count, mean, scatter)}, {SE path: mean gate}) over `num_batches` batches, float64."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=[COLLECTION])[1][COLLECTION])
  moments: dict[str, tuple] = {}
  gates: dict[str, list] = {}
  seen = 0
  with nn.intercept_methods(record_inputs):
    for images in batches:
      if seen == num_batches:
        break
      sown = traverse_util.flatten_dict(jax.device_get(apply(variables, images)), sep='/')
      for key, (value,) in sown.items():
        layer, kind = key.rsplit('/', 1)
        if kind == 'gate':
          gates.setdefault(layer.rsplit('/', 1)[0], []).append(np.asarray(value, np.float64))
          continue
        batch = tuple(np.asarray(v, np.float64) for v in value)
        moments[layer] = pool(moments[layer], batch) if layer in moments else batch
      seen += 1
  if seen < num_batches:
    raise ValueError(f'Calibration asked for {num_batches} batches, but the data ended after {seen}.')
  return moments, {se: np.mean(values, axis=0) for se, values in gates.items()}


def restandardise_conv(flat: dict, conv: str, old: tuple, new: tuple, gate: np.ndarray | None = None) -> None:
  """Rewrites 1×1 `conv` that reads a BW output so that it computes the same after the BW's (mean, S)
  change from `old` to `new`; with `gate`, the mean SE gate between them (see the module docstring)."""
  (mean_old, s_old), (mean_new, s_new) = old, new
  kernel, bias = flat[f'params/{conv}/kernel'], flat[f'params/{conv}/bias']
  on_x, _ = absorb_whitening(kernel, bias, np.zeros_like(mean_old), s_old)
  flat[f'params/{conv}/kernel'], _ = extract_whitening(on_x, bias, mean_new, s_new)
  shift = (mean_new - mean_old) @ block_diagonal(s_old).T
  flat[f'params/{conv}/bias'] = bias + (shift if gate is None else shift * gate) @ kernel[0, 0]


def calibrate(model: EfficientNet, variables: dict, batches: Iterable[Any], num_batches: int) -> dict:
  """`variables` ({'params', 'batch_stats'}) with every BN and BW layer's running statistics those of its
  inputs over `num_batches` of `batches` ((N, H, W, C) model inputs), compensated as the module docstring
  says. BW's S is computed from the pooled covariance by `model.bw`'s method, ε and fallbacks."""
  moments, gates = input_statistics(model, variables, batches, num_batches)
  flat = flat_variables(variables)
  for layer, (count, mean, scatter) in moments.items():
    if f'batch_stats/{layer}/var' in flat:
      var = scatter / count
      scale_ratio = np.sqrt(var + BN_EPSILON) / np.sqrt(flat[f'batch_stats/{layer}/var'] + BN_EPSILON)
      gamma = flat[f'params/{layer}/scale']
      flat[f'params/{layer}/bias'] += gamma * (mean - flat[f'batch_stats/{layer}/mean']) / np.sqrt(
          flat[f'batch_stats/{layer}/var'] + BN_EPSILON)
      flat[f'params/{layer}/scale'] = gamma * scale_ratio
      flat[f'batch_stats/{layer}/mean'], flat[f'batch_stats/{layer}/var'] = mean, var
      continue
    cov = scatter / (count - 1)
    whitening = np.asarray(whitening_matrix(jnp.asarray(cov, jnp.float32), model.bw.method, model.bw.epsilon,
                                            model.bw.newton_iterations), np.float64)
    old = (flat[f'batch_stats/{layer}/mean'], flat[f'batch_stats/{layer}/whitening'])
    parent, name = layer.rsplit('/', 1) if '/' in layer else ('', layer)
    prefix = f'{parent}/' if parent else ''
    if name == BEFORE_SE:
      restandardise_conv(flat, f'{prefix}se/reduce', old, (mean, whitening))
      restandardise_conv(flat, f'{prefix}project_conv', old, (mean, whitening), gates[f'{prefix}se'])
    else:
      restandardise_conv(flat, prefix + CONSUMER_CONV[name], old, (mean, whitening))
    flat[f'batch_stats/{layer}/mean'], flat[f'batch_stats/{layer}/cov'] = mean, cov
    flat[f'batch_stats/{layer}/whitening'] = whitening
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()}, sep='/')
