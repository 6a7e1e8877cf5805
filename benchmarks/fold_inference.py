"""Evaluation images/s of EfficientNet with BW folded for inference, unfolded, and with BatchNorm everywhere.

Three networks of the same variant and width at the same image size: the BatchNorm network (stem 1, MBConv 0,
head 1); a BW network (by default the main job's placements, MBConv type 2 and head type 2) evaluated as it
is, its BW layers applying the running statistics; and the same network after `fold_for_inference`, where
the BW before each 1×1 conv is folded into it and the BW before squeeze-excite is a fixed grouped 1×1 map.
Each is one jitted evaluation (`train=False`) of a batch, timed round-robin with the others. Run from the
repository root:

  .venv/bin/python benchmarks/fold_inference.py --markdown
  .venv/bin/python benchmarks/fold_inference.py --variant=b0 --size=224 --batch=32 --mbconv-type=2 --head-type=2
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bw_jax.models.efficientnet import EfficientNet
from bw_jax.models.fold import fold_for_inference
from bw_jax.nn.whitening import BWSettings
from common import environment, format_table, progress, time_round_robin  # benchmarks/common.py


def evaluation(model: EfficientNet, variables: dict, images: jax.Array):
  """A compiled evaluation of `images`, as a thunk that blocks on its result."""
  run = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
  return lambda: run(variables, images).block_until_ready()


def networks(args: argparse.Namespace, images: jax.Array) -> list[tuple[str, EfficientNet, dict]]:
  """(label, model, variables) of the BN, unfolded BW and folded BW networks."""
  common = dict(variant=args.variant, num_classes=1000, width_multiplier=args.width,
                depth_multiplier=args.depth, stem_stride=args.stem_stride)
  bn = EfficientNet(**common)
  bw = EfficientNet(**common, stem_type=args.stem_type, mbconv_type=args.mbconv_type, head_type=args.head_type,
                    bw=BWSettings(group_size=args.group_size))
  init = lambda model: jax.jit(lambda key: model.init(key, images[:1], train=False))(jax.random.key(0))
  bw_variables = init(bw)
  folded, folded_variables = fold_for_inference(bw, bw_variables)
  return [('BatchNorm', bn, init(bn)), ('BW, unfolded', bw, bw_variables),
          ('BW, folded', folded, jax.tree.map(jnp.asarray, folded_variables))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='b0')
  parser.add_argument('--width', type=float, default=None, help="width multiplier (default: the variant's)")
  parser.add_argument('--depth', type=float, default=None, help="depth multiplier (default: the variant's)")
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--stem-stride', type=int, default=2)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--stem-type', type=int, default=1)
  parser.add_argument('--mbconv-type', type=int, default=2)
  parser.add_argument('--head-type', type=int, default=2)
  parser.add_argument('--group-size', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--markdown', action='store_true')
  args = parser.parse_args()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, args.channels)),
                       jnp.float32)
  built = networks(args, images)
  calls = []
  for label, model, variables in built:
    progress(f'compiling {label}')
    calls.append(evaluation(model, variables, images))
    calls[-1]()  # warm-up
  progress(f'timing, {args.repeats} rounds')
  milliseconds = time_round_robin(calls, args.repeats)
  rows = [('network', 'ms / batch', 'images/s', 'vs BatchNorm')]
  for (label, _, _), ms in zip(built, milliseconds):
    rows.append((label, f'{ms:.1f}', f'{1e3 * args.batch / ms:.0f}', f'{ms / milliseconds[0]:.2f}×'))
  print('\n'.join(environment()))
  print(f'{args.variant} at {args.size}×{args.size}×{args.channels}, batch {args.batch}, BW placements stem '
        f'{args.stem_type} / MBConv {args.mbconv_type} / head {args.head_type}, groups of {args.group_size}')
  print(format_table(rows, args.markdown))


if __name__ == '__main__':
  main()
