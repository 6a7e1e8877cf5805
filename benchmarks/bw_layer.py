"""Forward+backward time of `BatchWhitening` next to `flax.linen.BatchNorm` on EfficientNet-B0 shapes.

One training step of each layer is timed: jit(value_and_grad) of sum(y²) w.r.t. the input and the
parameters, with `batch_stats` mutable. Shapes are EfficientNet-B0 activations at 64×64 input (batch 128).
Within a shape, BatchNorm and every BatchWhitening variant are timed round-robin, one call each per round,
so that the BW/BN ratios come from the same moments of a noisy machine. Run from the repository root:

  .venv/bin/python benchmarks/bw_layer.py                      # the full table (minutes on a CPU)
  .venv/bin/python benchmarks/bw_layer.py --markdown           # the same, as BENCHMARKS.md rows
  .venv/bin/python benchmarks/bw_layer.py --quick              # smoke run: batch 8, g=16, 3 repeats
  .venv/bin/python benchmarks/bw_layer.py --shapes 96 672 --methods cholesky --group-sizes 16
  .venv/bin/python benchmarks/bw_layer.py --methods cholesky --group-sizes 16 --before f1f1e1c  # before/after
  .venv/bin/python benchmarks/bw_layer.py --methods cholesky --group-sizes 16 --layouts batched transposed
                                         # the same layer with its group products forced into each layout

Progress goes to stderr, the table to stdout.
"""

import argparse
import importlib
import io
from pathlib import Path
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp

from bw_jax.nn import whitening
from common import (LAYOUT_CHOICES, environment, forced_layout, format_table, progress,  # benchmarks/common.py
                    time_round_robin)

# (H, W, C) of EfficientNet-B0 stage outputs at 64×64 input, keyed by C (the --shapes names).
SHAPES = {32: (32, 32, 32), 96: (16, 16, 96), 240: (8, 8, 240), 672: (4, 4, 672), 1152: (2, 2, 1152)}
GROUP_SIZES = (8, 16, 32, 64)
MOMENTUM, EPSILON = 0.99, 1e-5  # shared by both layers, so that only the normalisation differs.
QUICK = dict(batch=8, group_sizes=[16], repeats=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--methods', nargs='+', default=list(whitening.METHODS), choices=whitening.METHODS)
  parser.add_argument('--group-sizes', nargs='+', type=int, default=list(GROUP_SIZES), metavar='G',
                      help='requested g; a g that does not divide C becomes fit_group_size(C, g).')
  parser.add_argument('--shapes', nargs='+', type=int, default=list(SHAPES), choices=list(SHAPES),
                      metavar='C', help=f'shapes by channel count, from {list(SHAPES)}.')
  parser.add_argument('--repeats', type=int, default=20, help='timed calls per layer (median reported).')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--markdown', action='store_true', help='print a Markdown table.')
  parser.add_argument('--quick', action='store_true', help=f'smoke run: {QUICK}, overriding those flags.')
  parser.add_argument('--layouts', nargs='+', choices=LAYOUT_CHOICES, default=[],
                      help='also time each BW layer with its group products forced into these layouts '
                      '(rows "METHOD [LAYOUT]"; default rows use the per-platform choice; "xla": XLA\'s products '
                      'as the CPU picks them without the kernels, the layer before bw_jax/kernels).')
  parser.add_argument('--before', metavar='REV', help='also time the bw_jax layer as of git revision REV '
                      '(rows "METHOD @REV"), round-robin in the same process.')
  args = parser.parse_args(argv)
  if args.quick:
    vars(args).update(QUICK)
  if args.repeats < 1 or args.batch < 1 or min(args.group_sizes) < 1:
    parser.error('--repeats, --batch and --group-sizes must be positive.')
  return args


def whitening_at(revision: str) -> Any:
  """The whitening module of bw_jax as of a git revision, from a copy of that revision's whole package
  imported under its own name (`bw_jax_at_REV`, its imports of bw_jax rewritten), so that the layer as it
  was runs beside today's in one process whatever the modules around it became.

  The CPU kernels register their XLA targets by name, once per process: the two revisions must carry the
  same kernel sources (checked), else one layer would run the other's kernels.
  """
  name = 'bw_jax_at_' + ''.join(c if c.isalnum() else '_' for c in revision)
  root = Path(tempfile.mkdtemp(prefix=f'{name}_'))
  archive = subprocess.run(['git', 'archive', revision, 'bw_jax'], check=True, capture_output=True).stdout
  tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter='data')
  package = root / name
  (root / 'bw_jax').rename(package)
  here = Path(whitening.__file__).parents[1]  # today's bw_jax/
  for source in here.rglob('*.cc'):
    old = next(package.rglob(source.name), None)
    if old is not None and old.read_text() != source.read_text():
      raise SystemExit(f'--before {revision}: its {source.name} differs from today\'s; the kernels are registered '
                       f'by name once per process, so compare revisions with the same kernel sources.')
  for module in package.rglob('*.py'):  # imports, and module names in strings (lazy imports)
    text = re.sub(r'\b(from|import)\s+bw_jax\b', rf'\1 {name}', module.read_text())
    module.write_text(re.sub(r'([\'"])bw_jax\.', rf'\1{name}.', text))
  sys.path.insert(0, str(root))
  for relative in ('nn/whitening.py', 'whitening.py'):  # where the module lived changed over time
    if (package / relative).exists():
      return importlib.import_module(f'{name}.{relative[:-3].replace("/", ".")}')
  raise SystemExit(f'--before {revision}: no bw_jax/nn/whitening.py or bw_jax/whitening.py there.')


def layers_for(channels: int, methods: list[str], group_sizes: list[int], before: str | None = None,
               layouts: list[str] = ()) -> tuple[list, list[str]]:
  """[(method, g label, module, layout or None)] with BatchNorm first, and notes on requested g that repeat
  a row."""
  rows = [('batchnorm', '-', nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON), None)]
  notes = []
  for method in methods:
    seen = set()
    for requested in group_sizes:
      g = whitening.fit_group_size(channels, requested)
      label = str(g) if g == requested else f'{g} (asked {requested})'
      if g in seen:
        notes.append(f'C={channels} {method}: g={requested} fits to g={g}, already timed.')
        continue
      seen.add(g)
      versions = [(method, whitening)] + ([(f'{method} @{before}', whitening_at(before))] if before else [])
      versions += [(f'{method} [{layout}]', whitening, layout) for layout in layouts]
      for name, source, *layout in versions:
        rows.append((name, label, source.BatchWhitening(
            use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, group_size=g, method=method),
            layout[0] if layout else None))
  return rows, notes


def compiled_training_step(module: nn.Module, x: jax.Array) -> tuple[Any, tuple]:
  """One forward+backward pass (loss, d/d(params, x), new batch_stats) compiled now, and its arguments.

  Compiled ahead rather than on its first call: `forced_layout` clears JAX's caches on its way out, and a step
  compiled later would compile again outside it, with the default layout."""
  variables = module.init(jax.random.key(1), x)

  def loss(params, inputs, batch_stats):
    y, updates = module.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                              mutable=['batch_stats'])
    return jnp.sum(jnp.square(y)), updates['batch_stats']

  args = (variables['params'], x, variables['batch_stats'])
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(*args).compile(), args


def training_step(module: nn.Module, x: jax.Array) -> Callable[[], Any]:
  """A compiled, warmed-up call of `compiled_training_step`."""
  step, args = compiled_training_step(module, x)
  call = lambda: jax.block_until_ready(step(*args))
  call()  # warm caches and the thread pool
  return call


def benchmark_shape(channels: int, args: argparse.Namespace) -> tuple[list[tuple], list[str]]:
  """Table rows (shape, method, g, ms, ratio to BN) for one activation shape, and notes."""
  shape = (args.batch, *SHAPES[channels])
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  layers, notes = layers_for(channels, args.methods, args.group_sizes, args.before, args.layouts)
  calls = []
  for method, g, module, layout in layers:
    progress(f'{shape}: compiling {method} g={g}')
    with forced_layout(layout):  # the layout is chosen when the step is traced, in its first call
      calls.append(training_step(module, x))
  progress(f'{shape}: timing {len(calls)} layers x {args.repeats} rounds')
  medians = time_round_robin(calls, args.repeats)
  shape_label = '×'.join(map(str, shape))
  rows = [(shape_label, method, g, ms, ms / medians[0]) for (method, g, *_), ms in zip(layers, medians)]
  return rows, notes


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  prefix = '- ' if args.markdown else ''
  print('\n'.join(prefix + line for line in environment()))
  print(f'{prefix}batch {args.batch}, {args.repeats} timed rounds per shape, methods {args.methods}, '
        f'requested g {args.group_sizes}\n')
  rows, notes = [], []
  for channels in args.shapes:
    shape_rows, shape_notes = benchmark_shape(channels, args)
    rows += shape_rows
    notes += shape_notes
  header = ('shape (N×H×W×C)', 'method', 'g', 'median ms', 'BW/BN')
  cells = [header] + [(s, m, g, f'{ms:.2f}', f'{ratio:.2f}') for s, m, g, ms, ratio in rows]
  print(format_table(cells, args.markdown, text_columns=3))
  if notes:
    print('\n' + '\n'.join(prefix + note for note in notes))


if __name__ == '__main__':
  main()
