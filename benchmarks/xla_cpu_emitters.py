"""XLA's CPU emitters: the MLIR fusion emitters (XLA's default) against the older ones
(`--xla_cpu_use_fusion_emitters=false`, which the test suite uses: tests/subprocess_runs.py).

For each, in a fresh process (XLA reads XLA_FLAGS once): the CPU seconds that compiling takes — the smoke
model's train step (configs/smoke.py, as the suite's runs compile it), the main job's train step
(configs/default.py) and a random init of a small BW B0 (the README's quickstart model, threefry keys) — and
the main job's training throughput (median of 5 rounds of 10 steps of 128 random images). Compile seconds are
CPU seconds of the process (XLA compiles on several threads), without the tracing and lowering, which the
flag does not touch. Run from the repository root:

  .venv/bin/python benchmarks/xla_cpu_emitters.py              # ~3 minutes on 2 CPU cores
  .venv/bin/python benchmarks/xla_cpu_emitters.py --markdown   # the same, as BENCHMARKS.md rows

Progress goes to stderr, the table to stdout.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

EMITTERS = {'fusion (XLA default)': '', 'older (the suite)': '--xla_cpu_use_fusion_emitters=false'}
BATCH = 128


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def compile_cpu_seconds(lowered) -> tuple[float, object]:
  start = cpu_seconds()
  compiled = lowered.compile()
  return cpu_seconds() - start, compiled


def measure() -> dict[str, float]:
  """This process's figures (XLA_FLAGS as its parent set them)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bw_jax.data import fashion_mnist
  from bw_jax.data.on_device import shard_batch
  from bw_jax.models.efficientnet import EfficientNet
  from bw_jax.nn.whitening import BWSettings
  from bw_jax.train.optim import optimizer_rates
  from bw_jax.train.plan import DataCounts, plan_for
  from bw_jax.train.programs import programs_for
  from bw_jax.train.runtime import configure_cpu_dispatch
  from bw_jax.train.step import run_dropout_key
  from configs import default, smoke

  configure_cpu_dispatch()
  info = fashion_mnist.INFO
  counts = DataCounts(info.num_examples['train'], info.num_examples['test'], info.num_classes)
  rng = np.random.default_rng(0)
  figures = {}
  for name, config in (('smoke', smoke.get_config()), ('default', default.get_config())):
    plan = plan_for(config, counts)
    programs = programs_for(plan)
    state = programs.init(np.int32(0))
    rates = optimizer_rates(plan.peak_learning_rate, config.weight_decay)
    key = run_dropout_key(0, programs.replicated)
    batch = shard_batch({'image': rng.integers(0, 256, (config.batch_size, 28, 28, 1), dtype=np.uint8),
                         'label': rng.integers(0, 10, config.batch_size).astype(np.int32)}, programs.data_sharding)
    figures[f'{name} train step'], step = compile_cpu_seconds(programs.train_step.lower(state, batch, key, rates))
    if name == 'default':
      state = step(state, batch, key, rates)[0]
      rounds = []
      for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
          state = step(state, batch, key, rates)[0]
        jax.block_until_ready(state)
        rounds.append(10 * config.batch_size / (time.perf_counter() - start))
      figures['default images/s'] = float(np.median(rounds))
  model = EfficientNet(variant='b0', num_classes=10, stem_type=1, mbconv_type=2, head_type=2,
                       width_multiplier=0.25, depth_multiplier=0.25, bw=BWSettings(group_size=4, epsilon=0.1))
  init = jax.jit(model.init, static_argnames='train')
  figures['B0 init'], _ = compile_cpu_seconds(init.lower(jax.random.key(0), jnp.zeros((8, 32, 32, 3)), train=False))
  return figures


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--markdown', action='store_true')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure()))
    return
  from common import environment, format_table, progress  # benchmarks/common.py

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = {}
  for label, flags in EMITTERS.items():
    progress(f'{label}: XLA_FLAGS={flags!r}')
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')])))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), '--child'], env=env, cwd=repo,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
      sys.exit(f'the {label} process failed:\n{done.stderr[-3000:]}')
    results[label] = json.loads(done.stdout.strip().splitlines()[-1])
  default, older = results.values()
  cells = [('emitters', 'smoke train step compile (CPU s)', 'main job train step compile (CPU s)',
            'B0 random init compile (CPU s)', 'main job images/s')]
  for label, r in results.items():
    cells.append((label, f"{r['smoke train step']:.1f}", f"{r['default train step']:.1f}", f"{r['B0 init']:.1f}",
                  f"{r['default images/s']:.0f}"))
  cells.append(('older / fusion', *(f'{older[k] / default[k]:.2f}' for k in
                                   ('smoke train step', 'default train step', 'B0 init', 'default images/s'))))
  print('\n'.join(environment()))
  print(format_table(cells, args.markdown))


if __name__ == '__main__':
  main()
