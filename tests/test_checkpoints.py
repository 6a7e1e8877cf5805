"""bw_jax.train.checkpoints on a tiny train state (no model, no compile): the resolved config stored with the
checkpoints and compared on resume, and the fallback past a corrupt newest checkpoint."""

import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest


from bw_jax.train import checkpoints as ckpt  # noqa: E402
from bw_jax.train import loop as train  # noqa: E402
from bw_jax.train.plan import DataCounts, plan_for  # noqa: E402
from bw_jax.train.step import TrainState  # noqa: E402
from configs import smoke  # noqa: E402


def plan_of(config):
  """The config's plan on Fashion-MNIST's sizes (nothing here reads the data)."""
  return plan_for(config, DataCounts(train_examples=60_000, eval_examples=2_000, num_classes=10))


def tiny_state(offset: float = 0.0, step: int = 0) -> TrainState:
  params = {'dense': {'kernel': jnp.arange(6.0).reshape(2, 3) + offset, 'bias': jnp.full((3,), offset)}}
  state = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9),
                            batch_stats={'bn': {'mean': jnp.full((3,), 2 * offset)}}, ema_params={})
  return state.replace(step=step)


@pytest.fixture
def saved(tmp_path):
  """checkpoints/3 and checkpoints/6 of the smoke config, the kernel offset by the step."""
  directory = str(tmp_path / 'checkpoints')
  checkpoints = ckpt.Checkpoints(directory, plan_of(smoke.get_config()))
  checkpoints.restore_latest(tiny_state())  # As a run does: the first records its config.
  for step in (3, 6):
    checkpoints.save(tiny_state(float(step), step))
  checkpoints.close()
  return directory


def corrupt(step_dir: str, how: str) -> None:
  if how == 'truncated data':
    for path in glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  else:  # 'manifest removed'
    for path in glob.glob(os.path.join(step_dir, 'default', '**', 'manifest.ocdbt'), recursive=True):
      os.remove(path)


@pytest.mark.parametrize('how', ['truncated data', 'manifest removed'])
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(saved, how, capsys):
  corrupt(os.path.join(saved, '6'), how)
  checkpoints = ckpt.Checkpoints(saved, plan_of(smoke.get_config()))
  restored = checkpoints.restore_latest(tiny_state())
  assert int(restored.step) == 3
  np.testing.assert_array_equal(restored.params['dense']['kernel'], np.arange(6.0).reshape(2, 3) + 3)
  np.testing.assert_array_equal(restored.batch_stats['bn']['mean'], np.full((3,), 6.0))
  aside = glob.glob(os.path.join(saved, 'corrupt-6-*'))
  assert len(aside) == 1 and os.path.isdir(os.path.join(aside[0], 'default'))
  out = capsys.readouterr().out
  assert f'checkpoint of step 6 in {saved} does not load' in out and f'moved it to {aside[0]}' in out
  assert 'restored the checkpoint of step 3' in out
  checkpoints.save(tiny_state(6.0, 6))  # The run goes on: step 6 is written again where it was.
  checkpoints.close()
  assert sorted(n for n in os.listdir(saved) if n.isdigit()) == ['3', '6']


def test_no_loadable_checkpoint_is_one_clear_error_and_nothing_moves(saved):
  for step in ('3', '6'):
    corrupt(os.path.join(saved, step), 'truncated data')
  checkpoints = ckpt.Checkpoints(saved, plan_of(smoke.get_config()))
  with pytest.raises(ckpt.CheckpointError) as error:
    checkpoints.restore_latest(tiny_state())
  message = str(error.value)
  assert message.startswith(f'No checkpoint in {saved} loads:') and 'step 6:' in message and 'step 3:' in message
  assert 'another --workdir' in message and len(message.splitlines()) == 3
  assert sorted(os.listdir(saved)) == ['3', '6', 'config.json']


@pytest.mark.parametrize('key, value, line, advice', [
    ('batch_size', 32, 'batch_size: the checkpoints were written with 16, this run has 32',
     '--config.resume_allow_changes=batch_size (always allowed: '),
    ('model.width_multiplier', 0.5, 'model.width_multiplier: the checkpoints were written with 0.25, this run has '
     '0.5 (it shapes the train state: never resumed with a change)', 'Use the same config, another --workdir for '
     'a new run.'),  # No resume_allow_changes offered: the parameters would not load.
])
def test_resuming_with_a_different_config_stops_naming_the_keys(saved, key, value, line, advice):
  config = smoke.get_config()
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value
  with pytest.raises(ckpt.ConfigMismatchError) as error:
    ckpt.Checkpoints(saved, plan_of(config))
  message = str(error.value)
  assert line in message and message.count(': the checkpoints were written with') == 1
  assert advice in message


def test_train_and_evaluate_stops_on_a_changed_width_before_compiling(saved):
  config = smoke.get_config()
  config.model.width_multiplier = 0.5
  with pytest.raises(ckpt.ConfigMismatchError, match='model.width_multiplier'):
    train.train_and_evaluate(config, os.path.dirname(saved))


def test_safe_and_allowed_changes_resume_with_a_note(saved, capsys):
  config = smoke.get_config()
  config.num_train_steps, config.log_every_steps = 12, 1
  config.dataset.shuffle_buffer = 64
  with pytest.raises(ckpt.ConfigMismatchError, match='dataset.shuffle_buffer') as error:
    ckpt.Checkpoints(saved, plan_of(config))
  assert 'num_train_steps: the checkpoints' not in str(error.value)
  config.resume_allow_changes = 'dataset.shuffle_buffer'
  checkpoints = ckpt.Checkpoints(saved, plan_of(config))
  checkpoints.restore_latest(tiny_state())
  checkpoints.close()
  out = capsys.readouterr().out
  for key in ('num_train_steps', 'log_every_steps', 'dataset.shuffle_buffer'):
    assert f'{key}: the checkpoints were written with' in out
  with open(os.path.join(saved, 'config.json')) as f:
    assert json.load(f)['dataset']['shuffle_buffer'] == 64  # The next resume compares with this run.


def test_checkpoints_without_a_stored_config_resume_and_store_it(saved, capsys):
  os.remove(os.path.join(saved, 'config.json'))
  checkpoints = ckpt.Checkpoints(saved, plan_of(smoke.get_config()))
  assert int(checkpoints.restore_latest(tiny_state()).step) == 6
  checkpoints.close()
  assert 'no config.json' in capsys.readouterr().out
  with open(os.path.join(saved, 'config.json')) as f:
    assert json.load(f)['batch_size'] == 16


def test_a_fresh_directory_stores_the_config(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  checkpoints = ckpt.Checkpoints(directory, plan_of(smoke.get_config()))
  assert not os.path.exists(os.path.join(directory, 'config.json'))  # Recorded once the run has a state.
  checkpoints.restore_latest(tiny_state())
  checkpoints.close()
  with open(os.path.join(directory, 'config.json')) as f:
    assert json.load(f) == json.loads(json.dumps(smoke.get_config().to_dict()))
  shutil.rmtree(directory)


def test_a_checkpoint_of_other_shapes_is_a_mismatch_not_damage_and_the_record_stays(saved):
  """A state of other shapes than the checkpoints' (a kernel (3, 3) where they hold (2, 3)) with a change
  allowed on purpose: the restore says which arrays differ and that the checkpoints are intact; nothing is
  moved aside, and config.json keeps the config that wrote them (a rerun of that config still resumes)."""
  config = smoke.get_config()
  config.learning_rate, config.resume_allow_changes = 0.5, 'learning_rate'
  with open(os.path.join(saved, 'config.json')) as f:
    record = f.read()
  checkpoints = ckpt.Checkpoints(saved, plan_of(config))
  wider = tiny_state().replace(params={'dense': {'kernel': jnp.zeros((3, 3)), 'bias': jnp.zeros((3,))}})
  with pytest.raises(ckpt.ConfigMismatchError) as error:
    checkpoints.restore_latest(wider)
  message = str(error.value)
  assert 'params/dense/kernel: the checkpoint holds (2, 3), this run (3, 3)' in message
  assert 'damaged' not in message and 'Move' not in message
  assert sorted(os.listdir(saved)) == ['3', '6', 'config.json']
  with open(os.path.join(saved, 'config.json')) as f:
    assert f.read() == record
