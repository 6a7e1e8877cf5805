"""Forward+backward time of the depthwise convolution: XLA's grouped conv against the 'shift' formulation.

One training step of each implementation is timed: jit(value_and_grad) of sum(y²) w.r.t. the input and the
kernel, for the depthwise layers of EfficientNet-B0 at 64×64 input (batch 64). A third column times
`depthwise.shift_sum` under plain autodiff, i.e. 'shift' without its hand-written backward pass. Within a
shape the implementations are timed round-robin, one call each per round, so that the ratio comes from the
same moments of a noisy machine. Run from the repository root:

  .venv/bin/python benchmarks/depthwise_conv.py              # the table (about a minute on 2 CPU cores)
  .venv/bin/python benchmarks/depthwise_conv.py --markdown   # the same, as BENCHMARKS.md rows
  .venv/bin/python benchmarks/depthwise_conv.py --repeats 5  # quicker, noisier

Progress goes to stderr, the table to stdout.
"""

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bw_jax.models import depthwise
from common import environment, format_table, progress, time_round_robin  # benchmarks/common.py

# (N, H, C, k, s) of EfficientNet-B0's depthwise convolutions at 64×64 input (H = W), one row per stage.
SHAPES = ((64, 32, 32, 3, 1), (64, 32, 96, 3, 2), (64, 16, 144, 5, 2), (64, 8, 240, 3, 2),
          (64, 4, 480, 3, 1), (64, 4, 672, 5, 2), (64, 2, 1152, 3, 1))
CONVS = {'xla': lambda x, kernel, s: depthwise.depthwise_conv(x, kernel, s, 'xla'),
         'shift': lambda x, kernel, s: depthwise.depthwise_conv(x, kernel, s, 'shift'),
         'shift, autodiff': depthwise.shift_sum}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=20, help='timed calls per implementation (median).')
  parser.add_argument('--markdown', action='store_true', help='print a Markdown table.')
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error('--repeats must be positive.')
  return args


def training_step(conv: Callable[..., jax.Array], x: jax.Array, kernel: jax.Array,
                  strides: int) -> Callable[[], Any]:
  """A compiled, warmed-up call of loss sum(y²) and its gradient w.r.t. (x, kernel)."""
  step = jax.jit(jax.value_and_grad(lambda x, kernel: jnp.sum(jnp.square(conv(x, kernel, strides))),
                                    argnums=(0, 1)))
  call = lambda: jax.block_until_ready(step(x, kernel))
  call()  # compile
  call()  # warm caches and the thread pool
  return call


def benchmark_shape(shape: tuple[int, ...], repeats: int) -> tuple[str, list[float]]:
  """Row label and median ms per implementation (CONVS order), checking that the gradients agree."""
  n, h, c, k, s = shape
  x = jax.random.normal(jax.random.key(0), (n, h, h, c), jnp.float32)
  kernel = depthwise.efficientnet_depthwise_init(k)(jax.random.key(1), (k, k, 1, c))
  reference = jax.grad(lambda x: jnp.sum(jnp.square(CONVS['xla'](x, kernel, s))))(x)
  for name, conv in CONVS.items():
    dx = jax.grad(lambda x: jnp.sum(jnp.square(conv(x, kernel, s))))(x)
    if not jnp.allclose(dx, reference, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(reference)))):
      raise AssertionError(f'{name} disagrees with xla on {shape}.')
  label = f'{n}×{h}×{h}×{c} k{k} s{s}'
  progress(f'{label}: compiling {len(CONVS)} implementations')
  calls = [training_step(conv, x, kernel, s) for conv in CONVS.values()]
  progress(f'{label}: timing {repeats} rounds')
  return label, time_round_robin(calls, repeats)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  prefix = '- ' if args.markdown else ''
  print('\n'.join(prefix + line for line in environment()))
  print(f'{prefix}float32, jit(value_and_grad) of sum(y²) w.r.t. (x, kernel), median of {args.repeats} '
        f'round-robin calls\n')
  rows = [benchmark_shape(shape, args.repeats) for shape in SHAPES]
  header = ('shape (N×H×W×C, k, s)', *(f'{name} ms' for name in CONVS), 'xla/shift')
  cells = [header] + [(label, *(f'{ms:.2f}' for ms in medians), f'{medians[0] / medians[1]:.1f}×')
                      for label, medians in rows]
  print(format_table(cells, args.markdown))
  total = [sum(medians[i] for _, medians in rows) for i in range(len(CONVS))]
  print(f'\n{prefix}all seven layers: ' + ', '.join(f'{name} {ms:.1f} ms' for name, ms in zip(CONVS, total))
        + f' (xla/shift {total[0] / total[1]:.1f}×)')


if __name__ == '__main__':
  main()
