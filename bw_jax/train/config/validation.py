"""`validate_config`: reject a misspelt, out-of-range or contradictory training config before anything compiles.

Every rule comes from the key table (`bw_jax/train/config/schema.py`): the allowed keys, each key's values,
the keys another one makes ignored, the keys `resume_allow_changes` may name. Last, the model is built, so that
its own checks see the whole model config.
"""

import difflib
from typing import Any

import jax
import ml_collections

from bw_jax.data import default_dataset_config
from bw_jax.data.pipeline import check_batch_size
from bw_jax.train.config import schema as config_schema
from bw_jax.train.config.rules import Resume

KEY_TABLE = config_schema.KEY_TABLE


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


def config_value(config: Any, name: str) -> Any:
  """`config.model.bw.method` for name 'model.bw.method'."""
  for part in name.split('.'):
    config = config[part]
  return config


def global_batch_size(config: ml_collections.ConfigDict, device_count: int | None = None) -> int | None:
  """The global batch: `batch_size`, or `batch_size_per_device` × the device count when that is set.

  The learning rate follows through `learning_rate` being per 256 images (linear scaling). Call it after
  `jax.distributed.initialize`: `device_count` defaults to `jax.device_count()`, all hosts' devices.
  """
  per_device = config.get('batch_size_per_device')
  if per_device is None:
    return config.batch_size
  return per_device * (jax.device_count() if device_count is None else device_count)


def with_global_batch_size(config: ml_collections.ConfigDict,
                           device_count: int | None = None) -> ml_collections.ConfigDict:
  """`config` as runs record it (workdir/checkpoints/config.json, summary.json, a study): a copy whose
  `batch_size` is the global batch when `batch_size_per_device` sets it; `config` itself otherwise."""
  if config.get('batch_size_per_device') is None:
    return config
  resolved = config.copy_and_resolve_references()
  resolved.batch_size = global_batch_size(config, device_count)
  return resolved


def ignored_key_error(config: ml_collections.ConfigDict) -> str | None:
  """The first key set together with the key that makes it ignored (`Key.ignored_when`), said in one line."""
  for key in config_schema.KEYS:
    if key.ignored_when is None:
      continue
    value, winner = config_value(config, key.name), config_value(config, key.ignored_when)
    if value is not None and winner is not None:
      return (f'config.{key.name}={value!r} is ignored when config.{key.ignored_when}={winner!r} is set: set '
              f'only one of them (a config file that sets {key.ignored_when} sets {key.name} = None; on the '
              f'command line, change --config.{key.ignored_when}).')
  return None


def allowed_change_error(text: str) -> str | None:
  """What is wrong with `resume_allow_changes`: a name that is not a key, or a key never resumed with a change
  (`Resume.NEVER`: the checkpoints could not load into the new shapes)."""
  for name in (part.strip() for part in text.split(',')):
    if not name:
      continue
    if name not in KEY_TABLE:
      close = difflib.get_close_matches(name, list(KEY_TABLE), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ''
      return f"config.resume_allow_changes names '{name}', which is not a config key{hint}."
    if KEY_TABLE[name].resume is Resume.NEVER:
      never = ', '.join(config_schema.keys_where(resume=Resume.NEVER))
      return (f'config.resume_allow_changes names {name}, which changes the shapes of the parameters or the '
              f'structure of the train state: checkpoints written with another {name} cannot be resumed. Train '
              f'in another --workdir (keys that never change on resume: {never}).')
  return None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError (all unknown keys at once, else the first bad value) saying what is allowed."""
  errors = unknown_keys(config, config_reference(config))
  if errors:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(errors))
  for key in config_schema.KEYS:
    key.check(config_value(config, key.name))
  error = ignored_key_error(config) or allowed_change_error(config.resume_allow_changes)
  if error:
    raise ValueError(error)
  if config.batch_size is None and config.batch_size_per_device is None:
    raise ValueError('config.batch_size is None and batch_size_per_device is not set: set one of them (the '
                     'global batch, or the batch per device).')
  for name in ('batch_size', 'eval_batch_size'):  # A batch per device divides evenly by construction.
    if config[name] is not None:
      check_batch_size(config[name], jax.device_count(), jax.process_count(), name=f'config.{name}')
  if config.init_from:
    from bw_jax.train.init_from import check_source  # Loads the models' conversion code only when used.
    check_source(config.init_from)
  from bw_jax.train.step import create_model  # Builds the model: its checks see the whole model config.
  create_model(config, num_classes=1)
