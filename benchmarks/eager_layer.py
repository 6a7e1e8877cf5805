"""BatchWhitening called eagerly (a notebook's way): one compiled program per shape against op-by-op dispatch.

A training-mode call of the layer on concrete arrays runs `vjp.whiten_training` as one jitted program per
shape and settings; without it, the same call dispatches its ~100 operations one by one (the same function
under `jax.disable_jit()`, timed here as the reference). Both are timed after a
first call (compiles excluded), round-robin, so that the ratio comes from the same moments; the first call
of each (compiles included) is reported too. Run from the repository root:

  .venv/bin/python benchmarks/eager_layer.py              # the table (under a minute on 2 CPU cores)
  .venv/bin/python benchmarks/eager_layer.py --markdown   # the same, as BENCHMARKS.md rows

Progress goes to stderr, the table to stdout.
"""

import argparse
import time

import jax
import numpy as np

from bw_jax.nn.statistics import TrainingStatistics
from bw_jax.nn.vjp import whiten_training
from common import environment, format_table, progress, time_round_robin  # benchmarks/common.py

SHAPES = ((32, 8, 8, 64), (32, 16, 16, 32), (32, 4, 4, 240))  # (N, H, W, C)
GROUP_SIZE = 16


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--markdown', action='store_true')
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  cells = [('shape (N×H×W×C)', 'first call, compiled (s)', 'first call, op by op (s)', 'compiled (ms)',
            'op by op (ms)', 'op by op / compiled')]
  for shape in SHAPES:
    progress(f'shape {shape}')
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    channels = shape[-1]
    groups = channels // GROUP_SIZE
    eye = np.tile(np.eye(GROUP_SIZE, dtype=np.float32), (groups, 1, 1))
    running = (np.zeros(channels, np.float32), eye, eye)
    statistics = TrainingStatistics(method='cholesky', epsilon=1e-3, newton_iterations=5, momentum=0.99,
                                    center_with='batch', whiten_with='batch', running_whitening=True)
    compiled = lambda: jax.block_until_ready(whiten_training(x, groups, statistics, running))

    def op_by_op():
      with jax.disable_jit():
        return jax.block_until_ready(whiten_training(x, groups, statistics, running))
    firsts = []
    for call in (compiled, op_by_op):
      start = time.perf_counter()
      call()
      firsts.append(time.perf_counter() - start)
    ms = time_round_robin([compiled, op_by_op], args.repeats)
    cells.append(('×'.join(map(str, shape)), f'{firsts[0]:.2f}', f'{firsts[1]:.2f}', f'{ms[0]:.2f}',
                  f'{ms[1]:.1f}', f'{ms[1] / ms[0]:.0f}×'))
  print('\n'.join('- ' + line for line in environment()) + '\n')
  print(format_table(cells, args.markdown))


if __name__ == '__main__':
  main()
