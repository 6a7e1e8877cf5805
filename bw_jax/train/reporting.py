"""What a run shows: the console progress line, TensorBoard's writer and hyperparameters, and the
compiled step's memory."""

from __future__ import annotations

import json
import os
import time
import types
from typing import Any

import flax
import jax
import ml_collections

from bw_jax.data import tf_imports
from bw_jax.extras import import_extra, import_on_first_use
from bw_jax.train.formatting import format_seconds


def _clu_metric_writers() -> types.ModuleType:
  tf_imports.tensorflow()  # clu writes through TensorFlow: hide the GPUs from it first.
  return import_extra('clu.metric_writers', __name__, 'train')


# Imported by the first writer: a train step (and memory_report) needs neither clu nor TensorFlow.
metric_writers = import_on_first_use('clu.metric_writers', _clu_metric_writers)


class Progress:
  """The console line: step, epoch, loss, accuracy, lr, images/s and ETA; images/s over the last window, the
  first step (compiling included) left out: call `first_step_done` once it has finished."""

  def __init__(self, num_train_steps: int, steps_per_epoch: int, batch_size: int, start_step: int):
    self.num_train_steps, self.steps_per_epoch, self.batch_size = num_train_steps, steps_per_epoch, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.rate: float | None = None

  def first_step_done(self, step: int) -> str:
    """Starts the images/s window after the first step; returns the line that says how long it took."""
    now = time.perf_counter()
    seconds, self.last_step, self.last_time = now - self.last_time, step, now
    return f'first step done in {format_seconds(seconds)} (compiling included); images/s count from here'

  def line(self, step: int, metrics: dict[str, float]) -> str:
    now = time.perf_counter()
    if step > self.last_step:  # Else only the first step ran since: keep the last rate (None: unknown yet).
      self.rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    speed = (f'{self.rate:.0f} images/s  ETA '
             f'{format_seconds((self.num_train_steps - step) * self.batch_size / max(self.rate, 1e-9))}'
             if self.rate is not None else 'images/s after the next steps')
    return (f'step {step}/{self.num_train_steps}  epoch {step / self.steps_per_epoch:.2f}  '
            f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
            f"lr {metrics['learning_rate']:.4g}  {speed}")


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
  """`config` flattened to 'model.bw.method'-style keys, the values TensorBoard's HParams plugin takes:
  tuples and lists as text; None left out (as text it would turn a key that is a number in other runs of a
  sweep into a text column)."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items() if v is not None}


def create_metric_writer(logdir: str) -> metric_writers.MetricWriter:
  """clu's TensorBoard writer on process 0 (event files in `logdir`); a writer of nothing on the other hosts,
  whose metrics are the same global values."""
  if jax.process_index() == 0:
    return metric_writers.SummaryWriter(logdir)
  return metric_writers.MultiWriter([])


def memory_report(compiled: Any) -> str:
  """Bytes of a compiled step per device, from XLA's `memory_analysis()`: arguments, outputs, temporaries,
  and the peak estimate arguments + outputs − aliased (donated) + temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return 'memory analysis: not available for this backend'
  sizes = {'arguments': analysis.argument_size_in_bytes, 'outputs': analysis.output_size_in_bytes,
           'aliased': analysis.alias_size_in_bytes, 'temporaries': analysis.temp_size_in_bytes,
           'code': analysis.generated_code_size_in_bytes}
  sizes['peak estimate'] = sizes['arguments'] + sizes['outputs'] - sizes['aliased'] + sizes['temporaries']
  return 'train step memory per device: ' + ', '.join(f'{k} {v / 2**30:.3f} GiB' for k, v in sizes.items())


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  """`workdir/summary.json` (process 0), replaced whole: a reader never sees half of one."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'summary.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(summary, f, indent=2)
    os.replace(path + '.tmp', path)


def divergence_summary(error: Exception, step: int, record: dict[str, Any]) -> dict[str, Any]:
  """The summary of a run stopped by its loss going non-finite or by too many BW fallbacks (`error`) at
  `step`: {'diverged': True, 'step', 'error': the error's class, 'reason': its message, 'config': `record`,
  the run's (`Plan.record`)}."""
  return {'diverged': True, 'step': step, 'error': type(error).__name__, 'reason': str(error), 'config': record}
