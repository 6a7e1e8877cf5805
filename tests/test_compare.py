"""Tests of `python -m bw_jax.sweep compare`: the compare file's checks, the run order and sampler, the
seed → randomness contract of a training run, and end-to-end comparisons by worker processes on SQLite (one
of them killed). The statistics and the report are tested in test_compare_report.py."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optuna
from optuna.trial import TrialState
import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bw_jax import data
from bw_jax.train import loop as train  # noqa: E402
from bw_jax.train.checkpoints import latest_checkpoint_step  # noqa: E402
from bw_jax.train.config.files import load_config_file  # noqa: E402
from bw_jax.sweep import __main__ as sweep_cli  # noqa: E402
from bw_jax.sweep import compare, compare_report  # noqa: E402
from bw_jax.sweep.space import check_sweep_config, suggest  # noqa: E402
from bw_jax.sweep.study import create_storage, default_storage  # noqa: E402
from bw_jax.train.optim import create_optimizer  # noqa: E402
from bw_jax.train.programs import compiled_init  # noqa: E402
from bw_jax.train.step import create_model
from subprocess_runs import COMPILATION_CACHE_ENV, start_test_process, wait_for_a_started_trial  # noqa: E402

# Each training run builds new jitted functions; the persistent cache compiles a program once (test_train.py).
jax.config.update('jax_compilation_cache_dir', os.path.join(REPO, '.pytest_cache', 'jax_compilation'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
COMPARE_SMOKE = os.path.join(REPO, 'configs', 'sweeps', 'compare_smoke.py')
STUDY_FILES = ('compare_fashion_mnist.py', 'compare_fashion_mnist_lr.py', 'confirm_fashion_mnist.py',
               'compare_tiny_imagenet.py', 'compare_tiny_imagenet_lr.py', 'compare_imagenet.py')


def smoke_compare(**overrides) -> ml_collections.ConfigDict:
  config = load_config_file(COMPARE_SMOKE)
  for key, value in overrides.items():
    config[key] = value
  return config


def check_errors(**overrides) -> str:
  with pytest.raises(ValueError) as error:
    compare.check_compare_config(smoke_compare(**overrides))
  return str(error.value)


# ----------------------------------------------------------------------------------------------------------
# The compare file


def test_parse_arm_reads_literals_and_bare_words():
  assert compare.parse_arm('bn: model.mbconv_type=0, model.head_type=1, learning_rate=0.4') == (
      'bn', {'model.mbconv_type': 0, 'model.head_type': 1, 'learning_rate': 0.4})
  assert compare.parse_arm('z: model.bw.method=zca, model.bw.group_size=None') == (
      'z', {'model.bw.method': 'zca', 'model.bw.group_size': None})
  assert compare.parse_arm('as_is:') == ('as_is', {})
  for bad in ('no colon', 'two words: learning_rate=1', 'x: learning_rate', 'x: a=1, a=2'):
    with pytest.raises(ValueError):
      compare.parse_arm(bad)


@pytest.mark.parametrize('name', STUDY_FILES + ('compare_smoke.py',))
def test_shipped_compare_files_are_valid(name):
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', name))
  params = compare.check_compare_config(config)
  check_sweep_config(compare.sweep_config(config))
  assert len(config.seeds) >= (1 if name.endswith('_lr.py') else 2 if name == 'compare_smoke.py' else 3)
  assert compare.baseline_arm(config) in params
  if name.endswith('_lr.py'):  # Every arm of the study at every rate of the grid, on a seed outside the study's.
    study = load_config_file(os.path.join(REPO, 'configs', 'sweeps', name.replace('_lr', '')))
    assert len(params) == len(study.arms) * 4 and not set(config.seeds) & set(study.seeds)
    assert {p['learning_rate'] for p in params.values()} == {0.1, 0.2, 0.4, 0.8}


def test_fashion_mnist_study_has_the_issues_arms():
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', 'compare_fashion_mnist.py'))
  params = compare.check_compare_config(config)
  blocks = {label: (v.get('model.stem_type', 1), v['model.mbconv_type'], v['model.head_type'])
            for label, v in params.items()}
  assert compare.baseline_arm(config) == 'bn' and blocks['bn'] == (1, 0, 1)
  assert set(blocks.values()) == {(1, 0, 1), (1, 2, 2), (1, 2, 1), (1, 1, 2), (1, 3, 2), (2, 2, 2)}
  defaults = [v for v in params.values() if (v['model.bw.group_size'], v['model.bw.epsilon']) == (16, 1e-3)]
  assert len(defaults) == 1 and len(config.seeds) >= 5


def test_confirmatory_study_is_the_preregistered_one():
  """The pre-registration: bn against bw_mbconv3 at the pilot's rates, the main job's full length, seeds that
  neither the exploratory study, its pilot nor the main job used."""
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', 'confirm_fashion_mnist.py'))
  params = compare.check_compare_config(config)
  exploratory = load_config_file(os.path.join(REPO, 'configs', 'sweeps', 'compare_fashion_mnist.py'))
  pilot = load_config_file(os.path.join(REPO, 'configs', 'sweeps', 'compare_fashion_mnist_lr.py'))
  assert compare.baseline_arm(config) == 'bn' and list(params) == ['bn', 'bw_mbconv3']
  for label, values in params.items():
    chosen = compare.arm_params(exploratory)[label]
    assert values == {key: chosen[key] for key in values}, label  # Blocks and the pilot's learning rate.
  used = set(exploratory.seeds) | set(pilot.seeds) | {0}
  assert len(config.seeds) >= 8 and not set(config.seeds) & used
  assert config.trial_budget.num_train_steps == 7 * (60_000 // 128) and config.train.batch_size == 128


def test_bad_compare_files_are_refused_with_every_reason():
  message = check_errors(arms=('a: model.mbconv=2', 'b: seed=3', 'c: num_train_steps=9', 'a: learning_rate=1.0'),
                         baseline='zz', seeds=(1, 1), target_accuracy=2.0, colour='red')
  for expected in ("'model.mbconv' is not a training config key (did you mean 'model.mbconv_type'?)",
                   "arm 'b' sets 'seed'", "arm 'c' sets 'num_train_steps'", 'arm labels must be distinct',
                   "baseline='zz' is not an arm", 'seeds must be distinct', 'target_accuracy=2.0',
                   "unknown config key 'colour'"):
    assert expected in message, message
  assert 'same config as an earlier arm' in check_errors(arms=('a: dataset.augment.flip=False', 'b:'))
  assert "arm 'x'" in check_errors(arms=('x: model.bw.method=qr',))  # Validated by the training code.
  assert 'arms is empty' in check_errors(arms=())


def test_run_compare_with_a_bad_file_fails_before_anything_is_created(tmp_path, capsys):
  path = tmp_path / 'configs' / 'bad.py'
  path.parent.mkdir()
  path.write_text('from bw_jax.sweep.compare import base_compare_config\n'
                  'def get_config():\n  c = base_compare_config()\n  c.arms = ("a: seed=1",)\n  return c\n')
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(['compare', 'run', f'--config={path}', f'--dir={tmp_path / "out"}'])
  assert exit_.value.code == 2 and "arm 'a' sets 'seed'" in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_run_order_is_seed_major_with_every_run_once():
  order = compare.run_order(['a', 'b', 'c'], [7, 8, 9, 10])
  assert sorted(order) == sorted((a, s) for a in 'abc' for s in (7, 8, 9, 10))
  assert [s for _, s in order] == [7] * 3 + [8] * 3 + [9] * 3 + [10] * 3
  assert order == compare.run_order(['a', 'b', 'c'], [7, 8, 9, 10])
  assert len({tuple(a for a, _ in order[i:i + 3]) for i in range(0, 12, 3)}) > 1  # Shuffled per seed.


@pytest.mark.filterwarnings('ignore::optuna.exceptions.ExperimentalWarning')  # The retry callback.
def test_sampler_gives_each_budget_slot_its_run_and_retries_keep_it():
  config = smoke_compare(arms=('a: dataset.augment.flip=False', 'b: dataset.augment.flip=True, learning_rate=0.1',
                               'c: dataset.augment.crop_padding=1'), seeds=(3, 5))
  compare.check_compare_config(config)
  sweep = compare.sweep_config(config)
  space = check_sweep_config(sweep)
  record = compare.compare_record(config)
  study = optuna.create_study(sampler=compare.RunSampler(record), direction='maximize')
  for slot in range(sweep.n_trials):
    trial = study.ask()
    params = suggest(trial, space)
    assert params == compare.run_params(record, slot)
    assert (compare.arm_of(params, record), params['seed']) == tuple(record['runs'][slot])
    if slot == 2:
      study.tell(trial, state=TrialState.FAIL)
    else:
      study.tell(trial, 0.5)
  failed = study.trials[2]
  optuna.storages.RetryHeartbeatStaleTrialCallback(3)(study, failed)
  retry = study.trials[-1]
  assert retry.state == TrialState.WAITING and retry.params == failed.params
  assert [t.number for t in compare_report.current_trials(study)] == [0, 1, 3, 4, 5, retry.number]


# ----------------------------------------------------------------------------------------------------------
# The seed → randomness contract of a training run


@pytest.fixture(scope='module')
def smoke_config():
  return load_config_file(os.path.join(REPO, 'configs', 'smoke.py'))


def init_params(config, seed):
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed = seed
  mesh = jax.sharding.Mesh(jax.devices(), ('data',))
  model = create_model(config, 10)
  tx = create_optimizer(config, lambda step: 0.1, config.weight_decay)
  init = compiled_init(config, model, tx, (28, 28, 1), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state = init(np.int32(config.seed))
  return jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow  # Compiles the smoke model's init.
def test_seed_sets_the_initial_parameters(smoke_config):
  first, again, other = (init_params(smoke_config, s) for s in (0, 0, 1))
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  kernels = [(a, b) for a, b in zip(first, other) if a.ndim > 1]
  assert kernels and all(not np.array_equal(a, b) for a, b in kernels)
  # compiled_init takes the seed as an argument of one program: the parameters are those of flax's init with the
  # key built from the seed as a constant.
  model = create_model(smoke_config, 10)
  constant = jax.jit(lambda: model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)), train=False))()
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(constant['params']), other))


def first_batch(config, seed, *, shuffle: bool, crop: bool):
  dataset = ml_collections.ConfigDict(config.dataset.to_dict())
  dataset.shuffle_buffer = 60_000 if shuffle else 1  # A buffer of 1 keeps the file order.
  dataset.augment.random_crop, dataset.augment.crop_padding = crop, 2
  batches, _ = data.create_split(dataset, 'train', 16, train=True, seed=seed)
  return next(batches)


@pytest.mark.parametrize('shuffle, crop', [(True, False), (False, True)], ids=['order', 'augmentation'])
def test_seed_sets_the_data_order_and_the_augmentation(smoke_config, shuffle, crop):
  first, again, other = (first_batch(smoke_config, s, shuffle=shuffle, crop=crop) for s in (0, 0, 1))
  assert np.array_equal(first['image'], again['image']) and np.array_equal(first['label'], again['label'])
  assert not np.array_equal(first['image'], other['image'])
  if not shuffle:  # Same examples, differently cropped.
    assert np.array_equal(first['label'], other['label'])


class Captured(Exception):
  pass


@pytest.mark.slow  # Builds the smoke model's programs (its init compiles).
def test_training_passes_the_seed_to_the_data_and_dropout(smoke_config, tmp_path, monkeypatch):
  """train_and_evaluate's own plumbing, stopped when it asks for the training data (nothing trains): the
  train step's dropout key is derived from config.seed, and the data iterator gets config.seed."""
  seen = {'dropout_keys': [], 'data_seeds': []}
  create_split, run_dropout_key = data.create_split, train.run_dropout_key

  def recording_dropout_key(seed, sharding):
    key = run_dropout_key(seed, sharding)
    seen['dropout_keys'].append(np.asarray(jax.random.key_data(key)))
    return key

  def recording_split(*args, **kwargs):
    if kwargs.get('train'):
      seen['data_seeds'].append(kwargs['seed'])
      raise Captured
    return create_split(*args, **kwargs)

  monkeypatch.setattr(train, 'run_dropout_key', recording_dropout_key)
  monkeypatch.setattr(data, 'create_split', recording_split)
  for seed in (0, 1):  # The seeds of test_seed_sets_the_initial_parameters: its compilations are cached.
    config = ml_collections.ConfigDict(smoke_config.to_dict())
    config.seed = seed
    with pytest.raises(Captured):
      train.train_and_evaluate(config, str(tmp_path / str(seed)))
  assert seen['data_seeds'] == [0, 1]
  expected = [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(s), 1))) for s in (0, 1)]
  assert len(seen['dropout_keys']) == 2
  assert all(np.array_equal(a, b) for a, b in zip(seen['dropout_keys'], expected))
  assert not np.array_equal(*seen['dropout_keys'])


# ----------------------------------------------------------------------------------------------------------
# End to end: two worker processes on SQLite


WORKER_ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', **COMPILATION_CACHE_ENV}


@pytest.fixture
def workers(tmp_path):
  """start(name) → a `compare run` process of compare_smoke.py in tmp_path (output in NAME.log), in its own
  process group, killed with the test; finish() waits for all and returns their exit codes and logs."""
  started = []

  def start(name):
    with open(tmp_path / f'{name}.log', 'w') as log:
      started.append(start_test_process(
          [sys.executable, '-m', 'bw_jax.sweep', 'compare', 'run', f'--config={COMPARE_SMOKE}', f'--dir={tmp_path}'],
          cwd=REPO, env=WORKER_ENV, stdout=log, stderr=subprocess.STDOUT))
    return started[-1]

  def finish(*processes):
    codes = [p.wait(timeout=900) for p in processes]
    logs = '\n'.join(path.read_text()[-3000:] for path in sorted(tmp_path.glob('*.log')))
    return codes, logs

  yield start, finish
  for process in started:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()


def load_compare(directory):
  return optuna.load_study(study_name='compare_smoke', storage=create_storage(default_storage(str(directory))))


def assert_every_run_complete_once(study):
  record = study.user_attrs['compare']
  complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
  runs = sorted((compare.arm_of(t.params, record), t.params['seed']) for t in complete)
  assert runs == sorted(map(tuple, record['runs'])) == [('flip', 0), ('flip', 1), ('plain', 0), ('plain', 1)]
  for trial in complete:  # Evals at steps 2 and 4; the last is the run's result.
    assert [h[0] for h in trial.user_attrs['eval_history']] == [2, 4]
    assert trial.user_attrs['eval_history'][-1][1:] == [trial.value, trial.user_attrs['eval_loss']]
  return complete


@pytest.mark.slow
def test_two_workers_run_every_arm_and_seed_exactly_once(tmp_path, workers):
  start, finish = workers
  first = start('worker0')
  wait_for_a_started_trial(str(tmp_path), first)  # As a second machine joins a running comparison.
  codes, logs = finish(first, start('worker1'))
  assert codes == [0, 0], logs
  complete = assert_every_run_complete_once(load_compare(tmp_path))
  assert len({t.user_attrs['worker'] for t in complete}) == 2, logs
  assert 'Report: python -m bw_jax.sweep compare report' in logs
  sweep_cli.main(['compare', 'report', f'--dir={tmp_path}'])
  table = pd.read_csv(tmp_path / 'report' / 'runs.csv')
  assert len(table) == 4 and set(table.state) == {'COMPLETE'}
  summary = (tmp_path / 'report' / 'summary.md').read_text()
  assert f'Machines: {socket.gethostname()}: {os.cpu_count()} CPUs, {jax.device_count()} × cpu' in summary


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(tmp_path, workers):
  """Worker 0 is SIGKILLed after its run's first eval and checkpoint (step 2, finished on disk); the run is
  retried with the same arm and seed, resumes from its last checkpoint and keeps the eval of step 2 from the
  killed attempt; its learning curve still ends with the eval of step 4."""
  start, finish = workers
  victim, other = start('worker0'), start('worker1')
  killed, deadline = None, time.monotonic() + 600
  while killed is None and time.monotonic() < deadline and victim.poll() is None:
    time.sleep(0.1)
    try:
      trials = load_compare(tmp_path).get_trials(deepcopy=False)
    except Exception:  # The workers are still creating the tables or the study.
      continue
    for t in trials:
      if (t.state == TrialState.RUNNING and t.user_attrs.get('worker', '').endswith(f':{victim.pid}')
          and t.user_attrs.get('eval_history')
          and (latest_checkpoint_step(t.user_attrs['workdir']) or 0) >= 2):
        os.killpg(victim.pid, signal.SIGKILL)
        killed = t
        break
  assert killed is not None, 'worker 0 never reached its first eval'
  victim.wait(timeout=60)
  # Step 2's checkpoint or, when the kill landed after it, step 4's (the last, saved before its eval).
  saved = latest_checkpoint_step(killed.user_attrs['workdir'])
  codes, logs = finish(other, start('worker0_restarted'))
  assert codes == [0, 0], logs
  study = load_compare(tmp_path)
  assert_every_run_complete_once(study)
  retry = next(t for t in study.trials if t.system_attrs.get('failed_trial') == killed.number)
  assert study.trials[killed.number].state == TrialState.FAIL
  assert retry.state == TrialState.COMPLETE and retry.params == killed.params
  assert saved in (2, 4) and retry.user_attrs['resumed_from_step'] == saved
  assert retry.user_attrs['eval_history'][0] == killed.user_attrs['eval_history'][0]
  runs, _ = compare_report.run_table(study, 0.5)
  assert len(runs) == 4 and set(runs.state) == {'COMPLETE'} and retry.number in set(runs.number)
