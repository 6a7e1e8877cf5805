"""Pieces of the training loop that are pure enough to test alone: model, optimizer, schedule, loss,
train state, BW health and the progress line. `bw_jax/train/loop.py` wires them together."""

import time
from typing import Any

from clu import metric_writers
from flax.training import train_state
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bw_jax.models.efficientnet import EfficientNet
from bw_jax.train.formatting import format_seconds
from bw_jax.nn.whitening import BWSettings


class TrainState(train_state.TrainState):
  """params, opt_state and step (Flax's), plus the normalisation statistics, the weight EMA and BW's
  health counters (the `bw_health` collection; {} for a model without BW)."""
  batch_stats: Any
  ema_params: Any
  bw_health: Any = flax.struct.field(default_factory=dict)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> EfficientNet:
  """The EfficientNet of `config.model` (its `num_classes` when set, else the dataset's)."""
  fields = config.model.to_dict()
  fields['bw'] = BWSettings(**fields['bw'])
  if fields['num_classes'] is None:
    fields['num_classes'] = num_classes
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  return EfficientNet(**fields, dtype=dtype)


def model_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> int:
  """The head's class count: the prepared dataset's `dataset_classes`, which `config.model.num_classes` must
  equal when set (a 200-way head on 10 classes would train, silently, towards the wrong chance level)."""
  wanted = config.model.num_classes
  if wanted is not None and wanted != dataset_classes:
    raise ValueError(f'config.model.num_classes={wanted}, but the prepared {config.dataset.name} data has '
                     f'{dataset_classes} classes; set it to {dataset_classes} or leave it None (the data\'s).')
  return dataset_classes


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`learning_rate` is per 256 images: linear scaling to the global batch."""
  return config.learning_rate * config.batch_size / 256


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int) -> int:
  """Steps of linear warm-up: `warmup_fraction` of the run when set, else `warmup_epochs` of real epochs."""
  if config.warmup_fraction is not None:
    return int(round(config.warmup_fraction * num_train_steps))
  return int(round(config.warmup_epochs * steps_per_epoch))


def decay_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """'exponential': steps between two multiplications by `decay_rate`."""
  return max(1, int(round(config.decay_epochs * steps_per_epoch)))


def schedule_lengths(config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
                     ) -> tuple[int, int]:
  """(warm-up steps, decay steps): the steps of the cosine after the warm-up, or the staircase's period.
  With the config's rates, all that the run's length changes in the schedule."""
  warmup = warmup_steps(config, steps_per_epoch, num_train_steps)
  if config.lr_schedule == 'cosine':
    return warmup, max(1, num_train_steps - warmup)
  return warmup, decay_steps(config, steps_per_epoch)


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                            num_train_steps: int, peak: Any = None) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine to 0 at `num_train_steps` or TF's staircase exponential.
  `peak`: None for `peak_learning_rate(config)`, or a value (a traced scalar: see `optimizer_from_rates`)."""
  peak = peak_learning_rate(config) if peak is None else peak
  warmup, decay_length = schedule_lengths(config, steps_per_epoch, num_train_steps)
  if config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_length)
  else:
    decay = optax.exponential_decay(peak, decay_length, config.decay_rate, staircase=True)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def schedule_problems(config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
                      ) -> list[str]:
  """Why the learning-rate schedule cannot run its course within `num_train_steps` (empty when it can): a
  warm-up that never reaches the peak, or a staircase decay that never takes a step."""
  problems = []
  warmup = warmup_steps(config, steps_per_epoch, num_train_steps)
  length = f'{num_train_steps} steps ({steps_per_epoch} per epoch)'
  if warmup >= num_train_steps:
    given = (f'warmup_fraction={config.warmup_fraction}' if config.warmup_fraction is not None
             else f'warmup_epochs={config.warmup_epochs}')
    problems.append(f'the warm-up ({given}: {warmup} steps) does not finish within the {length}, so the '
                    'rate never reaches its peak; set warmup_fraction (e.g. 0.05) or fewer warmup_epochs.')
  elif config.lr_schedule == 'exponential' and num_train_steps - warmup < decay_steps(config, steps_per_epoch):
    problems.append(f"the 'exponential' schedule decays every {decay_steps(config, steps_per_epoch)} steps "
                    f'(decay_epochs={config.decay_epochs}), but only {num_train_steps - warmup} of the {length} '
                    "follow the warm-up: it never decays; lower decay_epochs or use lr_schedule='cosine'.")
  return problems


def decay_mask(params: Any) -> Any:
  """True for conv / dense kernels (ndim > 1); normalisation parameters and biases (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                     weight_decay: Any = None) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer`; weight decay (`config.weight_decay` unless given) is L2 added to the
  gradient (as in TF's EfficientNet) except for adamw, where it is decoupled."""
  weight_decay = config.weight_decay if weight_decay is None else weight_decay
  if config.optimizer == 'adamw':
    return optax.adamw(learning_rate_fn, b1=config.momentum, weight_decay=weight_decay,
                       mask=decay_mask)
  if config.optimizer == 'rmsprop_tf':
    # TF1 semantics: the squared-gradient average starts at 1, not 0, and ε sits inside the square root.
    base = optax.rmsprop(learning_rate_fn, decay=0.9, eps=1e-3, momentum=config.momentum,
                         initial_scale=1.0, eps_in_sqrt=True)
  else:
    base = optax.sgd(learning_rate_fn, momentum=config.momentum if config.momentum > 0 else None,
                     nesterov=config.optimizer == 'nesterov')
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)


def optimizer_rates(config: ml_collections.ConfigDict) -> dict[str, np.float32]:
  """The rates the train step takes as arguments: the peak learning rate (for the global batch) and the
  weight decay, as float32 scalars (the values a constant of the program would round to)."""
  return {'learning_rate': np.float32(peak_learning_rate(config)), 'weight_decay': np.float32(config.weight_decay)}


def optimizer_from_rates(config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int,
                         rates: dict[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) of `config` with `rates` (`optimizer_rates`' keys) in place of its own: built
  inside the train step from traced rates, so that runs differing only in them share one compiled step. The
  optimizer state's structure does not depend on the rates: `create_optimizer(config, …)` initialises it."""
  schedule = create_learning_rate_fn(config, steps_per_epoch, num_train_steps, peak=rates['learning_rate'])
  return create_optimizer(config, schedule, weight_decay=rates['weight_decay']), schedule


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
                  ) -> jax.Array:
  """Per-example loss against smoothed one-hot targets: logits (B, K), labels (B,) -> (B,)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def update_ema(ema: Any, params: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def bw_health(batch_stats: Any, counters: Any) -> dict[str, float]:
  """Per BW layer: the largest condition number over its running covariance groups (`batch_stats`), and
  its counters (the `bw_health` collection).

  Returns {'<layer path>/cov_condition': float, '<path>/fallbacks': int, '<path>/skipped_updates': int}.
  """
  health = {}
  flat = lambda tree: flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)), sep='/')
  for key, value in flat(batch_stats).items():
    if key.endswith('/cov'):
      w = np.linalg.eigvalsh(np.asarray(value, np.float64))  # (G, g) ascending
      smallest = np.maximum(w[:, 0], np.finfo(np.float64).tiny)
      health[f'{key[:-len("/cov")]}/cov_condition'] = float(np.max(w[:, -1] / smallest))
  health.update({key: int(value) for key, value in flat(counters).items()})  # float32 counts, exact
  return health


class BWHealthError(RuntimeError):
  """More BW fallbacks than `config.bw_max_fallbacks` allows (the message says what to change)."""


def bw_totals(health: dict[str, float]) -> tuple[int, float | None]:
  """(fallbacks summed over the BW layers, the worst condition number) of `bw_health`; (0, None) without BW."""
  fallbacks = sum(v for k, v in health.items() if k.endswith('/fallbacks'))
  worst = max((v for k, v in health.items() if k.endswith('/cov_condition')), default=None)
  return fallbacks, worst


def bw_health_report(health: dict[str, float], previous_fallbacks: int, max_fallbacks: int
                     ) -> tuple[str, str | None]:
  """The console text of `bw_health` ('' without BW layers) and a warning when the fallbacks grew since
  `previous_fallbacks`; BWHealthError when they exceed `max_fallbacks` (−1: no limit)."""
  fallbacks, worst = bw_totals(health)
  if worst is None:
    return '', None
  if 0 <= max_fallbacks < fallbacks:
    raise BWHealthError(
        f'{fallbacks} BW fallbacks exceed config.bw_max_fallbacks={max_fallbacks} (worst condition number '
        f'{worst:.3g}): the whitening went singular. Raise config.model.bw.epsilon, lower the learning rate or '
        'use smaller groups (model.bw.group_size); the checkpoints are kept.')
  warning = None
  if fallbacks > previous_fallbacks:
    warning = (f'BW fallbacks grew from {previous_fallbacks} to {fallbacks} since the last eval (worst '
               f'condition number {worst:.3g}): some whitening factorisations failed and fell back. If this '
               'keeps growing, raise config.model.bw.epsilon; config.bw_max_fallbacks stops such a run.')
  return f'BW: fallbacks {fallbacks}, worst condition number {worst:.3g}', warning


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


def train_batch_spec(batch_size: int, image_shape: tuple[int, int, int], sharding: Any) -> dict:
  """Shapes of a global training batch as it reaches the step: uint8 images, int32 labels, float32 mask."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {'image': spec((batch_size, *image_shape), jnp.uint8), 'label': spec((batch_size,), jnp.int32),
          'mask': spec((batch_size,), jnp.float32)}


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
