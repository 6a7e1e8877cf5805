"""End-to-end tests of bw_jax.train.loop on the smoke config (tiny BW EfficientNet, 6 steps of 16 images)."""

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util.tensor_util import make_ndarray

from bw_jax.train import loop as train
from bw_jax.train import programs
from bw_jax.train.checkpoints import saved_steps
from bw_jax.train.config.rules import InPrograms
from bw_jax.train.config.schema import KEY_TABLE
from bw_jax.train.plan import DataCounts, plan_for, resolve_plan
from bw_jax.train.config.validation import validate_config
from bw_jax.data import fashion_mnist
from bw_jax.sweep import worker as sweep_worker
from bw_jax.train.health import BWHealthError
from bw_jax.train.step import create_model
from configs import smoke
from subprocess_runs import COMPILATION_CACHE_ENV, run_process, subprocess_env
from test_checkpoints import corrupt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each train_and_evaluate builds new jitted functions; the persistent cache lets runs of the same program
# (smoke, and the two halves of the resumed run) compile once.
jax.config.update('jax_compilation_cache_dir', os.path.join(REPO, '.pytest_cache', 'jax_compilation'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)

# configs/smoke.py evaluates on the first 2,000 test images ('test[:2000]'); the references here slice the
# whole split themselves.
SMOKE_EVAL_EXAMPLES = 2000
assert smoke.get_config().dataset.eval_split == f'test[:{SMOKE_EVAL_EXAMPLES}]'

SUMMARY_KEYS = {'eval_accuracy', 'eval_loss', 'step', 'epochs', 'train_images_per_sec', 'wall_seconds',
                'config'}


def restore(workdir, step):
  """The checkpoint of `step` as nested dicts of NumPy arrays, read back without a target."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return jax.tree.map(np.asarray, manager.restore(step, args=ocp.args.StandardRestore()))


def train_capturing_console(config, workdir) -> tuple[dict, str]:
  """train_and_evaluate's summary and what it printed on the console."""
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    summary = train.train_and_evaluate(config, workdir)
  return summary, console.getvalue()


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """(workdir, summary, console text) of the smoke config's 6 steps."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  return workdir, *train_capturing_console(smoke.get_config(), workdir)


@pytest.fixture(scope='module')
def three_steps(tmp_path_factory):
  """The workdir of the smoke run stopped after step 3 (checkpoint 3), which the resume tests copy and go on
  from: each would otherwise train these steps itself."""
  workdir = str(tmp_path_factory.mktemp('three_steps'))
  config = smoke.get_config()
  config.num_train_steps = 3
  assert train.train_and_evaluate(config, workdir)['step'] == 3
  return workdir


def copy_of(workdir: str, tmp_path) -> str:
  return shutil.copytree(workdir, str(tmp_path / 'run'))


@pytest.mark.slow  # Trains the smoke config.
def test_smoke_writes_summary_events_and_checkpoints(smoke_run):
  workdir, summary, _ = smoke_run
  with open(os.path.join(workdir, 'summary.json')) as f:
    written = json.load(f)
  assert SUMMARY_KEYS <= set(written)
  assert written['step'] == 6 and written['eval_examples'] == SMOKE_EVAL_EXAMPLES
  assert written['epochs'] == pytest.approx(6 * 16 / 60_000)
  assert written['config']['batch_size'] == 16
  assert written['train_images_per_sec'] > 0
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert saved_steps(workdir) == [3, 6]
  assert summary['eval_accuracy'] == written['eval_accuracy']


@pytest.mark.slow  # Trains the smoke config.
def test_tensorboard_events_hold_the_logged_metrics_and_the_config(smoke_run):
  """train/* every log_every_steps (2), eval/* and bw_health/* at the last step equal to the summary's, and
  the resolved config in the HParams plugin."""
  workdir, summary, _ = smoke_run
  events = EventAccumulator(workdir, size_guidance={'tensors': 0}).Reload()
  tags = events.Tags()['tensors']
  scalars = {tag: {e.step: float(make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)} for tag in tags
             if events.SummaryMetadata(tag).plugin_data.plugin_name == 'scalars'}
  assert sorted(scalars['train/loss']) == [2, 4, 6] and 'train/learning_rate' in scalars
  assert scalars['eval/accuracy'] == {6: pytest.approx(summary['eval_accuracy'], abs=1e-7)}
  assert scalars['eval/loss'] == {6: pytest.approx(summary['eval_loss'], rel=1e-6)}
  conditions = [values[6] for tag, values in scalars.items() if tag.endswith('/cov_condition')]
  assert conditions and max(conditions) == pytest.approx(summary['bw_max_cov_condition'], rel=1e-6)
  # BW's counters (the model's bw_health collection, carried in the train state) for every BW layer.
  layers = {tag[:-len('/cov_condition')] for tag in scalars if tag.endswith('/cov_condition')}
  for counter in ('/fallbacks', '/skipped_updates'):
    assert {tag[:-len(counter)] for tag in scalars if tag.endswith(counter)} == layers, counter
  assert sum(v[6] for tag, v in scalars.items() if tag.endswith('/fallbacks')) == summary['bw_fallbacks']
  session = hparams_metadata.parse_session_start_info_plugin_data(
      events.SummaryMetadata('_hparams_/session_start_info').plugin_data.content)
  assert session.hparams['model.bw.method'].string_value == smoke.get_config().model.bw.method
  assert session.hparams['batch_size'].number_value == 16
  assert smoke.get_config().model.num_classes is None and 'model.num_classes' not in session.hparams


@pytest.mark.slow  # Trains the smoke config.
def test_eval_accuracy_matches_an_independent_eval_of_the_checkpoint(smoke_run):
  workdir, summary, _ = smoke_run
  state = restore(workdir, 6)
  config = smoke.get_config()
  model = create_model(config, fashion_mnist.INFO.num_classes)
  images, labels = (a[:SMOKE_EVAL_EXAMPLES] for a in fashion_mnist.load_arrays('test', None))
  info = fashion_mnist.INFO
  images = (images.astype(np.float32) - np.float32(info.mean[0])) / np.float32(info.std[0])
  apply = jax.jit(lambda x: model.apply(
      {'params': state['params'], 'batch_stats': state['batch_stats']}, x, train=False))
  predictions = np.argmax(np.asarray(apply(images)), -1)
  assert summary['eval_accuracy'] == pytest.approx(np.mean(predictions == labels), abs=1e-12)


def fallbacks_in(state: dict) -> int:
  """The fallbacks counted by every BW layer of a restored state (its `bw_health` collection)."""
  flat = flax.traverse_util.flatten_dict(state['bw_health'], sep='/')
  return int(sum(value for key, value in flat.items() if key.endswith('/fallbacks')))


def worst_condition_number(batch_stats: dict) -> float:
  """Reference: the largest 2-norm condition number (NumPy's SVD, float64) over the groups of every BW
  layer's running covariance."""
  flat = flax.traverse_util.flatten_dict(batch_stats, sep='/')
  return max(float(np.max(np.linalg.cond(np.asarray(value, np.float64)))) for key, value in flat.items()
             if key.endswith('/cov'))


@pytest.mark.slow  # Trains the smoke config.
def test_console_says_what_compiles_and_the_eval_line_shows_bw_health(smoke_run):
  workdir, summary, console = smoke_run
  lines = console.splitlines()
  compiling = lines.index('Compiling the train step, then step 1 (minutes for a large model on a CPU) …')
  assert compiling < min(i for i, line in enumerate(lines) if line.startswith('step '))
  eval_line, = (line for line in lines if line.startswith('eval step '))
  match = re.fullmatch(r'eval step 6: loss (\S+)  accuracy (\S+) on 2000 examples  '
                       r'BW: fallbacks (\d+), worst condition number (\S+)', eval_line)
  assert match, eval_line
  assert float(match[2]) == pytest.approx(summary['eval_accuracy'], abs=5e-5)
  state = restore(workdir, 6)
  assert int(match[3]) == fallbacks_in(state)
  assert float(match[4]) == pytest.approx(worst_condition_number(state['batch_stats']), rel=5e-3)


@pytest.mark.slow  # Compiles and trains the smoke model with 32-channel groups.
def test_bw_fallbacks_warn_at_eval_and_bw_max_fallbacks_stops_the_run(tmp_path, capsys):
  """ε = 1e-9 and groups of 32 channels: the head's BW sees 16 rows a step (batch 16 at 1×1), a covariance
  of rank ≤ 15 in 32 dimensions, and round-off, no longer drowned by ε, breaks its factorisations. Two steps
  without a limit warn at the eval; resumed to step 4 with the limit at the count so far, the run stops
  naming the count, keeps checkpoint 4, and a sweep counts the error as the trial's result. (BN in the blocks:
  the head's BW is the one this needs, and new programs with BW in every block would compile twice as long.)"""
  workdir = str(tmp_path)
  config = smoke.get_config()
  config.model.bw.group_size, config.model.bw.epsilon = 32, 1e-9
  config.model.mbconv_type = 0
  config.num_train_steps = 2
  summary, console = train_capturing_console(config, workdir)
  first = fallbacks_in(restore(workdir, 2))
  assert first >= 1 and summary['bw_fallbacks'] == first
  assert f'BW: fallbacks {first}, worst condition number' in console
  assert f'WARNING: BW fallbacks grew from 0 to {first} since the last eval' in console
  config.num_train_steps, config.bw_max_fallbacks = 4, first  # Both are safe to change on resume.
  capsys.readouterr()
  with pytest.raises(BWHealthError) as error:
    train.train_and_evaluate(config, workdir)
  assert 'Compiling the train step, then step 3 ' in capsys.readouterr().out
  assert saved_steps(workdir) == [3, 4]  # checkpoint_every_steps = 3, keep_checkpoints = 2.
  total = fallbacks_in(restore(workdir, 4))
  assert total > first
  assert str(error.value).startswith(f'{total} BW fallbacks exceed config.bw_max_fallbacks={first} (worst '
                                     'condition number ')
  assert 'the checkpoints are kept' in str(error.value)
  assert sweep_worker.is_divergence(error.value)


@pytest.mark.slow  # Trains the smoke config.
def test_resumed_run_ends_with_the_same_state(smoke_run, three_steps, tmp_path):
  straight_dir, *_ = smoke_run
  workdir = copy_of(three_steps, tmp_path)
  config = smoke.get_config()
  config.num_train_steps = 6
  assert train.train_and_evaluate(config, workdir)['step'] == 6
  straight, resumed = restore(straight_dir, 6), restore(workdir, 6)
  for a, b in zip(jax.tree.leaves(straight['params']), jax.tree.leaves(resumed['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  flat_straight = jax.tree_util.tree_leaves_with_path(straight['batch_stats'])
  flat_resumed = dict(jax.tree_util.tree_leaves_with_path(resumed['batch_stats']))
  assert any('cov' in jax.tree_util.keystr(path) for path, _ in flat_straight)  # BW layers are there
  for path, value in flat_straight:
    np.testing.assert_array_equal(value, flat_resumed[path], err_msg=jax.tree_util.keystr(path))
  assert straight['step'] == resumed['step'] == 6
  # Killed between the last checkpoint and the last eval: the rerun trains nothing and still reports that
  # eval to on_eval (a sweep trial's learning curve ends with it).
  evals = []
  again = train.train_and_evaluate(config, workdir, on_eval=lambda step, m: evals.append((step, m)))
  assert again['step'] == 6 and [step for step, _ in evals] == [6]
  assert evals[0][1]['accuracy'] == again['eval_accuracy'] and evals[0][1]['loss'] == again['eval_loss']
  # The straight run, the 3 steps and both reruns ran the programs kept by the first: one trace of the step.
  assert programs.programs_for(resolve_plan(config)).train_step._cache_size() == 1


@pytest.mark.slow  # Trains the smoke config.
def test_sigterm_saves_the_next_step_and_the_rerun_finishes(smoke_run, tmp_path):
  """SIGTERM arriving during step 4 (after its eval): step 5, not a checkpoint step, is saved and the run
  returns; the handler before the run is back; rerunning restores step 5 and ends with the straight run's
  state."""
  straight_dir, *_ = smoke_run
  config = smoke.get_config()
  config.eval_every_steps = 4
  handlers_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  stopped = train.train_and_evaluate(config, str(tmp_path),
                                     on_eval=lambda step, _: os.kill(os.getpid(), signal.SIGTERM))
  assert stopped == {'preempted': True, 'step': 5, 'signal': 'SIGTERM'}
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers_before
  assert saved_steps(str(tmp_path)) == [3, 5]
  assert not os.path.exists(os.path.join(tmp_path, 'summary.json'))
  assert train.train_and_evaluate(smoke.get_config(), str(tmp_path))['step'] == 6
  straight, resumed = restore(straight_dir, 6), restore(str(tmp_path), 6)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def main_on(workdir: str, *flags: str) -> subprocess.CompletedProcess:
  """`python -m bw_jax.main --config=configs/smoke.py --workdir=WORKDIR FLAGS` as a user runs it, with this
  suite's persistent compilation cache."""
  return run_process([sys.executable, '-m', 'bw_jax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
                      *flags], cwd=REPO, env=subprocess_env(COMPILATION_CACHE_ENV), timeout=300)


def assert_quiet(stderr: str) -> None:
  """No traceback on stderr: not ours, not Orbax's (its `strict=False` advice), not asyncio's."""
  for noise in ('Traceback', 'strict=False', 'Event loop is closed'):
    assert noise not in stderr, stderr[-3000:]


def the_error_line(done: subprocess.CompletedProcess) -> str:
  """The one `error: …` line of a run refused as bad input (exit status 2), also the last line on stderr."""
  assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr[-3000:]
  assert_quiet(done.stderr)
  return errors[0]


@pytest.mark.slow  # Starts bw_jax.main on the smoke run's checkpoints.
def test_main_refuses_to_resume_a_changed_config_in_one_line_before_compiling(three_steps, tmp_path):
  workdir = copy_of(three_steps, tmp_path)
  done = main_on(workdir, '--config.batch_size=32', '--config.model.width_multiplier=0.5')
  line = the_error_line(done)
  assert 'batch_size: the checkpoints were written with 16, this run has 32' in line
  assert 'model.width_multiplier: the checkpoints were written with 0.25, this run has 0.5' in line
  assert 'this run has 0.5 (it shapes the train state: never resumed with a change)' in line
  assert '--config.resume_allow_changes=batch_size (always allowed' in line  # Not the width: it cannot load.
  assert 'Compiling' not in done.stdout and saved_steps(workdir) == [3]


@pytest.mark.slow  # Starts bw_jax.main on the smoke run's checkpoints.
def test_main_with_no_loadable_checkpoint_says_so_in_one_line(three_steps, tmp_path):
  workdir = copy_of(three_steps, tmp_path)
  corrupt(os.path.join(workdir, 'checkpoints', '3'), 'truncated data')
  line = the_error_line(main_on(workdir))
  assert line.startswith(f'error: No checkpoint in {os.path.join(workdir, "checkpoints")} loads: step 3: ')
  assert saved_steps(workdir) == [3]  # Nothing moved: the user decides.


@pytest.mark.slow  # Trains steps 4-6 of the smoke config in bw_jax.main.
def test_main_skips_a_corrupt_newest_checkpoint_and_ends_as_the_straight_run(smoke_run, tmp_path):
  """The manifest of checkpoint 6 removed (once 84 asyncio tracebacks): the run says which checkpoint it
  skipped and where it moved it, resumes from 3 and ends with the uninterrupted run's state."""
  straight_dir, *_ = smoke_run
  workdir = copy_of(straight_dir, tmp_path)
  corrupt(os.path.join(workdir, 'checkpoints', '6'), 'manifest removed')
  done = main_on(workdir)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert_quiet(done.stderr)
  aside, = glob.glob(os.path.join(workdir, 'checkpoints', 'corrupt-6-*'))
  assert f'checkpoint of step 6 in {os.path.join(workdir, "checkpoints")} does not load' in done.stdout
  assert f'moved it to {aside}' in done.stdout and 'restored the checkpoint of step 3 instead' in done.stdout
  assert 'Compiling the train step, then step 4 ' in done.stdout
  assert saved_steps(workdir) == [3, 6]
  for a, b in zip(jax.tree.leaves(restore(straight_dir, 6)), jax.tree.leaves(restore(workdir, 6))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_misspelt_key_names_the_allowed_keys():
  config = smoke.get_config()
  config.learning_rat = 0.1
  with pytest.raises(ValueError, match=r"unknown config key 'learning_rat' \(did you mean 'learning_rate'"):
    validate_config(config)
  config = smoke.get_config()
  config.model.bw.metod = 'zca'
  with pytest.raises(ValueError, match=r"'model.bw.metod'.*allowed keys here: .*method"):
    validate_config(config)


@pytest.mark.parametrize('key, value, allowed', [
    ('optimizer', 'adam', "'sgd', 'nesterov', 'adamw', 'rmsprop_tf'"),
    ('lr_schedule', 'linear', "'cosine', 'exponential'"),
    ('model.mbconv_type', 4, '0, 1, 2, 3'),
    ('model.bw.method', 'svd', "'cholesky', 'zca', 'pca', 'newton'"),
    ('dataset.name', 'mnist', 'fashion_mnist'),
])
def test_out_of_range_value_names_the_allowed_values(key, value, allowed):
  config = smoke.get_config()
  with config.unlocked():
    parent = config
    *parents, leaf = key.split('.')
    for name in parents:
      parent = parent[name]
    parent[leaf] = value
  with pytest.raises(ValueError, match=r'(?s)' + repr(value).replace('[', r'\[') + '.*' + allowed):
    validate_config(config)


def test_ranges_are_checked():
  config = smoke.get_config()
  config.ema_decay = 1.0
  with pytest.raises(ValueError, match=r'ema_decay=1.0 is out of range.*\[0.0, 1.0\)'):
    validate_config(config)
  config = smoke.get_config()
  config.num_train_steps = 0
  with pytest.raises(ValueError, match='num_train_steps'):
    validate_config(config)
  config = smoke.get_config()
  config.model.dropout_rate = 1.5
  with pytest.raises(ValueError, match=r'model.dropout_rate=1.5 is out of range.*\[0.0, 1.0\)'):
    validate_config(config)
  config.model.dropout_rate = float('nan')
  with pytest.raises(ValueError, match=r'model.dropout_rate=nan is out of range'):
    validate_config(config)
  config = smoke.get_config()
  config.model.width_multiplier = 0.0
  with pytest.raises(ValueError, match=r'model.width_multiplier=0.0 is out of range.*\(0.0, inf\]'):
    validate_config(config)
  config = smoke.get_config()
  config.seed = 2**32  # JAX keeps 32 bits of it: this would be seed 0 again.
  with pytest.raises(ValueError, match=r'seed=4294967296 is out of range.*\[-2147483648, 2147483647\]'):
    validate_config(config)


@pytest.mark.slow  # Trains the smoke config.
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(three_steps, tmp_path):
  """3 good steps (checkpoint 3), then a rerun at a learning rate of 1e30: the loss goes non-finite within
  steps 5–6 (step 4's loss is taken before its update); the error names that step and checkpoint 3, and no
  later checkpoint is written, though step 6 is a checkpoint step."""
  workdir = copy_of(three_steps, tmp_path)  # The smoke model's 3 steps; only the step at 1e30 compiles.
  config = smoke.get_config()
  config.learning_rate = 1e30
  config.resume_allow_changes = 'learning_rate'  # On purpose: the resumed run must diverge.
  config.num_train_steps = 6
  config.log_every_steps = 100  # Only the save at step 6 looks at the losses of steps 4–6.
  with pytest.raises(train.NonFiniteLossError, match=r'at step [56]; the last good checkpoint \(step 3\) is kept'
                     r'.*Lower config.learning_rate.*bw.epsilon'):
    train.train_and_evaluate(config, workdir)
  assert saved_steps(workdir) == [3]
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restore(workdir, 3)['params']))


def changed_value(value):
  """Another value of the same JSON kind."""
  if value is None or isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  return value + '_x' if isinstance(value, str) else [*value, 1]


FASHION_MNIST = DataCounts(train_examples=60_000, eval_examples=2_000, num_classes=10)


def test_programs_key_holds_the_program_constants_and_the_plan_and_only_them():
  """A run reuses the kept programs of an earlier one when their keys agree: a change of any config key the key
  table marks CONSTANT must change the key; of any other key, the plan's derived values left as they are, must
  not; the plan's class count, global batch and schedule must."""
  config = smoke.get_config()
  plan = plan_for(config, FASHION_MNIST)
  base = programs.programs_key(plan)
  flat = flax.traverse_util.flatten_dict(plan.config.to_dict(), sep='.')
  assert sorted(flat) == sorted(KEY_TABLE)
  for key, value in flat.items():
    changed = flax.traverse_util.unflatten_dict({**flat, key: changed_value(value)}, sep='.')
    same = programs.programs_key(dataclasses.replace(plan, config=ml_collections.FrozenConfigDict(changed))) == base
    constant = KEY_TABLE[key].programs is InPrograms.CONSTANT
    assert same != constant, f'{key}: {"a constant of the programs, yet not in" if same else "in"} the key'
  assert programs.programs_key(dataclasses.replace(plan, num_classes=11)) != base
  assert programs.programs_key(dataclasses.replace(plan, global_batch=32)) != base
  # The run's length reaches the programs through the schedule only: smoke's staircase does not depend on it,
  # a cosine does.
  config.num_train_steps = 3
  assert config.lr_schedule == 'exponential' and programs.programs_key(plan_for(config, FASHION_MNIST)) == base
  shorter_epochs = dataclasses.replace(FASHION_MNIST, train_examples=16_000)  # A staircase of 1 step, not 4.
  assert programs.programs_key(plan_for(config, shorter_epochs)) != base
  config.lr_schedule = 'cosine'
  three = programs.programs_key(plan_for(config, FASHION_MNIST))
  config.num_train_steps = 6
  assert three != programs.programs_key(plan_for(config, FASHION_MNIST))


def test_programs_are_built_from_their_constants_alone():
  """`program_config` holds the CONSTANT keys and nothing else, so a program reading another key would fail
  to build: the table's column is what the programs see."""
  plan = plan_for(smoke.get_config(), FASHION_MNIST)
  kept = flax.traverse_util.flatten_dict(programs.program_config(plan).to_dict(), sep='.')
  assert sorted(kept) == sorted(k for k, key in KEY_TABLE.items() if key.programs is InPrograms.CONSTANT)
  assert all(kept[k] == v for k, v in flax.traverse_util.flatten_dict(plan.config.to_dict(), sep='.').items()
             if k in kept)


def test_infinite_learning_rate_is_rejected():
  config = smoke.get_config()
  config.learning_rate = float('inf')
  with pytest.raises(ValueError, match=r'learning_rate=inf is out of range.*\(0.0, inf\)'):
    validate_config(config)


@pytest.mark.parametrize('batch_size, key, value', [(16, 'batch_size', 16), (18, 'eval_batch_size', 1000)])
def test_batch_size_not_divisible_by_the_devices_names_its_key(monkeypatch, batch_size, key, value):
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  config = smoke.get_config()
  config.batch_size = batch_size
  with pytest.raises(ValueError, match=rf'^config.{key}={value} does not divide evenly over 3 devices'):
    validate_config(config)


def test_missing_imagenet_fails_before_the_model_and_leaves_no_workdir(tmp_path, monkeypatch):
  from configs import imagenet

  def no_model(*args, **kwargs):
    raise AssertionError('the model was built before the data was found')

  monkeypatch.setattr(programs, 'create_model', no_model)
  config = imagenet.get_config()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.batch_size_per_device = None
  config.batch_size = 8  # Any size this machine's devices divide.
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_empty_eval_split_fails_before_the_model_and_leaves_no_workdir(tmp_path, monkeypatch):
  def no_model(*args, **kwargs):
    raise AssertionError('the model was built before the eval split was counted')

  monkeypatch.setattr(programs, 'create_model', no_model)
  config = smoke.get_config()
  config.dataset.eval_split = 'test[5000:5000]'
  with pytest.raises(ValueError, match=r"^config.dataset.eval_split='test\[5000:5000\]' holds no examples"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
