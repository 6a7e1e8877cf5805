"""One command that measures bw_jax on an accelerator: ≤ 8 minutes on one H100, compiles included.

Sections (each a Markdown table on stdout; all of it also in --json):
  1. Train step: the project's own `train.train_step` (uint8 images normalised on the device, bf16),
     EfficientNet-B0 at 224 px, at the largest batch ≤ 256 that fits (tried 256, 128, 64, 32): images/s and
     XLA's peak-memory estimate, for BN (1/0/1), BW 1/2/1 and 2/2/2 with cholesky, zca and newton at
     g = 16, and BN with depthwise 'shift' next to XLA's grouped convolution ('xla').
  2. One layer: BW forward+backward next to BatchNorm at the five B0 shapes of benchmarks/bw_layer.py.
  3. The ImageNet input pipeline alone (benchmarks/input_pipeline.py) on this host's CPUs.
  4. Correctness: BatchWhitening (cholesky, zca) on the device against a float64 NumPy reference on one
     batch, max |difference|.
Rows that would start after --budget-s seconds are skipped and say so. Run from the repository root:

  .venv/bin/python benchmarks/accelerator.py --json accelerator.json      # on the GPU / TPU
  .venv/bin/python benchmarks/accelerator.py --quick                      # CPU smoke run, under a minute

--quick runs every section on tiny sizes (B0 scaled to width 0.25, depth 0.1, at 32 px; one train-step row,
one layer shape) so that the script cannot rot; its numbers mean nothing. Progress goes to stderr.
"""

import argparse
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bw_jax.train import step as train
from bw_jax.train.config.validation import base_config
from bw_jax.data import default_dataset_config, imagenet
from bw_jax.data.on_device import normalise_images
from bw_jax.train.optim import (Schedule, create_optimizer, learning_rate_fn, optimizer_from_rates, optimizer_rates,
                                peak_learning_rate)
from bw_jax.train.programs import compiled_init
from bw_jax.train.reporting import memory_report
from bw_jax.train.step import create_model, train_batch_spec
from bw_jax.nn.whitening import BatchWhitening
import bw_layer  # benchmarks/bw_layer.py
from common import environment, format_table, progress  # benchmarks/common.py
import input_pipeline  # benchmarks/input_pipeline.py

# (row name, (stem, mbconv, head), BW method, depthwise implementation)
TRAIN_ROWS = [('BN', (1, 0, 1), 'cholesky', 'xla'), ('BN, depthwise shift', (1, 0, 1), 'cholesky', 'shift')]
TRAIN_ROWS += [(f'BW {"/".join(map(str, types))} {method}', types, method, 'xla')
               for types in ((1, 2, 1), (2, 2, 2)) for method in ('cholesky', 'zca', 'newton')]
DEVICE = dict(train_rows=[name for name, *_ in TRAIN_ROWS], image_size=224, batches=(256, 128, 64, 32), steps=20,
              width=None, depth=None, layer_batch=128, layer_shapes=list(bw_layer.SHAPES), layer_repeats=20,
              layer_layouts=['dense', 'batched', 'transposed'],  # the group-product cost model on the device
              pipeline_batch=128, pipeline_batches=20, budget_s=420.0)
# Quick: one train-step row, BN's: every row runs the same code, and BN's step compiles in half the time of the
# cheapest BW row's (10 vs 20 s here; the BW model's bf16 step is tested in tests/test_train_utils.py); and the
# layer rows (which run the Newton loop).
QUICK = dict(train_rows=['BN'], image_size=32, batches=(8,), steps=2,
             width=0.25, depth=0.1, layer_batch=4, layer_shapes=[1152], layer_repeats=2, layer_layouts=[],
             pipeline_batch=8, pipeline_batches=2, budget_s=3600.0)  # Every row, however loaded the machine.
GROUP_SIZE = 16
SCHEDULE = Schedule('cosine', warmup_steps=1000, decay_steps=9000)  # 10,000 steps, the first 1,000 warming up.


def b0_config(types: tuple[int, int, int], method: str, depthwise: str, sizes: dict) -> Any:
  config = base_config()
  config.dataset = default_dataset_config('imagenet2012')
  config.dataset.image_size = sizes['image_size']
  config.half_precision = True
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = types
  config.model.bw.method, config.model.bw.group_size = method, GROUP_SIZE
  config.model.depthwise_implementation = depthwise
  config.model.width_multiplier, config.model.depth_multiplier = sizes['width'], sizes['depth']
  return config


def device_memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get('bytes_limit') if stats else None


def peak_estimate(compiled: Any) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def random_batch(batch: int, size: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.key(0), 2)
  return {'image': jax.random.randint(keys[0], (batch, size, size, 3), 0, 256).astype(jnp.uint8),
          'label': jax.random.randint(keys[1], (batch,), 0, 1000), 'mask': jnp.ones((batch,), jnp.float32)}


def train_step_row(types: tuple, method: str, depthwise: str, sizes: dict) -> dict:
  """Images/s of the largest batch in sizes['batches'] that compiles within the device memory and runs."""
  config = b0_config(types, method, depthwise, sizes)
  model = create_model(config, 1000)
  tx = create_optimizer(config, learning_rate_fn(SCHEDULE, 1.0), weight_decay=config.weight_decay)
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # As train_and_evaluate runs it: the dropout key and the optimizer's rates are arguments of the step.
  step = jax.jit(functools.partial(
      train.train_step, model=model, num_classes=1000, label_smoothing=0.1, ema_decay=0.0,
      optimizer_from_rates=functools.partial(optimizer_from_rates, config, SCHEDULE),
      normalise=functools.partial(normalise_images, mean=imagenet.MEAN, std=imagenet.STD)), donate_argnums=0)
  arguments = (train.run_dropout_key(config.seed, replicated),
               optimizer_rates(peak_learning_rate(config.learning_rate, config.batch_size), config.weight_decay))
  size, limit, skipped = sizes['image_size'], device_memory_limit(), []
  initial = compiled_init(config, model, tx, (size, size, 3), replicated)(np.int32(config.seed))
  for batch in sizes['batches']:
    state = jax.tree.map(jnp.copy, initial)  # Each try gets its own: the step donates the state.
    start = time.perf_counter()
    compiled = step.lower(state, train_batch_spec(batch, (size, size, 3), None), *arguments).compile()
    compile_s, peak = time.perf_counter() - start, peak_estimate(compiled)
    progress(f'  batch {batch}: compiled in {compile_s:.0f} s; {memory_report(compiled)}')
    if limit and peak > 0.95 * limit:
      skipped.append(f'{batch} (estimate {peak / 2**30:.1f} GiB)')
      continue
    arrays = random_batch(batch, size)
    try:
      for _ in range(2):  # Warm-up: the first call also transfers and allocates.
        state, metrics = compiled(state, arrays, *arguments)
      jax.block_until_ready(state)
      start = time.perf_counter()
      for _ in range(sizes['steps']):
        state, metrics = compiled(state, arrays, *arguments)
      jax.block_until_ready((state, metrics))
      seconds = time.perf_counter() - start
    except jax.errors.JaxRuntimeError as error:  # Out of memory despite the estimate: try a smaller batch.
      if 'RESOURCE_EXHAUSTED' not in str(error):
        raise
      skipped.append(f'{batch} (out of memory)')
      continue
    return {'batch': batch, 'images_per_sec': sizes['steps'] * batch / seconds, 'compile_s': compile_s,
            'peak_gib': peak / 2**30, 'loss_finite': bool(np.isfinite(float(metrics['loss']))),
            'did_not_fit': skipped}
  return {'batch': None, 'did_not_fit': skipped}


def layer_rows(sizes: dict) -> list[dict]:
  args = argparse.Namespace(batch=sizes['layer_batch'], methods=['cholesky', 'zca', 'newton'],
                            group_sizes=[GROUP_SIZE], repeats=sizes['layer_repeats'], before=None,
                            layouts=sizes['layer_layouts'])  # rows 'METHOD [LAYOUT]': the device's cost model
  rows = []
  for channels in sizes['layer_shapes']:
    shape_rows, _ = bw_layer.benchmark_shape(channels, args)
    rows += [{'shape': s, 'method': m, 'g': g, 'ms': ms, 'ratio_to_bn': r} for s, m, g, ms, r in shape_rows]
  return rows


def float64_whitening_reference(x: np.ndarray, method: str, epsilon: float) -> np.ndarray:
  """y = S(Σ + εI)(x − μ) per group of GROUP_SIZE channels, Σ with the 1/(m−1) of bw_jax.nn.whitening."""
  samples = x.reshape(-1, x.shape[-1]).astype(np.float64)
  centred = samples - samples.mean(0)
  out = np.empty_like(centred)
  for start in range(0, x.shape[-1], GROUP_SIZE):
    c = centred[:, start:start + GROUP_SIZE]
    cov = c.T @ c / (len(c) - 1) + epsilon * np.eye(GROUP_SIZE)
    if method == 'cholesky':
      s = np.linalg.inv(np.linalg.cholesky(cov))
    else:
      w, u = np.linalg.eigh(cov)
      s = u @ np.diag(w ** -0.5) @ u.T
    out[:, start:start + GROUP_SIZE] = c @ s.T
  return out.reshape(x.shape)


def correctness_rows() -> list[dict]:
  """Max |BW on the device (float32) − float64 NumPy| on one correlated (64, 8, 8, 32) batch."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(64, 8, 8, 32)) @ rng.normal(size=(32, 32)) + 0.5).astype(np.float32)
  rows = []
  for method in ('cholesky', 'zca'):
    layer = BatchWhitening(use_running_average=False, group_size=GROUP_SIZE, method=method, epsilon=1e-3)
    variables = layer.init(jax.random.key(0), x)
    y, _ = jax.jit(lambda v, x: layer.apply(v, x, mutable=['batch_stats']))(variables, x)
    error = float(np.max(np.abs(np.asarray(y, np.float64) - float64_whitening_reference(x, method, 1e-3))))
    rows.append({'method': method, 'max_abs_error': error, 'device': str(jax.devices()[0])})
  return rows


def run(sizes: dict) -> dict:
  deadline, results = time.perf_counter() + sizes['budget_s'], {'environment': environment(), 'sizes': sizes}
  results['train_step'] = []
  for name, types, method, depthwise in TRAIN_ROWS:
    if name not in sizes['train_rows']:
      continue
    if time.perf_counter() > deadline:
      results['train_step'].append({'row': name, 'skipped': 'time budget spent'})
      continue
    progress(f'train step: {name}')
    results['train_step'].append({'row': name, **train_step_row(types, method, depthwise, sizes)})
  progress('BW layer next to BatchNorm')
  results['layer'] = layer_rows(sizes) if time.perf_counter() < deadline else []
  progress('input pipeline')
  results['input_pipeline'] = input_pipeline.pipeline_images_per_second(
      'imagenet2012', sizes['pipeline_batch'], sizes['pipeline_batches'], warmup=1,
      examples=max(64, 4 * sizes['pipeline_batch']))
  progress('correctness against float64')
  results['correctness'] = correctness_rows()
  return results


def markdown(results: dict) -> str:
  measured = [r for r in results['train_step'] if r.get('batch')]
  first = next((r for r in measured if r['row'] == 'BN'), measured[0] if measured else None)
  baseline = first['images_per_sec'] if first else float('nan')
  cells = [('B0 train step, bf16', 'batch', 'images/s', f"ratio to {first['row'] if first else '-'}",
            'peak GiB (XLA estimate)', 'compile s', 'note')]
  for r in results['train_step']:
    if r.get('batch'):
      note = f"did not fit: {', '.join(r['did_not_fit'])}" if r['did_not_fit'] else ''
      note += '' if r['loss_finite'] else ' loss not finite!'
      cells.append((r['row'], str(r['batch']), f"{r['images_per_sec']:.0f}",
                    f"{r['images_per_sec'] / baseline:.2f}", f"{r['peak_gib']:.2f}", f"{r['compile_s']:.0f}", note))
    else:
      cells.append((r['row'], '-', '-', '-', '-', '-', r.get('skipped') or f"nothing fit: {r['did_not_fit']}"))
  tables = [format_table(cells, markdown=True)]
  layer = [('layer shape (N×H×W×C)', 'method', 'g', 'fwd+bwd ms', 'BW/BN')]
  layer += [(r['shape'], r['method'], r['g'], f"{r['ms']:.2f}", f"{r['ratio_to_bn']:.2f}") for r in results['layer']]
  tables.append(format_table(layer, markdown=True, text_columns=3))
  tables.append(input_pipeline.markdown_rows([results['input_pipeline']]))
  checks = [('BW on the device vs float64 NumPy', 'max abs error', 'device')]
  checks += [(r['method'], f"{r['max_abs_error']:.2e}", r['device']) for r in results['correctness']]
  tables.append(format_table(checks, markdown=True))
  return '\n\n'.join(tables)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny sizes on any backend: a smoke run.')
  parser.add_argument('--json', help='also write the results to this JSON file.')
  parser.add_argument('--budget-s', type=float, help='skip train-step rows that would start after this.')
  args = parser.parse_args(argv)
  sizes = dict(QUICK if args.quick else DEVICE)
  if args.budget_s is not None:
    sizes['budget_s'] = args.budget_s
  start = time.perf_counter()
  results = run(sizes)
  results['wall_s'] = time.perf_counter() - start
  print('\n'.join('- ' + line for line in environment()) + f"\n- wall time {results['wall_s']:.0f} s\n")
  print(markdown(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
