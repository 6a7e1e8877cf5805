"""From a pretrained network, on Fashion-MNIST: `python -m bw_jax.finetune_demo --workdir=DIR [--smoke]`
(`make finetune-demo`; ~25 minutes on a quiet 2-core CPU, `--smoke` a tiny model for a few steps).

1. Trains configs/fashion_mnist_bn.py (BatchNorm everywhere) in DIR/bn.
2. Converts it to the main job's BW placements (configs/default.py: MBConv type 2, head type 2) and evaluates
   it before and after calibrating BN and BW statistics (`python -m bw_jax.convert`'s steps; DIR/converted).
3. Fine-tunes the calibrated network for one epoch (configs/finetune_fashion_mnist.py) in DIR/finetune.
4. Trains the BW main job from scratch (configs/default.py) in DIR/scratch.
Prints the table of docs/design.md §3.5 and writes it to DIR/table.md. Each run resumes if its workdir holds
checkpoints, so an interrupted demo goes on where it stopped.
"""

from bw_jax.extras import exit_without_extra

exit_without_extra('bw_jax.train')  # Before the imports below need it: one line, no traceback.

import argparse
import contextlib
import functools
import io
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bw_jax import data
from bw_jax.models.pretrained import Pretrained
from bw_jax.train.config.files import load_config_file
from bw_jax.train.init_from import convert_and_calibrate, load_source
from bw_jax.train.loop import train_and_evaluate
from bw_jax.train.runtime import configure_cpu_dispatch

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
SMOKE_STEPS = {'bn': 40, 'finetune': 10, 'scratch': 40}  # Training steps of each run with --smoke.
COLUMNS = (('eval_accuracy', 'eval accuracy'), ('eval_loss', 'eval loss'),
           ('batch_accuracy', 'accuracy, batch statistics'), ('batch_loss', 'loss, batch statistics'))


def smoke_sized(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """`config` with configs/smoke.py's tiny model, batch and eval slice, for `steps` steps without warm-up
  (the configs warm up over epochs: a few steps would barely move the weights)."""
  config.model.width_multiplier, config.model.depth_multiplier = 0.25, 0.1
  config.batch_size, config.eval_batch_size, config.num_train_steps = 16, 500, steps
  config.warmup_epochs = 0.0
  config.dataset.eval_split = 'test[:1000]'
  config.init_calibration_batches = min(config.init_calibration_batches, 3)
  return config


def demo_configs(workdir: str, smoke: bool) -> dict[str, ml_collections.ConfigDict]:
  configs = {name: load_config_file(os.path.join(CONFIGS, f'{file}.py')) for name, file in
             (('bn', 'fashion_mnist_bn'), ('finetune', 'finetune_fashion_mnist'), ('scratch', 'default'))}
  configs['finetune'].init_from = os.path.join(workdir, 'converted')
  if smoke:
    for name, steps in SMOKE_STEPS.items():
      configs[name] = smoke_sized(configs[name], steps)
  return configs


def eval_batches(config: ml_collections.ConfigDict) -> Iterator[dict]:
  batches, _ = data.create_split(config.dataset, config.dataset.eval_split, config.eval_batch_size, train=False)
  return batches


@functools.partial(jax.jit, static_argnames='model')
def eval_sums(model: nn.Module, variables: dict, images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> dict[str, jax.Array]:
  """The batch's summed accuracy and loss, with running statistics ('eval_*') and with the batch's own
  ('batch_*', training mode: what the first fine-tuning steps see). The variables are an argument, not
  constants of the program: one compile serves every network of `model`'s architecture."""
  out = {}
  for mode, train in (('eval', False), ('batch', True)):
    logits = model.apply(variables, images, train=train, mutable=['batch_stats'] if train else False)
    logits = logits[0] if train else logits
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    out[f'{mode}_accuracy'] = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
    out[f'{mode}_loss'] = jnp.sum(loss * mask)
  return out


def evaluate(record: Pretrained, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Accuracy and loss on the eval split (`eval_sums`), without dropout."""
  model = record.model.clone(dropout_rate=0.0, drop_connect_rate=0.0)
  totals, count = {}, 0.0
  for batch in eval_batches(config):
    batch_sums = jax.device_get(eval_sums(model, record.variables, batch['image'], batch['label'], batch['mask']))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in batch_sums.items()}
    count += float(batch['mask'].sum())
  return {k: v / count for k, v in totals.items()}


def quietly(fn, *args) -> Any:
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def run_demo(workdir: str, smoke: bool = False) -> list[tuple[str, dict[str, float]]]:
  """Runs the four steps; returns the table's rows, (network, `evaluate`'s metrics), and writes
  workdir/table.md."""
  configs = demo_configs(workdir, smoke)
  say = lambda text: print(text, flush=True)
  say(f'1/4 BatchNorm run ({workdir}/bn)')
  quietly(train_and_evaluate, configs['bn'], os.path.join(workdir, 'bn'))
  bn = load_source(os.path.join(workdir, 'bn'))
  say('2/4 conversion to BW (MBConv type 2, head type 2) and calibration')
  before = configs['finetune'].copy_and_resolve_references()
  before.init_from, before.init_calibration_batches = os.path.join(workdir, 'bn'), 0
  uncalibrated = quietly(convert_and_calibrate, before, os.path.join(workdir, 'uncalibrated'))
  calibrating = before.copy_and_resolve_references()
  calibrating.init_calibration_batches = configs['finetune'].init_calibration_batches
  calibrated = quietly(convert_and_calibrate, calibrating, os.path.join(workdir, 'converted'))
  say(f'3/4 fine-tuning the calibrated network ({workdir}/finetune)')
  quietly(train_and_evaluate, configs['finetune'], os.path.join(workdir, 'finetune'))
  say(f'4/4 the BW main job from scratch ({workdir}/scratch)')
  quietly(train_and_evaluate, configs['scratch'], os.path.join(workdir, 'scratch'))
  n = calibrating.init_calibration_batches
  rows = [('BatchNorm network (configs/fashion_mnist_bn.py)', bn, configs['bn']),
          ('converted to BW, before calibration', uncalibrated, configs['finetune']),
          (f'converted to BW, calibrated on {n} batches', calibrated, configs['finetune']),
          ('after one epoch of fine-tuning', load_source(os.path.join(workdir, 'finetune')), configs['finetune']),
          ('BW main job from scratch (configs/default.py)', load_source(os.path.join(workdir, 'scratch')),
           configs['scratch'])]
  measured = [(label, evaluate(record, config)) for label, record, config in rows]
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(markdown_table(measured) + '\n')
  return measured


def markdown_table(rows: list[tuple[str, dict[str, float]]]) -> str:
  lines = ['| network | ' + ' | '.join(title for _, title in COLUMNS) + ' |', '|---' * (len(COLUMNS) + 1) + '|']
  lines += [f'| {label} | ' + ' | '.join(f'{metrics[key]:.4f}' for key, _ in COLUMNS) + ' |'
            for label, metrics in rows]
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='Folder for the four runs and table.md.')
  parser.add_argument('--smoke', action='store_true', help='A tiny model for a few steps (tests).')
  args = parser.parse_args()
  configure_cpu_dispatch()
  print(markdown_table(run_demo(args.workdir, args.smoke)))


if __name__ == '__main__':
  main()
