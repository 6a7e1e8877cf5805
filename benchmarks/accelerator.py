"""One command that measures bw_jax on an accelerator: ≤ 8 minutes on one H100, compiles included.

Sections, in this order (each a Markdown table; all of it in --out's accelerator.json and accelerator.md):
  1. Correctness: BatchWhitening (cholesky, zca) on the device against a float64 NumPy reference on one
     batch, max |difference|.
  2. Train step: the loop's own `bw_jax.train.step.train_step` (uint8 images normalised on the device, bf16)
     fed synthetic batches made on the device, EfficientNet-B0 at 224 px, at the largest batch ≤ 256 that
     fits (tried 256, 128, 64, 32): images/s and XLA's peak-memory estimate, for BN (1/0/1), BW 1/2/1 and
     2/2/2 with cholesky, zca and newton at g = 16, and BN with depthwise 'shift' next to XLA's grouped
     convolution ('xla').
  3. One layer: BW forward+backward next to BatchNorm at the five B0 shapes of benchmarks/bw_layer.py.
  4. The ImageNet input pipeline alone (benchmarks/input_pipeline.py) on this host's CPUs; where TensorFlow
     is not installed (an accelerator image) the section says so and is skipped.
Sections 1–3 need jax, flax, optax, orbax-checkpoint, absl-py and ml-collections only: nothing on their path
imports TensorFlow, TFDS or clu (the JSON's `device_path_imported` says what was). Timed rows that would
start after --budget-s seconds (train-step rows after 70% of it) are skipped and say so. A section that fails
records its error and the run goes on (exit status 1 at the end). With --out DIR, DIR/accelerator.json and
DIR/accelerator.md are rewritten after every row, so a run cut short keeps what it measured. Run from the
repository root:

  benchmarks/device_run.sh                                         # on the GPU / TPU: see that script
  .venv/bin/python benchmarks/accelerator.py --out runs/accelerator   # the same, in the project's venv
  .venv/bin/python benchmarks/accelerator.py --quick                 # CPU smoke run, under a minute

--quick runs every section on tiny sizes (B0 scaled to width 0.25, depth 0.1, at 32 px; one train-step row,
one layer shape) so that the script cannot rot; its numbers mean nothing. Progress goes to stderr.
"""

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import bw_jax
from bw_jax.data import default_dataset_config, imagenet
from bw_jax.data.on_device import normalise_images
from bw_jax.extras import is_installed
from bw_jax.nn.whitening import BatchWhitening
from bw_jax.train.config.validation import base_config
from bw_jax.train.optim import (Schedule, create_optimizer, learning_rate_fn, optimizer_from_rates, optimizer_rates,
                                peak_learning_rate)
from bw_jax.train.programs import compiled_init
from bw_jax.train.reporting import memory_report
from bw_jax.train.step import create_model, run_dropout_key, train_batch_spec, train_step
import bw_layer  # benchmarks/bw_layer.py
from common import environment, format_table, progress  # benchmarks/common.py
import input_pipeline  # benchmarks/input_pipeline.py (TensorFlow is imported only when its section runs)

# (row name, (stem, mbconv, head), BW method, depthwise implementation), the rows that matter most first: when
# the budget runs out, the last ones are skipped.
TRAIN_ROWS = [('BN', (1, 0, 1), 'cholesky', 'xla')]
TRAIN_ROWS += [(f'BW {"/".join(map(str, types))} {method}', types, method, 'xla')
               for method in ('cholesky', 'zca', 'newton') for types in ((1, 2, 1), (2, 2, 2))]
TRAIN_ROWS += [('BN, depthwise shift', (1, 0, 1), 'cholesky', 'shift')]
DEVICE = dict(train_rows=[name for name, *_ in TRAIN_ROWS], image_size=224, batches=(256, 128, 64, 32), steps=20,
              width=None, depth=None, layer_batch=128, layer_shapes=list(bw_layer.SHAPES), layer_repeats=20,
              layer_layouts=['dense', 'batched', 'transposed'],  # the group-product cost model on the device
              pipeline_batch=128, pipeline_batches=20, budget_s=400.0)
# Quick: one train-step row, BN's: every row runs the same code, and BN's step compiles in half the time of the
# cheapest BW row's (10 vs 20 s here; the BW model's bf16 step is tested in tests/test_train_utils.py); and the
# layer rows (which run the Newton loop).
QUICK = dict(train_rows=['BN'], image_size=32, batches=(8,), steps=2,
             width=0.25, depth=0.1, layer_batch=4, layer_shapes=[1152], layer_repeats=2, layer_layouts=[],
             pipeline_batch=8, pipeline_batches=2, budget_s=3600.0)  # Every row, however loaded the machine.
GROUP_SIZE = 16
SCHEDULE = Schedule('cosine', warmup_steps=1000, decay_steps=9000)  # 10,000 steps, the first 1,000 warming up.
TRAIN_SHARE = 0.7  # Of the budget: train-step rows start before it, the layer's shapes before the whole budget.
# What the device sections must not need (an accelerator image has none of them).
DEVICE_PATH_UNUSED = ('tensorflow', 'tensorflow_datasets', 'clu')
PIPELINE_NEEDS_TENSORFLOW = ('TensorFlow is not installed here; the input pipeline runs on a host that has it '
                             '(the [train] extra): benchmarks/input_pipeline.py.')


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
  """XLA's peak-memory estimate of a compiled program in bytes; 0 where the backend gives no analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
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
      train_step, model=model, num_classes=1000, label_smoothing=0.1, ema_decay=0.0,
      optimizer_from_rates=functools.partial(optimizer_from_rates, config, SCHEDULE),
      normalise=functools.partial(normalise_images, mean=imagenet.MEAN, std=imagenet.STD)), donate_argnums=0)
  arguments = (run_dropout_key(config.seed, replicated),
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


def layer_rows(sizes: dict, deadline: float) -> Iterator[list[dict]]:
  """BW next to BatchNorm, one list of rows per shape of sizes['layer_shapes'] (rows 'METHOD [LAYOUT]': the
  device's group-product cost model); a shape that would start after `deadline` is one row saying so."""
  args = argparse.Namespace(batch=sizes['layer_batch'], methods=['cholesky', 'zca', 'newton'],
                            group_sizes=[GROUP_SIZE], repeats=sizes['layer_repeats'], before=None,
                            layouts=sizes['layer_layouts'])
  for channels in sizes['layer_shapes']:
    if time.perf_counter() > deadline:
      yield [{'shape': f'C = {channels}', 'skipped': 'time budget spent'}]
      continue
    progress(f'  C = {channels}')
    shape_rows, _ = bw_layer.benchmark_shape(channels, args)
    yield [{'shape': s, 'method': m, 'g': g, 'ms': ms, 'ratio_to_bn': r} for s, m, g, ms, r in shape_rows]


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


def run(sizes: dict, save: Callable[[dict], None]) -> dict:
  """Every section in the module docstring's order; `save(results)` after each row or section."""
  start = time.perf_counter()
  results = {'environment': environment(), 'devices': [str(d) for d in jax.devices()],
             'bw_jax': os.path.dirname(os.path.abspath(bw_jax.__file__)), 'nvidia_smi': nvidia_smi(),
             'sizes': sizes, 'errors': []}
  save(results)
  progress('correctness against float64')
  results['correctness'] = attempt(correctness_rows, 'correctness', results, [])
  save(results)
  results['train_step'] = []
  for name, types, method, depthwise in TRAIN_ROWS:
    if name not in sizes['train_rows']:
      continue
    if time.perf_counter() > start + TRAIN_SHARE * sizes['budget_s']:
      row = {'skipped': 'time budget spent'}
    else:
      progress(f'train step: {name}')
      row = attempt(functools.partial(train_step_row, types, method, depthwise, sizes), f'train step {name}',
                    results, None)
    results['train_step'].append({'row': name, **(row or {'error': results['errors'][-1]})})
    save(results)
  progress('BW layer next to BatchNorm')
  results['layer'] = []
  shapes = layer_rows(sizes, start + sizes['budget_s'])
  while True:
    rows = attempt(lambda: next(shapes, None), 'layer', results, None)  # None: all done, or one failed.
    if rows is None:
      break
    results['layer'] += rows
    save(results)
  results['device_path_imported'] = [name for name in DEVICE_PATH_UNUSED if name in sys.modules]
  if is_installed('tensorflow'):
    progress('input pipeline')
    results['input_pipeline'] = attempt(functools.partial(
        input_pipeline.pipeline_images_per_second, 'imagenet2012', sizes['pipeline_batch'],
        sizes['pipeline_batches'], warmup=1, examples=max(64, 4 * sizes['pipeline_batch'])),
        'input pipeline', results, {})
  else:
    results['input_pipeline'] = {'skipped': PIPELINE_NEEDS_TENSORFLOW}
  results['wall_s'] = time.perf_counter() - start
  save(results)
  return results


def attempt(compute: Callable[[], Any], section: str, results: dict, failed: Any) -> Any:
  """compute(); if it raises, its traceback goes to stderr, one line to results['errors'], and `failed` is
  returned: one failing row or section still leaves the others' figures."""
  try:
    return compute()
  except Exception as error:  # pylint: disable=broad-except  (reported, and the exit status is 1)
    traceback.print_exc()
    results['errors'].append(f'{section}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}')
    return failed


def nvidia_smi() -> str | None:
  """`nvidia-smi`'s report (GPUs, driver, memory in use), or None where it is not installed."""
  if shutil.which('nvidia-smi') is None:
    return None
  done = subprocess.run(['nvidia-smi'], capture_output=True, text=True, timeout=60, check=False)
  return done.stdout + done.stderr


def markdown(results: dict) -> str:
  """The run as Markdown: what ran where, then one table per section, then the errors."""
  lines = [f'- {line}' for line in results['environment']]
  lines += [f"- jax.devices(): {', '.join(results['devices'])}", f"- bw_jax from {results['bw_jax']}"]
  if 'wall_s' in results:
    lines.append(f"- wall time {results['wall_s']:.0f} s")
  if results.get('device_path_imported'):
    lines.append(f"- imported by the device sections: {', '.join(results['device_path_imported'])}")
  parts = ['\n'.join(lines)]
  if results['nvidia_smi']:
    parts.append('```\n' + results['nvidia_smi'].rstrip() + '\n```')
  if 'correctness' in results:
    checks = [('BW on the device vs float64 NumPy', 'max abs error', 'device')]
    checks += [(r['method'], f"{r['max_abs_error']:.2e}", r['device']) for r in results['correctness']]
    parts.append(format_table(checks, markdown=True))
  if results.get('train_step'):
    parts.append(train_step_table(results['train_step']))
  if results.get('layer'):
    layer = [('layer shape (N×H×W×C)', 'method', 'g', 'fwd+bwd ms', 'BW/BN')]
    layer += [(r['shape'], r['method'], r['g'], f"{r['ms']:.2f}", f"{r['ratio_to_bn']:.2f}") if 'ms' in r
              else (r['shape'], '-', '-', '-', r['skipped']) for r in results['layer']]
    parts.append(format_table(layer, markdown=True, text_columns=3))
  pipeline = results.get('input_pipeline')
  if pipeline:
    parts.append(f"Input pipeline skipped: {pipeline['skipped']}" if 'skipped' in pipeline
                 else input_pipeline.markdown_rows([pipeline]))
  if results['errors']:
    parts.append('Errors (tracebacks on stderr):\n' + '\n'.join(f'- {e}' for e in results['errors']))
  return '\n\n'.join(parts) + '\n'


def train_step_table(rows: list[dict]) -> str:
  measured = [r for r in rows if r.get('batch')]
  first = next((r for r in measured if r['row'] == 'BN'), measured[0] if measured else None)
  baseline = first['images_per_sec'] if first else float('nan')
  cells = [('B0 train step, bf16', 'batch', 'images/s', f"ratio to {first['row'] if first else '-'}",
            'peak GiB (XLA estimate)', 'compile s', 'note')]
  for r in rows:
    if r.get('batch'):
      note = f"did not fit: {', '.join(r['did_not_fit'])}" if r['did_not_fit'] else ''
      note += '' if r['loss_finite'] else ' loss not finite!'
      cells.append((r['row'], str(r['batch']), f"{r['images_per_sec']:.0f}",
                    f"{r['images_per_sec'] / baseline:.2f}", f"{r['peak_gib']:.2f}", f"{r['compile_s']:.0f}", note))
    else:
      note = r.get('skipped') or r.get('error') or f"nothing fit: {', '.join(r['did_not_fit'])}"
      cells.append((r['row'], '-', '-', '-', '-', '-', note))
  return format_table(cells, markdown=True)


def write_results(out: str, results: dict) -> None:
  """out/accelerator.json and out/accelerator.md, each replaced whole (a run killed while writing leaves the
  previous complete file)."""
  os.makedirs(out, exist_ok=True)
  for name, text in (('accelerator.json', json.dumps(results, indent=2)), ('accelerator.md', markdown(results))):
    path = os.path.join(out, name)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny sizes on any backend: a smoke run.')
  parser.add_argument('--out', help='write accelerator.json and accelerator.md here, after every row.')
  parser.add_argument('--budget-s', type=float, help='no timed row starts after this many seconds (train-step '
                      f'rows: after {TRAIN_SHARE:.0%} of it).')
  args = parser.parse_args(argv)
  sizes = dict(QUICK if args.quick else DEVICE)
  if args.budget_s is not None:
    sizes['budget_s'] = args.budget_s
  results = run(sizes, functools.partial(write_results, args.out) if args.out else lambda results: None)
  print(markdown(results))
  return results


if __name__ == '__main__':
  sys.exit(1 if main()['errors'] else 0)
