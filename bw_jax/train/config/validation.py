"""`validate_config`: reject a misspelt or out-of-range training config before anything compiles.

The allowed keys are those of `bw_jax/train/config/schema.py` (the one source of truth); the model and BW fields are
checked by building `EfficientNet` and `BWSettings`, whose own checks name the allowed values.
"""

import difflib
from typing import Any

import jax
import ml_collections

from bw_jax.train.config import schema as config_schema
from bw_jax.checks import check_choice, is_positive_int
from bw_jax.data import dataset_module, default_dataset_config
from bw_jax.data.pipeline import check_batch_size

OPTIMIZERS = ('sgd', 'nesterov', 'adamw', 'rmsprop_tf')
LR_SCHEDULES = ('cosine', 'exponential')


def base_config() -> ml_collections.ConfigDict:
  """Every training config key with its default (`bw_jax/train/config/schema.py`)."""
  return config_schema.get_config()


def config_reference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every key `config` may have: the schema's, with the dataset keys of `config.dataset.name`'s dataset."""
  reference = base_config()
  reference.dataset = default_dataset_config(config.dataset.name)  # Names the allowed datasets if unknown.
  return reference


def unknown_keys(config: Any, reference: Any, prefix: str = '') -> list[str]:
  """Error lines for every key of `config` absent from `reference`, recursing into sub-configs."""
  errors = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference), n=1)
      hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ''
      errors.append(f"unknown config key '{path}'{hint}; allowed keys here: {', '.join(sorted(reference))}")
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
      errors.extend(unknown_keys(value, reference[key], path + '.'))
  return errors


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  below = value <= low if low_open else value < low
  above = value >= high if high_open else value > high
  if below or above or value != value:  # NaN compares false with everything.
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f'config.{name}={value!r} is out of range; it must lie in {interval}.')


def _check_positive_int(name: str, value: Any) -> None:
  if not is_positive_int(value):
    raise ValueError(f'config.{name}={value!r} must be a positive integer.')


def with_global_batch_size(config: ml_collections.ConfigDict,
                           device_count: int | None = None) -> ml_collections.ConfigDict:
  """`config`, or a copy whose `batch_size` is `batch_size_per_device` × the device count when that is set.

  The learning rate follows through `learning_rate` being per 256 images (linear scaling). Call it after
  `jax.distributed.initialize`: `device_count` defaults to `jax.device_count()`, all hosts' devices.
  """
  per_device = config.get('batch_size_per_device')
  if per_device is None:
    return config
  _check_positive_int('batch_size_per_device', per_device)
  resolved = config.copy_and_resolve_references()
  resolved.batch_size = per_device * (jax.device_count() if device_count is None else device_count)
  return resolved


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError (all unknown keys at once, else the first bad value) saying what is allowed."""
  errors = unknown_keys(config, config_reference(config))
  if errors:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(errors))

  check_choice('config.optimizer', config.optimizer, OPTIMIZERS)
  check_choice('config.lr_schedule', config.lr_schedule, LR_SCHEDULES)
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] is not None:
      _check_positive_int(name, config[name])
      check_batch_size(config[name], jax.device_count(), jax.process_count(), name=f'config.{name}')
  if config.num_train_steps != -1:
    _check_positive_int('num_train_steps (or -1 to train for num_epochs)', config.num_train_steps)
  else:
    _check_range('num_epochs', config.num_epochs, 0.0, float('inf'), low_open=True)
  for name in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    _check_positive_int(name, config[name])
  if config.eval_every_steps != -1:
    _check_positive_int('eval_every_steps (or -1 for once per epoch)', config.eval_every_steps)
  if config.bw_max_fallbacks != -1:
    _check_range('bw_max_fallbacks (or -1 for no limit)', config.bw_max_fallbacks, 0, float('inf'))
  _check_range('learning_rate', config.learning_rate, 0.0, float('inf'), low_open=True, high_open=True)
  # JAX keys take 32 bits of the seed: a larger one would silently repeat another seed's parameters.
  _check_range('seed', config.seed, -2**31, 2**31 - 1)
  _check_range('momentum', config.momentum, 0.0, 1.0, high_open=True)
  _check_range('warmup_epochs', config.warmup_epochs, 0.0, float('inf'))
  if config.warmup_fraction is not None:
    _check_range('warmup_fraction', config.warmup_fraction, 0.0, 1.0, high_open=True)
  _check_range('decay_rate', config.decay_rate, 0.0, 1.0, low_open=True)
  _check_range('decay_epochs', config.decay_epochs, 0.0, float('inf'), low_open=True)
  _check_range('weight_decay', config.weight_decay, 0.0, float('inf'))
  _check_range('label_smoothing', config.label_smoothing, 0.0, 1.0, high_open=True)
  _check_range('ema_decay', config.ema_decay, 0.0, 1.0, high_open=True)
  _check_range('dataset.image_size', config.dataset.image_size, 1, float('inf'))
  _check_range('init_calibration_batches', config.init_calibration_batches, 0, float('inf'))
  if config.init_from:
    from bw_jax.train.init_from import check_source  # Loads the models' conversion code only when used.
    check_source(config.init_from)
  if config.model.dropout_rate is not None:
    _check_range('model.dropout_rate', config.model.dropout_rate, 0.0, 1.0, high_open=True)
  _check_range('model.drop_connect_rate', config.model.drop_connect_rate, 0.0, 1.0, high_open=True)
  for name in ('width_multiplier', 'depth_multiplier'):
    if config.model[name] is not None:
      _check_range(f'model.{name}', config.model[name], 0.0, float('inf'), low_open=True)
  from bw_jax.train.step import create_model  # Builds the model: its checks name the allowed values.
  create_model(config, num_classes=1)
