"""What every benchmark script shares: the machine description, progress lines, round-robin timing, tables.

Imported by its siblings as `from common import ...` (scripts run from the repository root put
`benchmarks/` first on sys.path).
"""

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jaxlib

from bw_jax.nn import group_products
from bw_jax.nn import matrices as whitening_matrices
from bw_jax.train.runtime import configure_cpu_dispatch

configure_cpu_dispatch()  # Why: bw_jax/train/runtime.py; it also times each call in the calling thread.


def environment() -> list[str]:
  """Lines naming the software versions, the JAX backend and the host CPU."""
  cpu = next((line.split(':', 1)[1].strip() for line in _lines('/proc/cpuinfo')
              if line.startswith('model name')), platform.processor() or 'unknown')
  device = jax.devices()[0]
  return [f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, '
          f'Python {platform.python_version()}',
          f'backend {jax.default_backend()}, device {device.device_kind} ({device}), '
          f'{len(jax.devices())} device(s)',
          f'host: {os.cpu_count()} CPUs ({cpu})']


def _lines(path: str) -> list[str]:
  try:
    with open(path) as f:
      return f.readlines()
  except OSError:
    return []


def progress(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def time_round_robin(calls: list[Callable[[], Any]], repeats: int) -> list[float]:
  """Median milliseconds of each call, timing one call of each per round (ratios from the same moments)."""
  samples = [[] for _ in calls]
  for _ in range(repeats):
    for call, times in zip(calls, samples):
      start = time.perf_counter()
      call()
      times.append(1e3 * (time.perf_counter() - start))
  return [statistics.median(times) for times in samples]


def format_table(cells: list[tuple[str, ...]], markdown: bool, text_columns: int = 1) -> str:
  """Header row first; the first `text_columns` columns are left-aligned text, the rest numbers."""
  if markdown:
    lines = ['| ' + ' | '.join(row) + ' |' for row in cells]
    rule = '|' + '---|' * text_columns + '---:|' * (len(cells[0]) - text_columns)
    return '\n'.join([lines[0], rule] + lines[1:])
  widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
  return '\n'.join('  '.join(cell.ljust(w) if i < text_columns else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))) for row in cells)


# A pseudo-layout for `forced_layout`: XLA's products as the CPU picks them without the kernels (dense for
# C ≤ 64, batched above) and LAPACK's Cholesky trials, i.e. the layer as it ran before bw_jax/kernels.
XLA_PRODUCTS = 'xla'
LAYOUT_CHOICES = (*group_products.LAYOUTS, XLA_PRODUCTS)


@contextlib.contextmanager
def forced_layout(layout: str | None):
  """Within it, BW layers traced take `layout` for their group products on every platform (None: as chosen;
  XLA_PRODUCTS: `group_products.xla_cpu_layout`)."""
  saved = (group_products.cpu_layout, group_products.accelerator_layout,
           whitening_matrices.cholesky_kernel_applies)
  if layout == XLA_PRODUCTS:
    group_products.cpu_layout = lambda channels, group_size=None: group_products.xla_cpu_layout(channels)
    whitening_matrices.cholesky_kernel_applies = lambda group_size: False
  elif layout is not None:
    group_products.cpu_layout = group_products.accelerator_layout = lambda channels, group_size=None: layout
  try:
    yield
  finally:
    (group_products.cpu_layout, group_products.accelerator_layout,
     whitening_matrices.cholesky_kernel_applies) = saved
