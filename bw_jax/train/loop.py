"""Training and evaluation: `train_and_evaluate(config, workdir) -> summary` (docs/design.md §4).

The config is resolved once into a `Plan` (bw_jax/train/plan.py), which the loop reads. Its programs
(`programs.programs_for(plan)`) are `jax.jit` over a Mesh of all devices: each global batch is sharded on the
`data` axis, so BN and BW statistics are those of the global batch; the train state is replicated. Orbax checkpoints in
`workdir/checkpoints` hold the whole state; the step is also the data position (batches are a function of
the step), and dropout keys are `fold_in(seed key, step)`, so a resumed run repeats the uninterrupted one.
"""

import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bw_jax import data
from bw_jax.data.on_device import prefetch_to_device
from bw_jax.train.checkpoints import Checkpoints, say
from bw_jax.train.health import BWHealthError, bw_health, bw_health_report, bw_totals
from bw_jax.train.init_from import start_from
from bw_jax.train.optim import optimizer_rates
from bw_jax.train.plan import Plan, resolve_plan
from bw_jax.train.programs import programs_for
from bw_jax.train.reporting import (create_metric_writer, divergence_summary, hyperparameters, memory_report,
                                    Progress, write_summary)
from bw_jax.train.step import TrainState, run_dropout_key, train_batch_spec
from bw_jax.train.workdir import hold_workdir, make_workdir


def evaluate(eval_fn: Any, state: TrainState, plan: Plan, examples: Any, sharding: NamedSharding
             ) -> dict[str, float]:
  """Loss and accuracy over the whole eval split (`examples`, opened by `data.open_split`; padded batches
  masked out), and the example count."""
  dataset = plan.config.dataset
  batches, _ = data.create_split(dataset, dataset.eval_split, plan.eval_batch, train=False, normalise=False,
                                 examples=examples)
  totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in prefetch_to_device(batches, sharding):
    sums = jax.device_get(eval_fn(state, batch))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  count = totals['count']
  return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count, 'count': int(count)}


class PreemptionNotice:
  """Says at which step to save and stop after a SIGTERM or a Ctrl-C (SIGINT); ask at every step.

  One process: a Python handler raises a flag, seen at the next step; after a first Ctrl-C, a second one
  raises KeyboardInterrupt at once (no save). Several processes: the hosts must save the same step, and a
  scheduler may signal only some of them, so JAX's preemption service (started by `jax.distributed.initialize`,
  it catches SIGTERM itself) agrees on the step in the background and `reached_preemption_sync_point` turns
  true on every host at that step; no Python SIGTERM handler then, which would take the signal from it.
  """

  def __init__(self, manager: ocp.CheckpointManager, start_step: int):
    """Call it as soon as the run knows `start_step` (restored): the service's step counter starts at 0, so
    a notice handled before the first question would pick step 1, which a resumed run never asks about."""
    self._manager, self._flag, self._previous = manager, threading.Event(), {}
    self._multihost = jax.process_count() > 1
    self.signal_name = 'SIGTERM'
    if self._multihost:
      if manager.reached_preemption(start_step):  # Every host asks about the same step: all agree.
        self._flag.set()
    elif threading.current_thread() is threading.main_thread():
      self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._notice),
                        signal.SIGINT: signal.signal(signal.SIGINT, self._notice)}

  def _notice(self, signum: int, _) -> None:
    self.signal_name = signal.Signals(signum).name
    self._flag.set()
    if signum == signal.SIGINT:  # The next Ctrl-C interrupts at once.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      os.write(2, b'\nCtrl-C: saving a checkpoint at this step, then stopping (Ctrl-C again to stop at once '
                  b'without saving).\n')

  def reached(self, step: int) -> bool:
    if self._multihost:
      return self._manager.reached_preemption(step) or self._flag.is_set()
    return self._flag.is_set()

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class NonFiniteLossError(RuntimeError):
  """The training loss went NaN or infinite at step `step` (the message says what to change)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def non_finite_error(what: str, step: int, config: ml_collections.ConfigDict,
                     last_checkpoint: int | None) -> NonFiniteLossError:
  kept = (f'the last good checkpoint (step {last_checkpoint}) is kept' if last_checkpoint is not None
          else 'no checkpoint was written')
  return NonFiniteLossError(
      f'{what} at step {step}; {kept}. Lower config.learning_rate (now {config.learning_rate}), lengthen '
      f'config.warmup_epochs (now {config.warmup_epochs}) or raise config.model.bw.epsilon (now '
      f'{config.model.bw.epsilon}) if a BW layer went singular.', step)


def check_finite(window: list[tuple[int, dict]], config: ml_collections.ConfigDict,
                 last_checkpoint: int | None) -> None:
  """Raises at the first step of the window whose training loss is NaN or infinite."""
  for step, metrics in window:
    if not np.isfinite(metrics['loss']):
      raise non_finite_error(f"Training loss is {metrics['loss']}", step, config, last_checkpoint)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def length_setting(config: Any) -> str:
  return (f'num_train_steps={config.num_train_steps}' if config.num_train_steps > 0
          else f'num_epochs={config.num_epochs}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
  """Trains `config`'s model, resuming from the latest checkpoint in `workdir`; returns the summary that is
  also written to `workdir/summary.json` (or {'preempted': True, 'step': …, 'signal': 'SIGTERM' or 'SIGINT'}
  after a SIGTERM or a first Ctrl-C; a second Ctrl-C raises KeyboardInterrupt).

  The config is resolved first (`resolve_plan`: validated, its data counted), before anything is built or
  written. `on_eval(step, {'loss', 'accuracy', 'count'})` runs after each periodic eval (the sweep's pruner);
  an exception it raises ends training with the checkpoints already written intact.
  """
  start_time = time.perf_counter()
  return train_plan(resolve_plan(config), workdir, on_eval, start_time)


def train_plan(plan: Plan, workdir: str, on_eval: Callable[[int, dict[str, float]], None] | None = None,
               start_time: float | None = None) -> dict[str, Any]:
  """`train_and_evaluate` of a resolved plan (`start_time`: when the run began, for the summary's wall time)."""
  start_time = time.perf_counter() if start_time is None else start_time
  config = plan.config
  if jax.process_index() == 0:
    print(plan.describe(), flush=True)
    for problem in plan.problems():
      print(f'Warning: {problem}', flush=True)
  # The data opened (a file read whole is checked whole) before anything is written: bad data leaves no workdir.
  train_examples = data.open_split(config.dataset, config.dataset.train_split)
  eval_examples = data.open_split(config.dataset, config.dataset.eval_split)
  make_workdir(workdir)
  with hold_workdir(workdir):  # One run at a time: from its first write there to its summary.
    return train_in_workdir(plan, workdir, on_eval, start_time, train_examples, eval_examples)


def train_in_workdir(plan: Plan, workdir: str, on_eval: Callable[[int, dict[str, float]], None] | None,
                     start_time: float, train_examples: Any, eval_examples: Any) -> dict[str, Any]:
  """`train_plan` once the splits are open (`data.open_split`) and this process holds `workdir`
  (`hold_workdir`)."""
  config = plan.config
  # Before compiling anything: creating the manager is the hosts' first collective (Orbax syncs them), and
  # gloo (CPU) gives up on a host that joins its first collective over 30 s late, as one compiling longer can.
  checkpoints = Checkpoints(os.path.join(os.path.abspath(workdir), 'checkpoints'), plan)
  programs = programs_for(plan)
  replicated, data_sharding = programs.replicated, programs.data_sharding
  train_fn, eval_fn = programs.train_step, programs.eval_step
  state = checkpoints.restore_latest(programs.init(np.int32(config.seed)))
  start_step = int(state.step)
  if config.init_from and start_step == 0:  # A fresh run starts from the trained network; a resumed one not.
    state = start_from(plan, state, programs.model, replicated, data_sharding)
  if start_step > plan.num_train_steps:
    say(f'The checkpoint of step {start_step} is past this run\'s {plan.num_train_steps} steps '
        f'({length_setting(config)}): nothing trains; step {start_step} is evaluated and recorded as the run.')
  dropout_key = run_dropout_key(config.seed, replicated)
  rates = optimizer_rates(plan.peak_learning_rate, config.weight_decay)
  if config.print_memory:  # Compiles the step once more, ahead of training: off by default.
    batch_spec = train_batch_spec(plan.global_batch, plan.image_shape, data_sharding)
    report = memory_report(train_fn.lower(state, batch_spec, dropout_key, rates).compile())
    if jax.process_index() == 0:
      print(report, flush=True)
  writer = create_metric_writer(workdir)
  # TensorBoard's HParams tab lists the run's settings.
  writer.write_hparams(hyperparameters(ml_collections.ConfigDict(plan.record())))
  train_batches: Iterator[dict] = prefetch_to_device(data.create_split(
      config.dataset, config.dataset.train_split, plan.global_batch, train=True, seed=config.seed,
      start_batch=start_step, normalise=False, examples=train_examples)[0], data_sharding)

  progress = Progress(plan.num_train_steps, plan.steps_per_epoch, plan.global_batch, start_step)
  window: list[tuple[int, Any]] = []
  last_checkpoint = checkpoints.manager.latest_step()
  steady_start, steady_steps, excluded = None, 0, 0.0
  eval_metrics: dict[str, float] = {}
  # The eval lines warn when the fallbacks grow.
  fallbacks_seen = bw_totals(bw_health(state.batch_stats, state.bw_health))[0]

  def fetch_window() -> list[tuple[int, dict]]:
    """The window's metrics on the host (each step's fetched once), checked finite."""
    window[:] = [(s, jax.device_get(m)) for s, m in window]
    check_finite(window, config, last_checkpoint)
    return window

  def flush_window() -> dict[str, float]:
    """The means over every step since the last log line; starts the next window."""
    fetched = list(fetch_window())
    window.clear()
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]} if fetched else {}

  def save() -> None:
    nonlocal last_checkpoint
    # Never checkpoint a state whose loss went non-finite, nor one whose last update did (a step's loss is
    # taken before its update). The window stays: the next log line shows the mean of all its steps.
    fetch_window()
    if not all_finite(state.params):
      raise non_finite_error('The parameters became non-finite', int(state.step), config, last_checkpoint)
    checkpoints.save(state)
    last_checkpoint = int(state.step)

  def evaluate_and_report(step: int) -> dict[str, float]:
    """Evaluates `state`; writes eval/* and bw_health/*, prints the eval line, calls `on_eval`."""
    nonlocal fallbacks_seen
    eval_metrics = evaluate(eval_fn, state, plan, eval_examples, data_sharding)
    health = bw_health(state.batch_stats, state.bw_health)
    writer.write_scalars(step, {**{f'eval/{k}': v for k, v in eval_metrics.items()},
                                **{f'bw_health/{k}': v for k, v in health.items()}})
    health_text, health_warning = bw_health_report(health, fallbacks_seen, config.bw_max_fallbacks)
    fallbacks_seen = bw_totals(health)[0]
    if jax.process_index() == 0:
      print(f"eval step {step}: loss {eval_metrics['loss']:.4f}  accuracy "
            f"{eval_metrics['accuracy']:.4f} on {eval_metrics['count']} examples  {health_text}".rstrip(),
            flush=True)
    if health_warning:
      say(health_warning)
    if on_eval is not None:
      on_eval(step, eval_metrics)
    return eval_metrics

  preemption = PreemptionNotice(checkpoints.manager, start_step)  # Before compiling the steps.
  if jax.process_index() == 0 and start_step < plan.num_train_steps:
    print(f'Compiling the train step, then step {start_step + 1} (minutes for a large model on a CPU) …',
          flush=True)
  try:
    for step in range(start_step + 1, plan.num_train_steps + 1):
      state, metrics = train_fn(state, next(train_batches), dropout_key, rates)
      window.append((step, metrics))
      if steady_start is None:  # Compile and the first step are not steady state.
        jax.block_until_ready(state)
        steady_start = time.perf_counter()
        if jax.process_index() == 0:
          print(progress.first_step_done(step), flush=True)
      else:
        steady_steps += 1
      last = step == plan.num_train_steps
      if step % plan.log_every_steps == 0 or last:
        means = flush_window()
        writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
        if jax.process_index() == 0:
          print(progress.line(step, means), flush=True)
      checkpoint_now = step % plan.checkpoint_every_steps == 0 or last
      eval_now = step % plan.eval_every_steps == 0 or last
      preempted = preemption.reached(step)
      if not (checkpoint_now or eval_now or preempted):
        continue
      # Steps run asynchronously: wait for them, so that their time counts as training and only the
      # checkpoint and eval that follow are left out of the images/s.
      jax.block_until_ready(state)
      paused = time.perf_counter()
      if checkpoint_now or preempted:
        save()
      if preempted:
        logging.warning('%s: saved the checkpoint of step %d; exiting.', preemption.signal_name, step)
        return {'preempted': True, 'step': step, 'signal': preemption.signal_name}
      if eval_now:
        eval_metrics = evaluate_and_report(step)
      excluded += time.perf_counter() - paused
    if not eval_metrics:  # Resumed at the last step (killed before its eval): nothing trains, still evaluate.
      eval_metrics = evaluate_and_report(int(state.step))
  except (NonFiniteLossError, BWHealthError) as e:  # A result of the config's values: summary.json says so.
    write_summary(workdir, divergence_summary(e, getattr(e, 'step', None) or int(state.step), plan.record()))
    raise
  finally:
    preemption.close()  # First: a failing close below must not leave this run's handler installed.
    try:
      writer.close()
    finally:
      checkpoints.close()

  steady_seconds = (time.perf_counter() - steady_start - excluded) if steady_start else 0.0
  health = bw_health(state.batch_stats, state.bw_health)
  step = int(state.step)
  record = plan.record()
  if step > plan.num_train_steps:  # Restored past this run's end: the state trained for `step` steps.
    record['num_train_steps'] = step
  summary = {
      'eval_accuracy': eval_metrics['accuracy'], 'eval_loss': eval_metrics['loss'],
      'eval_examples': eval_metrics['count'], 'step': step, 'epochs': step / plan.steps_per_epoch,
      'train_images_per_sec': steady_steps * plan.global_batch / steady_seconds if steady_steps else None,
      'wall_seconds': time.perf_counter() - start_time,
      'bw_max_cov_condition': bw_totals(health)[1],
      'bw_fallbacks': bw_totals(health)[0],
      'num_classes': plan.num_classes, 'train_examples': plan.train_examples,
      'config': record,
  }
  write_summary(workdir, summary)
  return summary
