"""Where a B0 training step's normalisation time goes: every BatchNorm and BatchWhitening layer of the MBConv
blocks, timed alone at its own shape, for MBConv type 0 (BN: expand_bn, depthwise_bn, project_bn) and type 2
(BW: expand_bw on the block's input, depthwise_bn, depthwise_bw after the depthwise swish).

The layers are built as `bw_jax.models.efficientnet` builds them (same BN momentum and ε, BW without γ and β, the
group size fitted per layer) at the shapes `block_specs` gives for B0 at SIZE×SIZE (stem stride 2), batch
BATCH. Each distinct (layer, shape) is one jit(value_and_grad) of sum(y²) w.r.t. the input, timed round-robin
with the others; the table multiplies by how often the shape occurs. The totals say how much of
`train_step.py`'s BN-vs-BW gap the normalisation layers themselves explain. Run from the repository root:

  .venv/bin/python benchmarks/b0_norm_layers.py --markdown
"""

import argparse
import collections

import flax.linen as nn
import jax
import jax.numpy as jnp

from bw_jax.models.efficientnet import BN_EPSILON, BN_MOMENTUM, block_specs
from bw_jax.nn.whitening import BWSettings
from common import environment, format_table, progress, time_round_robin  # benchmarks/common.py


def norm_layers(size: int, mbconv_type: int) -> list[tuple[str, int, int]]:
  """(layer name, spatial side, channels) of every normalisation layer in B0's MBConv blocks (width and depth
  1.0, stem stride 2), for MBConv type 0 (BN) or 2 (BW)."""
  side, layers = size // 2, []
  for spec in block_specs(1.0, 1.0, 0.0):
    expanded = spec.in_channels * spec.expand_ratio
    out_side = -(-side // spec.stride)  # 'SAME' padding
    if spec.expand_ratio != 1:
      layers.append(('expand_bw', side, spec.in_channels) if mbconv_type == 2 else ('expand_bn', side, expanded))
    layers.append(('depthwise_bn', out_side, expanded))
    layers.append(('depthwise_bw', out_side, expanded) if mbconv_type == 2
                  else ('project_bn', out_side, spec.out_channels))
    side = out_side
  return layers


def make_layer(name: str, channels: int, group_size: int) -> nn.Module:
  if name.endswith('_bn'):
    return nn.BatchNorm(use_running_average=False, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
  return BWSettings(group_size=group_size).layer(channels, use_running_average=False, use_scale=False,
                                                 use_bias=False)


def timed_call(layer: nn.Module, x: jax.Array):
  """A compiled fwd+bwd of the layer in training mode, as a thunk that blocks on its result."""
  variables = layer.init(jax.random.key(1), x)
  mutable = [k for k in variables if k != 'params']
  step = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(layer.apply(variables, x, mutable=mutable)[0] ** 2)))
  jax.block_until_ready(step(x))
  return lambda: jax.block_until_ready(step(x))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--group-size', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--markdown', action='store_true')
  args = parser.parse_args(argv)
  prefix = '- ' if args.markdown else ''
  print('\n'.join(prefix + line for line in environment()))
  print(f'{prefix}B0 {args.size}×{args.size} MBConv blocks, batch {args.batch}, BW cholesky g={args.group_size}, '
        f'fwd+bwd per layer, median of {args.repeats} round-robin calls\n', flush=True)

  counts = {t: collections.Counter(norm_layers(args.size, t)) for t in (0, 2)}
  distinct = sorted(set(counts[0]) | set(counts[2]), key=lambda k: (-k[1], k[2], k[0]))
  calls = []
  for name, side, channels in distinct:
    progress(f'compiling {name} at {args.batch}×{side}×{side}×{channels}')
    x = jax.random.normal(jax.random.key(0), (args.batch, side, side, channels))
    calls.append(timed_call(make_layer(name, channels, args.group_size), x))
  progress(f'timing {len(calls)} layers × {args.repeats}')
  milliseconds = dict(zip(distinct, time_round_robin(calls, args.repeats)))

  rows = [('layer', 'shape (N×H×W×C)', 'ms', 'in type 0', 'in type 2')]
  for key in distinct:
    name, side, channels = key
    rows.append((name, f'{args.batch}×{side}×{side}×{channels}', f'{milliseconds[key]:.2f}',
                 str(counts[0][key] or ''), str(counts[2][key] or '')))
  totals = {t: sum(milliseconds[k] * n for k, n in counts[t].items()) for t in (0, 2)}
  rows.append(('**total per step**', '', '', f'{totals[0]:.1f} ms', f'{totals[2]:.1f} ms'))
  print(format_table(rows, args.markdown, text_columns=2))
  print(f'\nMBConv normalisation, type 2 − type 0: {totals[2] - totals[0]:+.1f} ms per step '
        f'({len(norm_layers(args.size, 0))} BN layers vs {len(norm_layers(args.size, 2))} BN + BW layers).')


if __name__ == '__main__':
  main()
