"""A training run that starts from a trained network: `config.init_from` (docs/design.md §3.5).

The source is a Keras applications EfficientNet weights file (.h5 or .weights.h5), a folder written by
`python -m bw_jax.convert` (model.json and variables.msgpack), or a bw_jax run's workdir (its latest
checkpoint; the weight EMA when that run kept one). Its network is converted into the config's
(`bw_jax.models.convert`: BatchNorm placements the config puts BW in are converted, every other layer of the
same shape keeps its weights, the rest start from the seed's initialisation), then BN and BW statistics are
calibrated on `config.init_calibration_batches` batches of the train split (`bw_jax.models.calibrate`).
A resumed run starts from its own checkpoint instead and ignores `init_from`.
"""

import json
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bw_jax import data
from bw_jax.data.on_device import shard_batch
from bw_jax.models import pretrained
from bw_jax.models.calibrate import calibrate
from bw_jax.models.convert import Conversion, convert, initial_variables
from bw_jax.models.efficientnet import EfficientNet
from bw_jax.models.keras_import import from_keras
from bw_jax.train.checkpoints import CONFIG_FILE, say
from bw_jax.train.plan import Plan, resolve_plan
from bw_jax.train.step import create_model

KERAS_SUFFIXES = ('.h5', '.hdf5')


def checkpoints_folder(path: str) -> str | None:
  """The checkpoints folder of a run's workdir, or `path` itself when it is one; None otherwise."""
  for folder in (os.path.join(path, 'checkpoints'), path):
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
      return folder
  return None


def check_source(path: str) -> None:
  """Raises a one-line ValueError unless `path` is a source `load_source` reads (checked before any work)."""
  if not os.path.exists(path):
    raise ValueError(f'config.init_from={path!r} does not exist; give a Keras .h5 file, a folder written by '
                     'python -m bw_jax.convert, or a run\'s workdir.')
  if not (path.endswith(KERAS_SUFFIXES) or pretrained.is_saved(path) or checkpoints_folder(path)):
    raise ValueError(f'config.init_from={path!r} is none of: a Keras EfficientNet weights file (.h5, .weights.h5), '
                     f'a folder with {pretrained.MODEL_FILE} (python -m bw_jax.convert), a run\'s workdir '
                     f'(checkpoints/{CONFIG_FILE}).')


def load_source(path: str) -> pretrained.Pretrained:
  check_source(path)
  if path.endswith(KERAS_SUFFIXES):
    return from_keras(path)
  if pretrained.is_saved(path):
    return pretrained.load(path)
  return run_record(checkpoints_folder(path))


def run_record(folder: str) -> pretrained.Pretrained:
  """A run's latest checkpoint as a record: its config's model, the weights it evaluated with (the EMA when
  it kept one), its batch statistics and its dataset's normalisation."""
  with open(os.path.join(folder, CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with ocp.CheckpointManager(folder) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f'config.init_from: {folder} holds no finished checkpoint to start from.')
    state = manager.restore(step, args=ocp.args.StandardRestore())
  params = state['ema_params'] if config.ema_decay > 0 else state['params']
  variables = jax.tree.map(np.asarray, {'params': params, 'batch_stats': state['batch_stats']})
  model = pretrained.model_from_fields(config.model.to_dict(),
                                       num_classes=variables['params']['classifier']['bias'].shape[0])
  info = data.dataset_module(config.dataset.name).INFO
  return pretrained.Pretrained(model, variables, tuple(info.mean), tuple(info.std))


def calibration_batches(plan: Plan, sharding: Any) -> Iterator[jax.Array]:
  """Normalised global batches (B, S, S, C) of the train split with eval preprocessing, full batches only
  (a padded last one would bias the statistics), sharded by `sharding`."""
  dataset = plan.config.dataset
  batches, _ = data.create_split(dataset, dataset.train_split, plan.global_batch, train=False)
  for batch in batches:
    if np.all(batch['mask'] == 1):
      yield shard_batch({'image': batch['image']}, sharding)['image']


def starting_variables(plan: Plan, model: EfficientNet, fresh: dict, sharding: Any) -> tuple[dict, Conversion]:
  """`model`'s variables converted from the plan's `config.init_from` and calibrated; `fresh` are its initial
  ones."""
  config = plan.config
  source = load_source(config.init_from)
  info = data.dataset_module(config.dataset.name).INFO
  if not (np.allclose(source.mean, info.mean) and np.allclose(source.std, info.std)):
    say(f'config.init_from was trained on inputs normalised with mean {source.mean} and std {source.std}; this '
        f'run normalises with its dataset\'s ({tuple(info.mean)}, {tuple(info.std)}).')
  conversion = convert(source.model, source.variables, model, fresh)
  variables = conversion.variables
  if config.init_calibration_batches > 0:
    variables = calibrate(model, variables, calibration_batches(plan, sharding), config.init_calibration_batches)
  return variables, conversion


def start_from(plan: Plan, state: Any, model: EfficientNet, replicated: Any, data_sharding: Any) -> Any:
  """The fresh train `state` with parameters and statistics from the plan's `config.init_from` (replicated)."""
  config = plan.config
  fresh = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  variables, conversion = starting_variables(plan, model, fresh, data_sharding)
  if jax.process_index() == 0:
    print(f'Starting from {config.init_from}: {conversion.summary()}\nBN and BW statistics calibrated on '
          f'{config.init_calibration_batches} batches of the train split.', flush=True)
  variables = jax.device_put(variables, replicated)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                       ema_params=variables['params'] if config.ema_decay > 0 else state.ema_params)


def convert_and_calibrate(config: ml_collections.ConfigDict, out: str) -> pretrained.Pretrained:
  """`config.init_from` as `config.model`, calibrated, saved in `out`; returns the saved record."""
  plan = resolve_plan(config)  # Validates the config and counts its data (classes, calibration batches).
  if not config.init_from:
    raise ValueError('config.init_from is empty: name the trained network to convert (--config.init_from=…).')
  info = data.dataset_module(config.dataset.name).INFO
  # In float32 whatever config.half_precision says: a record holds the trainable network's parameters.
  model = create_model(config, plan.num_classes).clone(dtype=jax.numpy.float32)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ('data',)), jax.sharding.PartitionSpec('data'))
  variables, conversion = starting_variables(plan, model, initial_variables(model, plan.image_shape, config.seed),
                                             sharding)
  record = pretrained.Pretrained(model, variables, tuple(info.mean), tuple(info.std))
  pretrained.save(record, out)
  if jax.process_index() == 0:
    print(f'{conversion.summary()}\nBN and BW statistics calibrated on {config.init_calibration_batches} batches; '
          f'saved to {out} (train from it with --config.init_from={out}).', flush=True)
  return record
