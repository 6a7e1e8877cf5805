"""What a run compiles (`Programs`: the model, the init, the train and eval steps over a Mesh of all devices),
built from a `Plan` and kept for the process's later runs of the same programs (`programs_for`).

Programs are built from `program_config(plan)`, the config's keys that are constants of the programs
(`InPrograms.CONSTANT` in the key table) and nothing else, and from the plan's class count, global batch and
learning-rate schedule: so `programs_key`, those values, is their whole identity, and a program that read
another key would fail to build. What varies between the runs of a sweep or a comparison is passed as
arguments: the seed (init), the dropout key and the optimizer's rates (train step).
"""

import collections
import dataclasses
import functools
import json
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from bw_jax import data
from bw_jax.data.on_device import normalise_images
from bw_jax.train.config.rules import InPrograms
from bw_jax.train.config.schema import keys_where
from bw_jax.train.config.validation import config_value
from bw_jax.train.optim import create_optimizer, learning_rate_fn, optimizer_from_rates
from bw_jax.train.plan import Plan
from bw_jax.train.step import TrainState, create_model, eval_step, train_step

PROGRAMS_KEPT = 4  # Sets of programs a process keeps for its next runs (a sweep worker's next trials).
# The init runs once, and its program is large (a threefry hash per parameter): LLVM's -O1 compiles it in
# about half the time of the default -O3, with bit-identical parameters (test_compare checks them against
# flax's own jitted init). -O0 would be faster still but changes the parameters' last bits.
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


@dataclasses.dataclass(frozen=True)
class Programs:
  """A run's compiled programs: building them again costs seconds of tracing per run even when XLA's
  persistent cache holds the compiled code.

  `init(np.int32(seed)) -> TrainState`; `train_step(state, batch, dropout_key, optimizer_rates(…)) ->
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


def program_config(plan: Plan) -> ml_collections.FrozenConfigDict:
  """The plan's config reduced to the keys that are constants of the programs (the key table's CONSTANT)."""
  constants = {name: config_value(plan.config, name) for name in keys_where(programs=InPrograms.CONSTANT)}
  return ml_collections.FrozenConfigDict(flax.traverse_util.unflatten_dict(constants, sep='.'))


def programs_key(plan: Plan) -> str:
  """The identity of the plan's programs: `program_config`, the class count, the global batch, the schedule's
  shape (a run of 3 steps and one of 6 share a staircase schedule) and the devices."""
  return json.dumps([program_config(plan).to_dict(), plan.num_classes, plan.global_batch,
                     dataclasses.asdict(plan.schedule), [d.id for d in jax.devices()]], sort_keys=True)


def init_state(config: Any, model: Any, tx: Any, image_shape: tuple[int, int, int], seed: jax.Array) -> TrainState:
  """A fresh TrainState of `model` from `seed`, with a strongly typed int32 step as a restored one's (else a
  fresh and a resumed run would trace two train steps)."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
  params = variables['params']
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                            batch_stats=variables.get('batch_stats', {}),
                            bw_health=variables.get('bw_health', {}),
                            ema_params=params if config.ema_decay > 0 else {})
  return state.replace(step=jnp.asarray(state.step, jnp.int32))


def compiled_init(config: Any, model: Any, tx: Any, image_shape: tuple[int, int, int],
                  replicated: jax.sharding.Sharding) -> Callable[[np.int32], TrainState]:
  """The compiled init: seed (a NumPy int32, the same on every host) -> a fresh TrainState on `replicated`.

  The seed is an argument, not a constant of the program: one compiled init (persistent cache) serves every
  seed of a comparison or sweep, with the parameters of a constant seed, bit for bit (checked by a test).
  """
  init = jax.jit(functools.partial(init_state, config, model, tx, image_shape), out_shardings=replicated)
  cpu = next(iter(replicated.device_set)).platform == 'cpu'
  return init.lower(np.int32(0)).compile(compiler_options=CPU_INIT_COMPILER_OPTIONS if cpu else None)


def programs_for(plan: Plan) -> Programs:
  """The plan's programs over a mesh of all devices: built on first use, then kept (the last PROGRAMS_KEPT)."""
  key = programs_key(plan)
  if key in _kept_programs:
    _kept_programs.move_to_end(key)
    return _kept_programs[key]
  mesh = Mesh(jax.devices(), ('data',))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  config = program_config(plan)
  model = create_model(config, plan.num_classes)
  info = data.dataset_module(config.dataset.name).INFO
  normalise = functools.partial(normalise_images, mean=info.mean, std=info.std)  # On the device.
  train_fn = jax.jit(
      functools.partial(train_step, model=model, num_classes=plan.num_classes,
                        label_smoothing=config.label_smoothing, ema_decay=config.ema_decay, normalise=normalise,
                        optimizer_from_rates=functools.partial(optimizer_from_rates, config, plan.schedule)),
      in_shardings=(replicated, data_sharding, replicated, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, num_classes=plan.num_classes,
                                      use_ema=config.ema_decay > 0, normalise=normalise),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)
  # The optimizer state's structure: the rates do not matter.
  tx = create_optimizer(config, learning_rate_fn(plan.schedule, 1.0), weight_decay=0.0)
  init = compiled_init(config, model, tx, plan.image_shape, replicated)
  _kept_programs[key] = Programs(model, replicated, data_sharding, init, train_fn, eval_fn)
  while len(_kept_programs) > PROGRAMS_KEPT:
    _kept_programs.popitem(last=False)
  return _kept_programs[key]
