"""The optimizer and the learning-rate schedule of a config: warm-up, cosine or staircase decay, weight
decay on kernels only, and the rates as arguments of a compiled step (`optimizer_from_rates`)."""

from typing import Any

import jax
import ml_collections
import numpy as np
import optax


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
