"""The key table (bw_jax/train/config/schema.py) against what it declares: the schema tree is the table, every
default passes its own rule, each resume policy matches the train state's shapes, and the rules that relate
keys (an override another key ignores, resume_allow_changes) are refused in one line."""

import functools

import flax
import jax
import ml_collections
import numpy as np
import pytest

from bw_jax.data import DATASET_NAMES, default_dataset_config
from bw_jax.train import programs
from bw_jax.train.checkpoints import config_differences
from bw_jax.train.config import schema
from bw_jax.train.config.rules import FROM_DATASET, InPrograms, Resume
from bw_jax.train.config.validation import config_value, validate_config
from bw_jax.train.optim import create_optimizer, learning_rate_fn
from bw_jax.train.plan import DataCounts, plan_for
from bw_jax.train.step import create_model
from configs import smoke


def leaves(config) -> dict:
  return flax.traverse_util.flatten_dict(config.to_dict(), sep='.')


def test_the_schema_is_the_table():
  config = schema.get_config()
  fashion = leaves(default_dataset_config('fashion_mnist'))
  assert sorted(leaves(config)) == sorted(schema.KEY_TABLE)
  for name, key in schema.KEY_TABLE.items():
    *groups, leaf = name.split('.')
    node = functools.reduce(lambda c, g: c[g], groups, config)
    default = fashion[name.removeprefix('dataset.')] if key.default is FROM_DATASET else key.default
    assert node[leaf] == default, name
    if key.nullable:  # A FieldReference: `--config.key=value` parses the declared type even when it is None.
      assert isinstance(node._fields[leaf], ml_collections.FieldReference) and node.get_type(leaf) is key.kind, name


@pytest.mark.parametrize('dataset', DATASET_NAMES)
def test_every_default_passes_its_own_rule(dataset):
  config = schema.get_config()
  config.dataset = default_dataset_config(dataset)
  for name, key in schema.KEY_TABLE.items():
    key.check(config_value(config, name))


# A value of every key that is a constant of the programs but may change on resume: the train state keeps its
# shapes. And, for every key that never may, a value that changes them (or the state's structure).
KEEPS_SHAPES = {
    'model.stem_stride': 1, 'model.dropout_rate': 0.3, 'model.drop_connect_rate': 0.1,
    'model.depthwise_implementation': 'xla', 'model.bw.method': 'zca', 'model.bw.momentum': 0.9,
    'model.bw.epsilon': 0.5, 'model.bw.center_with': 'running', 'model.bw.whiten_with': 'running',
    'model.bw.newton_iterations': 3, 'dataset.image_size': 32, 'momentum': 0.5, 'label_smoothing': 0.2,
    'half_precision': True}
CHANGES_SHAPES = {
    'model.variant': 'b1', 'model.num_classes': 11, 'model.stem_type': 2, 'model.mbconv_type': 0,
    'model.head_type': 1, 'model.width_multiplier': 0.5, 'model.depth_multiplier': 0.5, 'model.bw.group_size': 8,
    'dataset.name': 'tiny_imagenet', 'optimizer': 'adamw', 'ema_decay': 0.5}


def state_shapes(config) -> dict[str, tuple]:
  """{path: shape} of the train state a run of `config` starts from, as its checkpoints hold it: the loop's
  own init (`programs.init_state`), traced for shapes only."""
  classes = config.model.num_classes or 10
  plan = plan_for(config, DataCounts(60_000, 2_000, classes))
  constants = programs.program_config(plan)
  model = create_model(constants, classes)
  tx = create_optimizer(constants, learning_rate_fn(plan.schedule, 1.0), 0.0)
  state = jax.eval_shape(functools.partial(programs.init_state, constants, model, tx, plan.image_shape),
                         np.int32(0))
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(
      flax.serialization.to_state_dict(state), sep='/').items()}


@pytest.mark.slow  # Traces the smoke model's init 26 times.
def test_resume_policies_match_the_shapes_of_the_train_state():
  constants = set(schema.keys_where(programs=InPrograms.CONSTANT))
  never = set(schema.keys_where(resume=Resume.NEVER))
  assert set(CHANGES_SHAPES) == never and set(KEEPS_SHAPES) == constants - never
  base = smoke.get_config()
  reference = state_shapes(base)
  for name, value in {**KEEPS_SHAPES, **CHANGES_SHAPES}.items():
    config, start = smoke.get_config(), reference
    if name == 'model.variant':  # The smoke model's multipliers replace the variant's: compare at B0's.
      config.model.width_multiplier = config.model.depth_multiplier = None
      start = state_shapes(config)
    config.update_from_flattened_dict({name: value})
    assert (state_shapes(config) == start) == (name in KEEPS_SHAPES), name


def test_resume_allow_changes_names_only_keys_that_may_change():
  config = smoke.get_config()
  config.resume_allow_changes = 'learning_rate, dataset.shuffle_buffer,num_epochs'  # On purpose, on purpose, safe.
  validate_config(config)
  config.resume_allow_changes = 'learning_rate,weight_decy'
  with pytest.raises(ValueError, match=r"^config.resume_allow_changes names 'weight_decy', which is not a config "
                                       r"key \(did you mean 'weight_decay'\?\)"):
    validate_config(config)
  for name in schema.keys_where(resume=Resume.NEVER):
    config.resume_allow_changes = f'learning_rate,{name}'
    with pytest.raises(ValueError, match=rf'^config.resume_allow_changes names {name}, which changes the shapes'):
      validate_config(config)


def test_a_key_ignored_when_another_is_set_is_refused_with_both_values():
  config = smoke.get_config()
  config.batch_size_per_device = 8
  with pytest.raises(ValueError, match=r'^config.batch_size=16 is ignored when config.batch_size_per_device=8 is '
                                       r'set: set only one of them'):
    validate_config(config)
  config.batch_size = None
  validate_config(config)
  assert plan_for(config, DataCounts(60_000, 2_000, 10), device_count=4).global_batch == 32


def test_a_key_added_since_the_checkpoints_counts_as_a_change_only_off_its_default():
  stored = leaves(smoke.get_config())
  current = smoke.get_config()
  del stored['print_memory']  # Checkpoints written before the key existed.
  stored = flax.traverse_util.unflatten_dict(stored, sep='.')
  assert config_differences(stored, current.to_dict()) == {}
  current.print_memory = True
  assert list(config_differences(stored, current.to_dict())) == ['print_memory']
