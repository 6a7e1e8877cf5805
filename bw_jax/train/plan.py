"""A run's plan: its config validated and resolved once, before anything is built or written, into every size
and length the run uses (`Plan`). The loop, the optimizer's schedule, evaluation, checkpoints and the sweeps
read the plan; none of them derives a size from the config again.

`resolve_plan(config)` validates the config, counts the data where it will be read and derives the plan;
`plan_for(config, counts)` is the derivation alone (no data read), for data counted elsewhere (a sweep
trial's recorded sizes).
"""

import dataclasses
import json
from typing import Any

import jax
import ml_collections

from bw_jax import data
from bw_jax.train.config.validation import global_batch_size, validate_config
from bw_jax.train.optim import Schedule, peak_learning_rate
from bw_jax.train.step import model_num_classes


@dataclasses.dataclass(frozen=True)
class DataCounts:
  """What the data holds, counted in the files the run will read (slices and partial copies included)."""
  train_examples: int
  eval_examples: int
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run derives from its config (the config itself as given, validated and frozen).

  Steps are counted in global batches; `schedule` is the learning-rate schedule but its peak
  (`peak_learning_rate`, for the global batch), `staircase_steps` the period of a staircase decay (the
  schedule's when it is one); `eval_every_steps` is resolved (-1: once per epoch).
  """
  config: ml_collections.FrozenConfigDict
  device_count: int
  global_batch: int
  eval_batch: int
  train_examples: int
  eval_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  steps_per_epoch: int
  num_train_steps: int
  warmup_steps: int
  staircase_steps: int
  schedule: Schedule
  peak_learning_rate: float
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int

  def record(self) -> dict[str, Any]:
    """The config as the run records it (checkpoints/config.json, summary.json, TensorBoard's HParams), with
    JSON values: `batch_size` is the global batch, also when `batch_size_per_device` sets it."""
    record = json.loads(json.dumps(self.config.to_dict()))
    record['batch_size'] = self.global_batch
    return record

  def problems(self) -> list[str]:
    """Why the learning-rate schedule cannot run its course within the run (empty when it can): a warm-up
    that never reaches the peak, or a staircase decay that never takes a step."""
    config, total = self.config, self.num_train_steps
    length = f'{total} steps ({self.steps_per_epoch} per epoch)'
    if self.warmup_steps >= total:
      given = (f'warmup_fraction={config.warmup_fraction}' if config.warmup_fraction is not None
               else f'warmup_epochs={config.warmup_epochs}')
      return [f'the warm-up ({given}: {self.warmup_steps} steps) does not finish within the {length}, so the '
              'rate never reaches its peak; set warmup_fraction (e.g. 0.05) or fewer warmup_epochs.']
    if config.lr_schedule == 'exponential' and total - self.warmup_steps < self.staircase_steps:
      return [f"the 'exponential' schedule decays every {self.staircase_steps} steps (decay_epochs="
              f'{config.decay_epochs}), but only {total - self.warmup_steps} of the {length} follow the warm-up: '
              "it never decays; lower decay_epochs or use lr_schedule='cosine'."]
    return []

  def describe(self) -> str:
    """The compact block a run prints at start."""
    config, dataset = self.config, self.config.dataset
    per_device = config.batch_size_per_device
    batch = f'{self.global_batch} images' + (f' ({per_device} per device × {self.device_count})'
                                              if per_device is not None else '')
    warmup = f'warm-up {self.warmup_steps} steps' if self.warmup_steps else 'no warm-up'
    decay = ('cosine to 0' if self.schedule.kind == 'cosine'
             else f'×{self.schedule.decay_rate:g} every {self.schedule.decay_steps} steps')
    return '\n'.join([
        f'Plan: {dataset.name} {dataset.train_split!r}: {self.train_examples} examples, {self.num_classes} '
        f'classes; eval on {dataset.eval_split!r}: {self.eval_examples} examples in batches of {self.eval_batch}',
        f'  {self.num_train_steps} steps of {batch} ({self.num_train_steps / self.steps_per_epoch:.3g} '
        f"epochs of {self.steps_per_epoch} steps) on {self.device_count} device{'s' if self.device_count > 1 else ''}",
        f'  {config.optimizer}, peak learning rate {self.peak_learning_rate:.4g} ({config.learning_rate:g} per 256 '
        f'images), {warmup}, then {decay}',
        f'  log every {self.log_every_steps} steps, eval every {self.eval_every_steps} and at the end, checkpoint '
        f'every {self.checkpoint_every_steps} (keep {config.keep_checkpoints})'])


def count_data(config: ml_collections.ConfigDict) -> DataCounts:
  """The examples and classes of the data `config` reads. Missing data raises (with instructions), as does an
  empty eval split."""
  dataset = config.dataset
  counts = DataCounts(data.split_size(dataset, dataset.train_split), data.split_size(dataset, dataset.eval_split),
                      data.class_count(dataset))
  if counts.eval_examples < 1:
    raise ValueError(f'config.dataset.eval_split={dataset.eval_split!r} holds no examples of {dataset.name}; name a '
                     f"split or a non-empty slice of one (e.g. '{dataset.eval_split.split('[')[0]}[:2000]').")
  return counts


def schedule_steps(config: Any, steps_per_epoch: int, num_train_steps: int) -> tuple[int, int]:
  """(warm-up steps, staircase period): `warmup_fraction` of the run when set, else `warmup_epochs` of real
  epochs; `decay_epochs` of real epochs (at least 1 step)."""
  if config.warmup_fraction is not None:
    warmup = int(round(config.warmup_fraction * num_train_steps))
  else:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return warmup, max(1, int(round(config.decay_epochs * steps_per_epoch)))


def plan_for(config: ml_collections.ConfigDict, counts: DataCounts, device_count: int | None = None) -> Plan:
  """The plan of a valid `config` on data holding `counts`, over `device_count` devices (default: all of
  `jax.device_count()`). Raises a ValueError when the data cannot hold the run (a batch larger than the split,
  a class count other than config.model.num_classes)."""
  device_count = jax.device_count() if device_count is None else device_count
  global_batch = global_batch_size(config, device_count)
  dataset = config.dataset
  steps_per_epoch = counts.train_examples // global_batch
  if steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={global_batch} is larger than the {counts.train_examples} examples of '
                     f'{dataset.name} split {dataset.train_split!r}; use at most {counts.train_examples}.')
  num_train_steps = (config.num_train_steps if config.num_train_steps > 0
                     else int(round(config.num_epochs * steps_per_epoch)))
  warmup, staircase = schedule_steps(config, steps_per_epoch, num_train_steps)
  if config.lr_schedule == 'cosine':
    schedule = Schedule('cosine', warmup, max(1, num_train_steps - warmup))
  else:
    schedule = Schedule('exponential', warmup, staircase, config.decay_rate)
  channels = data.dataset_module(dataset.name).INFO.image_shape[2]
  return Plan(
      config=ml_collections.FrozenConfigDict(config), device_count=device_count, global_batch=global_batch,
      eval_batch=global_batch if config.eval_batch_size is None else config.eval_batch_size,
      train_examples=counts.train_examples, eval_examples=counts.eval_examples,
      num_classes=model_num_classes(config, counts.num_classes),
      image_shape=(dataset.image_size, dataset.image_size, channels), steps_per_epoch=steps_per_epoch,
      num_train_steps=num_train_steps, warmup_steps=warmup, staircase_steps=staircase, schedule=schedule,
      peak_learning_rate=peak_learning_rate(config.learning_rate, global_batch),
      log_every_steps=config.log_every_steps,
      eval_every_steps=config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch,
      checkpoint_every_steps=config.checkpoint_every_steps)


def resolve_plan(config: ml_collections.ConfigDict) -> Plan:
  """Validates `config`, counts its data and derives the run's plan: every error here comes before anything
  is built or written."""
  validate_config(config)
  return plan_for(config, count_data(config))
