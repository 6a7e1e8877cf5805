"""Training and evaluation: `train_and_evaluate(config, workdir) -> summary` (docs/design.md §4).

`jax.jit` over a Mesh of all devices: each global batch is sharded on the `data` axis, so BN and BW
statistics are those of the global batch; the train state is replicated. Orbax checkpoints in
`workdir/checkpoints` hold the whole state; the step is also the data position (batches are a function of
the step), and dropout keys are `fold_in(seed key, step)`, so a resumed run repeats the uninterrupted one.
"""

import collections
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bw_jax import data
from bw_jax.train.checkpoints import Checkpoints, json_config, say
from bw_jax.train.config.validation import validate_config, with_global_batch_size
from bw_jax.data.on_device import normalise_images, prefetch_to_device, shard_batch
from bw_jax.train.health import bw_health, bw_health_report, bw_totals
from bw_jax.train.optim import (create_learning_rate_fn, create_optimizer, optimizer_from_rates, optimizer_rates,
                                schedule_lengths, schedule_problems)
from bw_jax.train.reporting import create_metric_writer, hyperparameters, memory_report, Progress
from bw_jax.train.step import (TrainState, create_model, eval_step, model_num_classes, run_dropout_key,
                               train_batch_spec, train_step)


def evaluate(eval_fn: Any, state: TrainState, config: ml_collections.ConfigDict,
             sharding: NamedSharding) -> dict[str, float]:
  """Loss and accuracy over the whole eval split (padded batches masked out), and the example count."""
  batches, _ = data.create_split(config.dataset, config.dataset.eval_split, eval_batch_size(config),
                                 train=False, normalise=False)
  totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in prefetch_to_device(batches, sharding):
    sums = jax.device_get(eval_fn(state, batch))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  count = totals['count']
  return {'loss': totals['loss'] / count, 'accuracy': totals['correct'] / count, 'count': int(count)}


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return config.batch_size if config.eval_batch_size is None else config.eval_batch_size


def initial_state(config: ml_collections.ConfigDict, model: Any, tx: Any, replicated: jax.sharding.Sharding
                  ) -> TrainState:
  """Fresh parameters and statistics from `config.seed`, replicated over the mesh."""
  return compiled_init(config, model, tx, replicated)(np.int32(config.seed))


def compiled_init(config: ml_collections.ConfigDict, model: Any, tx: Any, replicated: jax.sharding.Sharding
                  ) -> Callable[[np.int32], TrainState]:
  """The compiled init: seed (a NumPy int32, the same on every host) -> a fresh TrainState on `replicated`."""
  size, channels = config.dataset.image_size, data.dataset_module(config.dataset.name).INFO.image_shape[2]

  # The seed is an argument, not a constant of the program: one compiled init (persistent cache) serves every
  # seed of a comparison or sweep. The parameters are bit-identical to a constant seed's (checked by a test).
  @functools.partial(jax.jit, out_shardings=replicated)
  def init(seed):
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, channels)), train=False)
    params = variables['params']
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              batch_stats=variables.get('batch_stats', {}),
                              bw_health=variables.get('bw_health', {}),
                              ema_params=params if config.ema_decay > 0 else {})
    # A strongly typed step, as a restored one is: else a fresh and a resumed run trace two train steps.
    return state.replace(step=jnp.asarray(state.step, jnp.int32))
  cpu = next(iter(replicated.device_set)).platform == 'cpu'
  return init.lower(np.int32(0)).compile(compiler_options=CPU_INIT_COMPILER_OPTIONS if cpu else None)


# The init runs once, and its program is large (a threefry hash per parameter: ~17,500 lines for the smoke
# model): LLVM's -O1 compiles it in half the time of the default -O3 (3.3 s vs 6.3–7.4 s for the smoke model,
# measured) with bit-identical parameters (test_compare checks them against flax's own jitted init). -O0
# would be faster still but changes the parameters' last bits.
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


# Config keys that are not constants of any compiled program: how the host reads the data, the loop's
# intervals and checkpoints; the seed and the optimizer's rates (`optimizer_rates`), which are arguments of
# the init and of the train step. The run's length reaches the programs only through the learning-rate
# schedule's lengths, which `programs_key` holds instead. Every other key is part of the programs' identity:
# a key added to the schema is one until it is listed here.
KEYS_OUTSIDE_PROGRAMS = ('seed', 'learning_rate', 'weight_decay', 'num_train_steps', 'num_epochs',
                         'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                         'eval_batch_size', 'bw_max_fallbacks', 'resume_allow_changes', 'print_memory',
                         'dataset.data_dir', 'dataset.train_split', 'dataset.eval_split', 'dataset.shuffle_buffer',
                         'dataset.augment')
PROGRAMS_KEPT = 4  # Sets of programs a process keeps for its next runs (a sweep worker's next trials).


@dataclasses.dataclass(frozen=True)
class Programs:
  """What a run compiles, kept by `programs_for` for the process's later runs of the same programs (a sweep
  worker's trials, a test's runs): building them again costs seconds of tracing per run even when XLA's
  persistent cache holds the compiled code.

  `init(np.int32(seed)) -> TrainState`; `train_step(state, batch, dropout_key, optimizer_rates(config)) ->
  (state, metrics)` (donates the state); `eval_step(state, batch) -> sums`. Batches are sharded by
  `data_sharding`.
  """
  model: Any
  replicated: NamedSharding
  data_sharding: NamedSharding
  init: Callable[[np.int32], TrainState]
  train_step: Any
  eval_step: Any


_kept_programs: collections.OrderedDict[str, Programs] = collections.OrderedDict()


def programs_key(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                 num_train_steps: int) -> str:
  """The identity of `config`'s programs: its keys but KEYS_OUTSIDE_PROGRAMS, the class count, the schedule's
  lengths (`schedule_lengths`: a run of 3 steps and one of 6 share a staircase schedule) and the devices."""
  flat = flax.traverse_util.flatten_dict(json_config(config), sep='.')
  kept = {k: v for k, v in flat.items()
          if not any(k == outside or k.startswith(outside + '.') for outside in KEYS_OUTSIDE_PROGRAMS)}
  lengths = schedule_lengths(config, steps_per_epoch, num_train_steps)
  return json.dumps([kept, num_classes, lengths, [d.id for d in jax.devices()]], sort_keys=True)


def programs_for(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                 num_train_steps: int) -> Programs:
  """`config`'s programs over a mesh of all devices: built on first use, then kept (the last PROGRAMS_KEPT)."""
  key = programs_key(config, num_classes, steps_per_epoch, num_train_steps)
  if key in _kept_programs:
    _kept_programs.move_to_end(key)
    return _kept_programs[key]
  mesh = Mesh(jax.devices(), ('data',))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  config = ml_collections.FrozenConfigDict(config)  # Kept: a caller's later edits must not reach it.
  model = create_model(config, num_classes)
  info = data.dataset_module(config.dataset.name).INFO
  normalise = functools.partial(normalise_images, mean=info.mean, std=info.std)  # On the device.
  train_fn = jax.jit(
      functools.partial(train_step, model=model, num_classes=num_classes, label_smoothing=config.label_smoothing,
                        ema_decay=config.ema_decay, normalise=normalise, optimizer_from_rates=functools.partial(
                            optimizer_from_rates, config, steps_per_epoch, num_train_steps)),
      in_shardings=(replicated, data_sharding, replicated, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes,
                                      use_ema=config.ema_decay > 0, normalise=normalise),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)
  # The optimizer state's structure: the rates of the first run's config do not matter.
  tx = create_optimizer(config, create_learning_rate_fn(config, steps_per_epoch, num_train_steps))
  init = compiled_init(config, model, tx, replicated)
  _kept_programs[key] = Programs(model, replicated, data_sharding, init, train_fn, eval_fn)
  while len(_kept_programs) > PROGRAMS_KEPT:
    _kept_programs.popitem(last=False)
  return _kept_programs[key]


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
  """The training loss went NaN or infinite (the message says at which step and what to change)."""


def non_finite_error(what: str, step: int, config: ml_collections.ConfigDict,
                     last_checkpoint: int | None) -> NonFiniteLossError:
  kept = (f'the last good checkpoint (step {last_checkpoint}) is kept' if last_checkpoint is not None
          else 'no checkpoint was written')
  return NonFiniteLossError(
      f'{what} at step {step}; {kept}. Lower config.learning_rate (now {config.learning_rate}), lengthen '
      f'config.warmup_epochs (now {config.warmup_epochs}) or raise config.model.bw.epsilon (now '
      f'{config.model.bw.epsilon}) if a BW layer went singular.')


def check_finite(window: list[tuple[int, dict]], config: ml_collections.ConfigDict,
                 last_checkpoint: int | None) -> None:
  """Raises at the first step of the window whose training loss is NaN or infinite."""
  for step, metrics in window:
    if not np.isfinite(metrics['loss']):
      raise non_finite_error(f"Training loss is {metrics['loss']}", step, config, last_checkpoint)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def training_length(config: ml_collections.ConfigDict, num_examples: int | None = None) -> tuple[int, int]:
  """(steps per epoch, total steps): `num_train_steps` when > 0, else `num_epochs` of the train split, whose
  length is `num_examples` (default: counted in the data that will be read, `data.split_size`)."""
  if num_examples is None:
    num_examples = data.split_size(config.dataset, config.dataset.train_split)
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the {num_examples} examples of '
                     f'{config.dataset.name} split {config.dataset.train_split!r}; use at most {num_examples}.')
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, int(round(config.num_epochs * steps_per_epoch))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
  """Trains `config`'s model, resuming from the latest checkpoint in `workdir`; returns the summary that is
  also written to `workdir/summary.json` (or {'preempted': True, 'step': …, 'signal': 'SIGTERM' or 'SIGINT'}
  after a SIGTERM or a first Ctrl-C; a second Ctrl-C raises KeyboardInterrupt).

  `on_eval(step, {'loss', 'accuracy', 'count'})` runs after each periodic eval (the sweep's pruner); an
  exception it raises ends training with the checkpoints already written intact.
  """
  start_time = time.perf_counter()
  config = with_global_batch_size(config)
  validate_config(config)
  # The data that will be read, counted before anything is built: missing data fails here, leaving no workdir.
  num_examples = data.split_size(config.dataset, config.dataset.train_split)
  num_classes = model_num_classes(config, data.class_count(config.dataset))
  steps_per_epoch, num_train_steps = training_length(config, num_examples)
  eval_examples = data.split_size(config.dataset, config.dataset.eval_split)
  if eval_examples < 1:
    raise ValueError(f'config.dataset.eval_split={config.dataset.eval_split!r} holds no examples of '
                     f'{config.dataset.name}; name a split or a non-empty slice of one (e.g. '
                     f"'{config.dataset.eval_split.split('[')[0]}[:2000]').")
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  if jax.process_index() == 0:
    print(f'{config.dataset.name} split {config.dataset.train_split!r}: {num_examples} examples, '
          f'{num_classes} classes; {steps_per_epoch} steps of {config.batch_size} per epoch, '
          f'{num_train_steps} steps ({num_train_steps / steps_per_epoch:.3g} epochs); eval on '
          f'{config.dataset.eval_split!r}: {eval_examples} examples', flush=True)
    for problem in schedule_problems(config, steps_per_epoch, num_train_steps):
      print(f'Warning: {problem}', flush=True)
  os.makedirs(workdir, exist_ok=True)

  # Before compiling anything: creating the manager is the hosts' first collective (Orbax syncs them), and
  # gloo (CPU) gives up on a host that joins its first collective over 30 s late, as one compiling longer can.
  checkpoints = Checkpoints(os.path.join(os.path.abspath(workdir), 'checkpoints'), config)
  programs = programs_for(config, num_classes, steps_per_epoch, num_train_steps)
  replicated, data_sharding = programs.replicated, programs.data_sharding
  train_fn, eval_fn = programs.train_step, programs.eval_step
  state = checkpoints.restore_latest(programs.init(np.int32(config.seed)))
  start_step = int(state.step)
  dropout_key, rates = run_dropout_key(config.seed, replicated), optimizer_rates(config)
  if config.print_memory:  # Compiles the step once more, ahead of training: off by default.
    size = config.dataset.image_size
    channels = data.dataset_module(config.dataset.name).INFO.image_shape[2]
    batch_spec = train_batch_spec(config.batch_size, (size, size, channels), data_sharding)
    report = memory_report(train_fn.lower(state, batch_spec, dropout_key, rates).compile())
    if jax.process_index() == 0:
      print(report, flush=True)
  writer = create_metric_writer(workdir)
  writer.write_hparams(hyperparameters(config))  # TensorBoard's HParams tab lists the run's settings.
  train_batches: Iterator[dict] = prefetch_to_device(data.create_split(
      config.dataset, config.dataset.train_split, config.batch_size, train=True, seed=config.seed,
      start_batch=start_step, normalise=False)[0], data_sharding)

  progress = Progress(num_train_steps, steps_per_epoch, config.batch_size, start_step)
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
    eval_metrics = evaluate(eval_fn, state, config, data_sharding)
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
  if jax.process_index() == 0 and start_step < num_train_steps:
    print(f'Compiling the train step, then step {start_step + 1} (minutes for a large model on a CPU) …',
          flush=True)
  try:
    for step in range(start_step + 1, num_train_steps + 1):
      state, metrics = train_fn(state, next(train_batches), dropout_key, rates)
      window.append((step, metrics))
      if steady_start is None:  # Compile and the first step are not steady state.
        jax.block_until_ready(state)
        steady_start = time.perf_counter()
        if jax.process_index() == 0:
          print(progress.first_step_done(step), flush=True)
      else:
        steady_steps += 1
      if step % config.log_every_steps == 0 or step == num_train_steps:
        means = flush_window()
        writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
        if jax.process_index() == 0:
          print(progress.line(step, means), flush=True)
      checkpoint_now = step % config.checkpoint_every_steps == 0 or step == num_train_steps
      eval_now = step % eval_every == 0 or step == num_train_steps
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
  finally:
    preemption.close()  # First: a failing close below must not leave this run's handler installed.
    try:
      writer.close()
    finally:
      checkpoints.close()

  steady_seconds = (time.perf_counter() - steady_start - excluded) if steady_start else 0.0
  health = bw_health(state.batch_stats, state.bw_health)
  summary = {
      'eval_accuracy': eval_metrics['accuracy'], 'eval_loss': eval_metrics['loss'],
      'eval_examples': eval_metrics['count'], 'step': int(state.step),
      'epochs': int(state.step) / steps_per_epoch,
      'train_images_per_sec': steady_steps * config.batch_size / steady_seconds if steady_steps else None,
      'wall_seconds': time.perf_counter() - start_time,
      'bw_max_cov_condition': bw_totals(health)[1],
      'bw_fallbacks': bw_totals(health)[0],
      'num_classes': num_classes, 'train_examples': num_examples,
      'config': config.to_dict(),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
