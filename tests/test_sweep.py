"""Tests of bw_jax.sweep: search-space checks, budget slots, sampling, report and promote on synthetic
studies, and end-to-end sweeps of configs/sweeps/smoke.py by worker processes on SQLite (one of them killed)
and on a PostgreSQL server started here."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
import pandas as pd
import pytest

from bw_jax.train.checkpoints import latest_checkpoint_step
from bw_jax.train.config.files import load_config_file
from bw_jax.train.config.validation import validate_config
from bw_jax.train.plan import DataCounts
from bw_jax.sweep import __main__ as sweep_cli
from bw_jax.sweep import promote as sweep_promote
from bw_jax.sweep import report as sweep_report
from bw_jax.sweep import space as sweep_space
from bw_jax.sweep import study as sweep_study
from bw_jax.sweep import worker as sweep_worker
from subprocess_runs import COMPILATION_CACHE_ENV, start_test_process, stop_test_process, subprocess_env, wait_for_a_started_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_SWEEP = os.path.join(REPO, 'configs', 'sweeps', 'smoke.py')
PROMOTE_BASE = os.path.join(REPO, 'configs', 'imagenet.py')
if not os.path.exists(PROMOTE_BASE):
  PROMOTE_BASE = os.path.join(REPO, 'configs', 'default.py')
# The workers share the test suite's persistent compilation cache (tests/test_train.py): every smoke trial
# compiles the same programs, so only the first worker of a fresh checkout compiles.
WORKER_ENV = {**os.environ, **COMPILATION_CACHE_ENV, 'TF_CPP_MIN_LOG_LEVEL': '2'}
SMOKE_KEYS = ['dataset.augment.crop_padding', 'dataset.augment.flip', 'dataset.shuffle_buffer']


# ----------------------------------------------------------------------------------------------------------
# Search-space checks (no training)


def smoke_sweep_with(**space) -> ml_collections.ConfigDict:
  config = load_config_file(SMOKE_SWEEP)
  for key, spec in space.items():
    config.search_space[key] = spec
  return config


def test_python_m_imports_each_sweep_module_once():
  """`python -m bw_jax.sweep` with runpy's double-import RuntimeWarning ('found in sys.modules … prior to
  execution') made an error, for the top command and a subcommand: the subpackage's __init__ imports none
  of its modules, so each is imported once."""
  for args in (['--help'], ['compare', '--help']):
    done = subprocess.run([sys.executable, '-W', 'error::RuntimeWarning', '-m', 'bw_jax.sweep', *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and 'usage: python -m bw_jax.sweep' in done.stdout, done.stderr[-2000:]
    assert 'RuntimeWarning' not in done.stderr


def test_smoke_sweep_config_is_valid():
  assert list(sweep_space.check_sweep_config(load_config_file(SMOKE_SWEEP))) == SMOKE_KEYS


@pytest.mark.parametrize('name', ['fashion_mnist', 'tiny_imagenet'])
def test_real_sweep_configs_are_valid_and_stratify_the_block_types(name):
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', f'{name}.py'))
  space = sweep_space.check_sweep_config(config)
  assert tuple(config.stratify) == sweep_space.BLOCK_KEYS
  for key in ('model.bw.method', 'model.bw.group_size', 'model.bw.momentum', 'model.bw.epsilon',
              'model.bw.center_with', 'model.bw.whiten_with', 'learning_rate', 'weight_decay',
              'model.dropout_rate', 'label_smoothing', 'optimizer', *sweep_space.BLOCK_KEYS):
    assert key in space, key
  assert space['learning_rate'][0] == space['weight_decay'][0] == space['model.bw.epsilon'][0] == 'log_float'


def test_unknown_search_space_key_is_named_with_the_nearest_key():
  config = smoke_sweep_with(model=ml_collections.ConfigDict({'bw': {'metod': ('categorical', ('zca',))}}),
                            learning_rat=('log_float', 0.01, 1.0))
  with pytest.raises(ValueError) as error:
    sweep_space.check_sweep_config(config)
  message = str(error.value)
  assert "unknown config key 'model.bw.metod' (did you mean 'model.bw.method'?)" in message
  assert "unknown config key 'learning_rat' (did you mean 'learning_rate'?)" in message


def test_run_with_a_misspelt_key_fails_before_anything_is_created(tmp_path, capsys):
  path = tmp_path / 'sweep_typo.py'
  path.write_text('from configs.sweeps import smoke as sweep_smoke\n\n\ndef get_config():\n  config = sweep_smoke.get_config()\n'
                  "  config.search_space.model = {'stem_typ': ('categorical', (1, 2))}\n  return config\n")
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(['run', f'--config={path}', f'--dir={tmp_path / "sweep"}'])
  assert exit_.value.code == 2
  assert "unknown config key 'model.stem_typ' (did you mean 'model.stem_type'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'sweep')


def test_values_and_specs_are_checked_against_what_the_code_allows():
  config = smoke_sweep_with(optimizer=('categorical', ('adam', 'sgd')),
                            model=ml_collections.ConfigDict({'mbconv_type': ('categorical', (0, 4)),
                                                             'bw': {'epsilon': ('log_float', 0.0, 1.0)}}),
                            num_epochs=('float', 1.0, 2.0), learning_rate=('float', 0.1))
  with pytest.raises(ValueError) as error:
    sweep_space.check_sweep_config(config)
  message = str(error.value)
  assert "search_space.optimizer = 'adam': config.optimizer='adam' is not supported; choose one of 'sgd'" in message
  assert ('search_space.model.mbconv_type = 4: config.model.mbconv_type=4 is not supported; choose one of 0, 1, '
          '2, 3') in message
  assert "search_space.model.bw.epsilon: 'log_float' needs low > 0" in message
  assert 'search_space.num_epochs: the training length is the trial budget' in message
  assert "search_space.learning_rate: 'float' takes (low, high)" in message
  assert "search_space.optimizer = 'sgd'" not in message


def counts(train_examples: int) -> DataCounts:
  """A train split of `train_examples` (the schedule's lengths depend on nothing else of the data)."""
  return DataCounts(train_examples, eval_examples=1_000, num_classes=10)


@pytest.mark.parametrize('name, num_examples', [('fashion_mnist', 60_000), ('tiny_imagenet', 100_000),
                                                ('smoke', 60_000)])
def test_sweep_files_schedules_complete_within_a_trial(name, num_examples):
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', f'{name}.py'))
  assert sweep_space.schedule_errors(config, sweep_space.check_sweep_config(config), counts(num_examples)) == []
  # Even on a tenth of the data (an epoch 10× shorter) for the relative tiny_imagenet schedule.
  if name == 'tiny_imagenet':
    assert sweep_space.schedule_errors(config, sweep_space.check_sweep_config(config),
                                       counts(num_examples // 10)) == []


def test_searched_schedule_values_are_checked_one_by_one():
  config = smoke_sweep_with(warmup_epochs=('float', 0.0, 0.0001), decay_epochs=('float', 0.001, 1.0))
  space = sweep_space.check_sweep_config(config)
  errors = sweep_space.schedule_errors(config, space, counts(60_000))  # 3750 steps of 16 per epoch, 4-step trials.
  assert len(errors) == 1 and errors[0].startswith("search_space.decay_epochs = 1.0: the 'exponential' schedule "
                                                   'decays every 3750 steps')
  config.search_space.warmup_epochs = ('float', 0.0, 0.01)  # 38 steps: longer than the trial.
  errors = sweep_space.schedule_errors(config, sweep_space.check_sweep_config(config), counts(60_000))
  assert errors[1].startswith('search_space.warmup_epochs = 0.01: the warm-up (warmup_epochs=0.01: 38 steps) '
                              'does not finish within the 4 steps') and len(errors) == 2


def usage_error(capsys, command: list[str]) -> str:
  """The one `error:` line (stderr) of a command line that must exit with status 2."""
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(command)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err.rstrip('\n')


def test_run_refuses_a_warmup_longer_than_the_trial_before_creating_anything(tmp_path, capsys):
  path = tmp_path / 'sweep_long_warmup.py'
  path.write_text('from configs.sweeps import smoke as sweep_smoke\n\n\ndef get_config():\n'
                  '  config = sweep_smoke.get_config()\n  config.train.warmup_epochs = 1.0\n  return config\n')
  assert re.search(r'cannot complete within a trial: train \(with trial_budget\): the warm-up '
                   r'\(warmup_epochs=1.0: 3750 steps\) does not finish within the 4',
                   usage_error(capsys, ['run', f'--config={path}', f'--dir={tmp_path / "sweep"}']))
  assert not os.path.exists(tmp_path / 'sweep')


def test_command_line_overrides_are_typed_as_their_keys():
  from bw_jax.train.config.files import apply_overrides
  sweep = load_config_file(SMOKE_SWEEP)
  apply_overrides(sweep, ['train.dataset.data_dir=/data/x', 'train.learning_rate=0.3', 'train.batch_size=32',
                          'train.dataset.augment.flip=false', 'train.model.num_classes=7', 'n_trials=3',
                          "stratify=('model.stem_type',)"])
  assert sweep.train.dataset.data_dir == '/data/x' and sweep.train.learning_rate == 0.3
  assert sweep.train.batch_size == 32 and sweep.train.dataset.augment.flip is False
  assert sweep.train.model.num_classes == 7 and sweep.n_trials == 3 and sweep.stratify == ('model.stem_type',)
  with pytest.raises(ValueError, match=r"--config.train.batch_size=big: 'big' is not a valid int for "
                                       r"'train.batch_size'"):
    apply_overrides(sweep, ['train.batch_size=big'])


def test_run_with_a_misspelt_override_fails_with_one_line(tmp_path, capsys):
  assert re.fullmatch(r"error: --config.train.dataset.data_dri=/x: unknown sweep config key "
                      r"'train.dataset.data_dri' \(did you mean 'train.dataset.data_dir'\?\).",
                      usage_error(capsys, ['run', f'--config={SMOKE_SWEEP}', f'--dir={tmp_path / "sweep"}',
                                           '--config.train.dataset.data_dri=/x']))
  assert not os.path.exists(tmp_path / 'sweep')


# ----------------------------------------------------------------------------------------------------------
# Budget slots and sampling


def frozen(number, state=TrialState.COMPLETE, retry_of=None, surplus=False):
  system_attrs = {} if retry_of is None else {'failed_trial': retry_of, 'retry_history': [retry_of]}
  trial = optuna.trial.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                    system_attrs=system_attrs, user_attrs={'surplus': True} if surplus else {})
  trial.number = number
  return trial


def test_budget_slots_count_fresh_trials_and_give_retries_their_original_slot():
  # 0 done, 1 killed and retried as 4, 2 running, 3 surplus (asked together with 2 when 1 slot was left).
  trials = [frozen(0), frozen(1, TrialState.FAIL), frozen(2, TrialState.RUNNING),
            frozen(3, TrialState.FAIL, surplus=True), frozen(4, TrialState.WAITING, retry_of=1)]
  assert [sweep_study.budget_slot(trials, t) for t in trials] == [0, 1, 2, 3, 1]
  assert sweep_study.can_start(trials, 3)  # The retry waits.
  assert not sweep_study.budget_done(trials, 3)
  assert sweep_study.finished_count(trials) == 1  # 1 is replaced by its retry, 3 never trained.
  trials[2] = frozen(2)
  trials[4] = frozen(4, retry_of=1)
  assert not sweep_study.can_start(trials, 3) and sweep_study.budget_done(trials, 3)
  assert sweep_study.finished_count(trials) == 3
  assert sweep_study.can_start(trials, 5) and not sweep_study.budget_done(trials, 5)


def test_sampler_is_seeded_per_slot_and_stratifies_the_block_types():
  space = {'model.stem_type': ('categorical', (1, 2)), 'model.mbconv_type': ('categorical', (0, 1, 2, 3)),
           'model.head_type': ('categorical', (1, 2)), 'learning_rate': ('log_float', 0.01, 1.0)}
  strata = {k: space[k][1] for k in sweep_space.BLOCK_KEYS}

  def draw(seed, n):
    study = optuna.create_study(sampler=sweep_study.SweepSampler(seed, strata))
    return [sweep_space.suggest(study.ask(), space) for _ in range(n)]

  first, again, other = draw(0, 20), draw(0, 20), draw(1, 20)
  assert first == again  # Two workers with one seed draw the same value for a slot …
  assert len({p['learning_rate'] for p in first}) == 20  # … and different values for different slots.
  assert first != other
  combos = [tuple(p[k] for k in sweep_space.BLOCK_KEYS) for p in first]
  assert len(set(combos[:16])) == 16  # 2 × 4 × 2 combinations: each once in the first 16 slots,
  assert combos[16:] == combos[:4]  # then the same order again.
  lr = np.log([p['learning_rate'] for p in first])
  assert np.all((lr >= np.log(0.01)) & (lr <= np.log(1.0)))


def test_qmc_sampler_covers_the_space():
  config = load_config_file(os.path.join(REPO, 'configs', 'sweeps', 'fashion_mnist.py'))
  config.sampler, config.stratify = 'qmc', ()
  space = sweep_space.check_sweep_config(config)
  study = optuna.create_study(sampler=sweep_study.create_sampler(config, space), direction='maximize')
  draws = []
  for _ in range(8):
    trial = study.ask()
    draws.append(sweep_space.suggest(trial, space))
    study.tell(trial, 0.5)
  rates = [d['learning_rate'] for d in draws]
  assert len(set(rates)) == 8 and all(0.05 <= r <= 0.8 for r in rates)
  assert {d['model.mbconv_type'] for d in draws} <= {0, 1, 2, 3}


def test_a_non_finite_loss_is_a_result_and_other_errors_are_crashes():
  from bw_jax.train import loop as train  # The error that the worker must recognise, raised by the training loop itself.
  with pytest.raises(train.NonFiniteLossError) as error:
    train.check_finite([(3, {'loss': float('nan')})], load_config_file(SMOKE_SWEEP).train, None)
  assert sweep_worker.is_divergence(error.value)
  assert not sweep_worker.is_divergence(RuntimeError('XLA ran out of memory'))
  assert not sweep_worker.is_divergence(RuntimeError('Training loss is nan at step 3'))


# ----------------------------------------------------------------------------------------------------------
# Report and promote on a synthetic study


@pytest.fixture(scope='module')
def synthetic_study():
  """12 trials of a fake sweep with known results: 10 complete, one pruned, one failed and retried."""
  config = load_config_file(SMOKE_SWEEP)
  config.search_space = ml_collections.ConfigDict({
      'model': {'stem_type': ('categorical', (1, 2)), 'mbconv_type': ('categorical', (1, 2)),
                'bw': {'method': ('categorical', ('cholesky', 'zca'))}},
      'learning_rate': ('log_float', 0.01, 1.0), 'optimizer': ('categorical', ('nesterov', 'adamw')),
      'dataset': {'augment': {'flip': ('categorical', (True, False))}}})
  space = sweep_space.check_sweep_config(config)
  study = optuna.create_study(direction='maximize')
  study.set_user_attr('sweep', sweep_study.experiment_record(config))
  rng = np.random.RandomState(0)
  distributions = {k: (CategoricalDistribution(list(s[1])) if s[0] == 'categorical'
                       else FloatDistribution(s[1], s[2], log=True)) for k, s in space.items()}
  for number in range(12):
    params = {'model.stem_type': [1, 2][number % 2], 'model.mbconv_type': [1, 2][number // 2 % 2],
              'model.bw.method': ['cholesky', 'zca'][number % 3 % 2], 'learning_rate': float(rng.uniform(0.01, 1)),
              'optimizer': ['nesterov', 'adamw'][number % 2], 'dataset.augment.flip': bool(number % 2)}
    state = {7: TrialState.PRUNED, 9: TrialState.FAIL}.get(number, TrialState.COMPLETE)
    accuracy = round(float(rng.uniform(0.5, 0.9)), 4)
    study.add_trial(optuna.trial.create_trial(
        state=state, value=accuracy if state == TrialState.COMPLETE else None, params=params,
        distributions=distributions, intermediate_values={5: accuracy} if state == TrialState.PRUNED else None,
        system_attrs={'failed_trial': 9, 'retry_history': [9]} if number == 11 else {},
        user_attrs={'eval_accuracy': accuracy, 'seconds': 10.0 + number, 'model.head_type': 1,
                    **({'error': 'worker died'} if state == TrialState.FAIL else {})}))
  return study


def test_report_tables_match_an_independent_computation(synthetic_study, tmp_path):
  results = sweep_report.write_report(synthetic_study, str(tmp_path))
  for name in ('results.csv', 'block_types.csv', 'summary.md', *sweep_report.PLOTS):
    assert os.path.getsize(tmp_path / name) > 0, name
  csv = pd.read_csv(tmp_path / 'results.csv')
  assert list(csv.columns[:6]) == ['number', 'state', 'eval_accuracy', 'eval_loss', 'seconds', 'step']
  assert {'model.stem_type', 'model.mbconv_type', 'model.head_type', 'model.bw.method', 'learning_rate',
          'optimizer', 'dataset.augment.flip', 'retried_from'} <= set(csv.columns)
  assert list(csv.number) == list(range(12)) and csv.retried_from[11] == 9 and csv.state[9] == 'FAIL'
  complete = [t for t in synthetic_study.trials if t.state == TrialState.COMPLETE]
  blocks = pd.read_csv(tmp_path / 'block_types.csv')
  assert blocks['count'].sum() == len(complete) == 10
  for _, row in blocks.iterrows():
    values = [t.value for t in complete
              if (t.params['model.stem_type'], t.params['model.mbconv_type']) == (row['model.stem_type'],
                                                                                   row['model.mbconv_type'])]
    assert row['count'] == len(values) and row['best'] == max(values)
    assert row['mean'] == pytest.approx(np.mean(values), abs=1e-12)
  assert list(blocks.best) == sorted(blocks.best, reverse=True)
  best = synthetic_study.best_trial
  assert blocks.best_trial[0] == best.number
  summary = (tmp_path / 'summary.md').read_text()
  best_row = summary.split('## Best trials')[1].split('\n')[4]
  assert best_row.startswith(f'| {best.number} | {best.value:.4g} |')
  assert '12 trials: 10 complete, 1 fail, 1 pruned' in summary
  assert len(results) == 12


def test_promote_writes_configs_that_main_accepts(synthetic_study, tmp_path):
  lines = sweep_promote.promote(synthetic_study, 2, PROMOTE_BASE, str(tmp_path), 'runs/promoted')
  blocks = sweep_report.block_type_table(sweep_report.results_table(synthetic_study), 'eval_accuracy', True)
  written = sorted(glob.glob(str(tmp_path / 'stem*.py')))
  assert len(written) == 2
  base = load_config_file(PROMOTE_BASE)
  for rank, row in enumerate(blocks.head(2).to_dict('records')):
    name = f"stem{row['model.stem_type']}_mbconv{row['model.mbconv_type']}_head1"
    path = str(tmp_path / f'{name}.py')
    assert path in written
    config = load_config_file(path)  # As bw_jax.main loads --config: with the repository on sys.path.
    validate_config(config)
    trial = synthetic_study.trials[row['best_trial']]
    assert config.learning_rate == trial.params['learning_rate']  # Per 256 images: carried as is.
    assert config.optimizer == trial.params['optimizer']
    assert config.model.bw.method == trial.params['model.bw.method']
    assert (config.model.stem_type, config.model.mbconv_type, config.model.head_type) == (
        trial.params['model.stem_type'], trial.params['model.mbconv_type'], 1)
    assert config.dataset.to_dict() == base.dataset.to_dict()  # Data keys stay the base's.
    assert config.batch_size == base.batch_size and config.num_epochs == base.num_epochs
    assert config.batch_size_per_device == base.batch_size_per_device == 128
    assert f'{sys.executable} -m bw_jax.main --config={path} --workdir=runs/promoted/{name}' in lines
    assert [line for line in lines if line[0].isdigit()][rank].startswith(f'{rank + 1}. {path}: trial {trial.number}')
  commands = (tmp_path / 'commands.sh').read_text()
  assert commands.count(f'{sys.executable} -m bw_jax.main') == 2  # The interpreter that ran promote.


def study_of(sweep, trials):
  """An in-memory study of `sweep` holding COMPLETE `trials`: (params, eval_accuracy, user_attrs) each."""
  space = sweep_space.check_sweep_config(sweep)
  distributions = {k: (CategoricalDistribution(list(s[1])) if s[0] == 'categorical'
                       else FloatDistribution(s[1], s[2], log=s[0] == 'log_float')) for k, s in space.items()}
  study = optuna.create_study(direction='maximize')
  study.set_user_attr('sweep', sweep_study.experiment_record(sweep))
  for params, accuracy, attrs in trials:
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=accuracy, params=params, distributions=distributions,
        user_attrs={'eval_accuracy': accuracy, 'seconds': 5.0, 'model.mbconv_type': 0, 'model.head_type': 1,
                    'num_classes': 10, **attrs}))
  return study


@pytest.fixture(scope='module')
def broken_study():
  """Five trials on 10 classes (chance loss ln 10 = 2.30, absurd above 23.03): 1, 2 and 3 are broken."""
  sweep = load_config_file(SMOKE_SWEEP)
  sweep.search_space = ml_collections.ConfigDict({'model': {'stem_type': ('categorical', (1, 2))},
                                                  'learning_rate': ('log_float', 0.01, 1.0)})
  return study_of(sweep, [
      ({'model.stem_type': 1, 'learning_rate': 0.1}, 0.6, {'eval_loss': 1.2, 'bw_fallbacks': 0}),
      ({'model.stem_type': 1, 'learning_rate': 0.9}, 0.9, {'eval_loss': 1.1e7, 'bw_fallbacks': 0}),
      ({'model.stem_type': 2, 'learning_rate': 0.5}, 0.8, {'eval_loss': float('nan'), 'bw_fallbacks': 0}),
      ({'model.stem_type': 2, 'learning_rate': 0.3}, 0.85, {'eval_loss': 0.9, 'bw_fallbacks': 3}),
      ({'model.stem_type': 2, 'learning_rate': 0.2}, 0.5, {'eval_loss': 23.0, 'bw_fallbacks': 0})])


def test_broken_trials_are_flagged_shown_and_left_out_of_the_rankings(broken_study, tmp_path):
  sweep_report.write_report(broken_study, str(tmp_path))
  csv = pd.read_csv(tmp_path / 'results.csv')
  assert list(csv['flags'].fillna('')) == ['', 'eval loss 1.1e+07 > 10·ln(10)', 'eval loss nan', 'BW fell back 3 times', '']
  assert list(csv.bw_fallbacks) == [0, 0, 0, 3, 0] and csv.eval_loss[1] == 1.1e7
  blocks = pd.read_csv(tmp_path / 'block_types.csv')
  assert list(blocks.best_trial) == [0, 4] and list(blocks['count']) == [1, 1]  # Only the healthy trials.
  summary = (tmp_path / 'summary.md').read_text()
  assert '5 trials: 5 complete; 3 flagged as broken.' in summary
  best_rows = summary.split('## Best trials')[1].split('\n\n')[1].splitlines()
  assert best_rows[0].startswith('| number | eval_accuracy | eval_loss | bw_fallbacks |')
  assert [row.split(' | ')[0] for row in best_rows[2:]] == ['| 0', '| 4']
  flagged = summary.split('## Flagged trials')[1].split('\n\n')[1].splitlines()[2:]
  assert [row.split(' | ')[0] for row in flagged] == ['| 1', '| 2', '| 3']
  assert flagged[0].endswith('| 1.1e+07 | 0 | eval loss 1.1e+07 > 10·ln(10) |')


@pytest.fixture(scope='module')
def sgd_study():
  """An SGD sweep (cosine, 8 of 40 steps of warm-up, 3750 steps per epoch) on 10 classes: trial 0 and 1 are
  the best of their combinations, 2 is broken, 3 is below the quality floor (0.12 < 1/10 + 0.05)."""
  sweep = load_config_file(SMOKE_SWEEP)
  sweep.train.lr_schedule, sweep.train.warmup_epochs, sweep.trial_budget.num_train_steps = 'cosine', 0.002, 40
  sweep.search_space = ml_collections.ConfigDict({
      'model': {'stem_type': ('categorical', (1, 2))}, 'learning_rate': ('log_float', 0.01, 1.0),
      'optimizer': ('categorical', ('nesterov', 'sgd'))})
  healthy = {'eval_loss': 1.0, 'bw_fallbacks': 0, 'train_examples': 60_000}
  return study_of(sweep, [
      ({'model.stem_type': 1, 'learning_rate': 0.1, 'optimizer': 'nesterov'}, 0.7, healthy),
      ({'model.stem_type': 2, 'learning_rate': 0.9, 'optimizer': 'sgd'}, 0.5, healthy),
      ({'model.stem_type': 1, 'learning_rate': 0.2, 'optimizer': 'sgd'}, 0.95, {**healthy, 'eval_loss': 1e7}),
      ({'model.stem_type': 2, 'learning_rate': 0.3, 'optimizer': 'sgd'}, 0.12, {**healthy, 'model.mbconv_type': 3})])


def test_promote_into_another_optimizer_family_carries_the_trials_schedule_shape(sgd_study, tmp_path):
  base = os.path.join(REPO, 'configs', 'imagenet.py')  # RMSProp, staircase decay, 5 warm-up epochs, EMA.
  lines = sweep_promote.promote(sgd_study, 3, base, str(tmp_path), 'runs/promoted')
  assert sorted(os.listdir(tmp_path)) == ['commands.sh', 'stem1_mbconv0_head1.py', 'stem2_mbconv0_head1.py']
  assert ('Not promoted: stem 2 / MBConv 3 / head 1 (trial 3): eval_accuracy 0.1200 is below the quality floor '
          '0.1500 (chance 1/10 + margin 0.05; --chance-margin sets it).') in lines
  assert '1 trials flagged as broken were left out (see the report).' in lines
  assert lines[0].startswith(f'1. {tmp_path}/stem1_mbconv0_head1.py: trial 0, eval_accuracy 0.7000')
  config = load_config_file(str(tmp_path / 'stem1_mbconv0_head1.py'))
  validate_config(config)
  smoke_train = load_config_file(SMOKE_SWEEP).train
  # The trial's recipe: its optimizer and rate, the sweep's schedule shape, momentum, weight decay and EMA.
  assert (config.optimizer, config.learning_rate, config.lr_schedule) == ('nesterov', 0.1, 'cosine')
  assert config.warmup_fraction == pytest.approx(8 / 40)  # round(0.002 · 3750) = 8 of the trial's 40 steps.
  assert config.decay_epochs == pytest.approx(4 / 40 * 350)  # round(0.001 · 3750) = 4 of 40 steps, of 350 epochs.
  assert (config.ema_decay, config.momentum, config.weight_decay) == (
      smoke_train.ema_decay, smoke_train.momentum, smoke_train.weight_decay)
  # The base's: the data and everything about the target run.
  imagenet = load_config_file(base)
  assert config.dataset.to_dict() == imagenet.dataset.to_dict()
  for key in ('batch_size', 'num_epochs', 'half_precision', 'keep_checkpoints', 'label_smoothing'):
    assert config[key] == imagenet[key], key
  text = (tmp_path / 'stem1_mbconv0_head1.py').read_text()
  assert "The optimization recipe is the trial's" in text and "imagenet.py's schedule was tuned for" in text
  assert ("peak 0.00625 at the trial's batch 16, 0.8 at batch_size 2048 (16 devices × batch_size_per_device "
          "128).") in ' '.join(text.split())
  assert text.count('Warning:') == 1 and "Warning: linear scaling stretches the trial's batch 16 to 2048 (128×" in text
  # Trial 1: 0.9 per 256 images is a peak of 7.2 at batch 2048.
  warning = 'Warning: the peak learning rate 7.2 at batch 2048 is above the known-good ~2 for SGD'
  assert warning in ' '.join((tmp_path / 'stem2_mbconv0_head1.py').read_text().split())
  assert any(line.strip().startswith(warning) for line in lines)


def test_promote_into_the_same_optimizer_family_keeps_the_base_schedule(sgd_study, tmp_path):
  base = os.path.join(REPO, 'configs', 'default.py')  # Nesterov: the SGD family.
  sweep_promote.promote(sgd_study, 1, base, str(tmp_path), 'runs/promoted')
  config = load_config_file(str(tmp_path / 'stem1_mbconv0_head1.py'))
  default = load_config_file(base)
  assert (config.optimizer, config.learning_rate) == ('nesterov', 0.1)
  for key in ('lr_schedule', 'warmup_epochs', 'warmup_fraction', 'ema_decay', 'weight_decay', 'batch_size'):
    assert config[key] == default[key], key
  assert "The optimization schedule (warm-up, decay, EMA) is default.py's" in (
      ' '.join((tmp_path / 'stem1_mbconv0_head1.py').read_text().split()))


def test_promote_writes_nothing_below_the_quality_floor_and_says_why(sgd_study, tmp_path):
  with pytest.raises(ValueError) as error:
    sweep_promote.promote(sgd_study, 3, PROMOTE_BASE, str(tmp_path / 'out'), 'runs', chance_margin=0.65)
  message = str(error.value)
  assert message.startswith('Nothing promoted: no combination reaches the quality floor.')
  assert 'trial 0): eval_accuracy 0.7000 is below the quality floor 0.7500 (chance 1/10 + margin 0.65' in message
  assert not os.path.exists(tmp_path / 'out')


def formula_schedule(peak: float, warmup: float, total: float, shape: str, period: float = 1.0, rate: float = 1.0):
  """The learning rate at steps t by its formula, in float64: linear from 0 to `peak` over `warmup` steps, then a
  cosine to 0 at `total` or a staircase times `rate` every `period` steps."""
  def at(t):
    t = np.asarray(t, np.float64)
    after = np.maximum(t - warmup, 0.0)
    if shape == 'cosine':
      decayed = peak * 0.5 * (1 + np.cos(np.pi * np.minimum(after / (total - warmup), 1.0)))
    else:
      decayed = peak * rate ** np.floor(after / period)
    return np.where(t < warmup, peak * t / max(warmup, 1e-12), decayed)
  return at


def promoted_schedule(path, devices: int, num_examples: int):
  """(the learning rate at steps t, total steps) of the promoted config at `path`, on `devices` devices, as
  train_and_evaluate builds it from that config."""
  from bw_jax.train.optim import learning_rate_fn
  from bw_jax.train.plan import plan_for
  config = load_config_file(str(path))
  plan = plan_for(config, DataCounts(num_examples, 1, config.model.num_classes or 1000), devices)
  schedule = learning_rate_fn(plan.schedule, plan.peak_learning_rate)
  return (lambda t: np.asarray([schedule(int(step)) for step in np.round(t)], np.float64)), plan.num_train_steps


def test_a_promoted_schedule_is_the_trials_shape_at_the_targets_length(sgd_study, tmp_path):
  """Trial 0 (nesterov, cosine, 8 of its 40 steps of warm-up, 0.1 per 256 images) promoted onto imagenet.py
  and run on 16 devices (batch 2048, 350 epochs of ImageNet): its rate warms up over 20 % of the run to
  0.1 · 2048 / 256 = 0.8 and falls along a cosine to 0, as the formula says; at every fraction of the run it
  is the trial's rate times the ratio of the two peaks."""
  from bw_jax.data import dataset_module
  sweep_promote.promote(sgd_study, 1, os.path.join(REPO, 'configs', 'imagenet.py'), str(tmp_path), 'runs')
  rate, total = promoted_schedule(tmp_path / 'stem1_mbconv0_head1.py', 16,
                                  dataset_module('imagenet2012').INFO.num_examples['train'])
  assert total == 350 * (1281167 // 2048)
  steps = np.linspace(0, total, 81)
  np.testing.assert_allclose(rate(steps), formula_schedule(0.8, round(0.2 * total), total, 'cosine')(np.round(steps)),
                             rtol=1e-5, atol=1e-7)
  trial = formula_schedule(0.1 * 16 / 256, 8, 40, 'cosine')
  fractions = np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 0.95])
  np.testing.assert_allclose(rate(fractions * total) / 0.8, trial(fractions * 40) / (0.1 * 16 / 256), atol=1e-4)


@pytest.fixture(scope='module')
def rmsprop_study():
  """One RMSProp trial of a sweep whose training config (configs/sweeps/smoke.py's) halves the rate every 4
  steps without warm-up, with a weight EMA; 40 steps a trial."""
  sweep = load_config_file(SMOKE_SWEEP)
  sweep.train.ema_decay, sweep.trial_budget.num_train_steps = 0.999, 40
  sweep.search_space = ml_collections.ConfigDict({
      'model': {'stem_type': ('categorical', (1, 2))}, 'learning_rate': ('log_float', 0.001, 0.1),
      'optimizer': ('categorical', ('rmsprop_tf', 'nesterov'))})
  healthy = {'eval_loss': 1.0, 'bw_fallbacks': 0, 'train_examples': 60_000}
  return study_of(sweep, [({'model.stem_type': 1, 'learning_rate': 0.016, 'optimizer': 'rmsprop_tf'}, 0.8, healthy)])


def test_an_rmsprop_trial_promoted_onto_an_sgd_base_keeps_its_recipe_and_schedule_shape(rmsprop_study, tmp_path):
  """Onto configs/default.py (nesterov, cosine; 7 epochs of 468 steps of 128): the promoted run trains with TF's
  RMSProp, the trial's staircase (halving at every tenth of the run, as the trial's 40 steps halved every 4)
  and EMA; its first update is TF1 RMSProp's by the formula."""
  from bw_jax.train.optim import create_optimizer, learning_rate_fn
  from bw_jax.train.plan import plan_for
  sweep_promote.promote(rmsprop_study, 1, os.path.join(REPO, 'configs', 'default.py'), str(tmp_path), 'runs')
  path = tmp_path / 'stem1_mbconv0_head1.py'
  config = load_config_file(str(path))
  validate_config(config)
  assert (config.optimizer, config.learning_rate, config.lr_schedule, config.decay_rate, config.ema_decay) == (
      'rmsprop_tf', 0.016, 'exponential', 0.5, 0.999)
  rate, total = promoted_schedule(path, 1, 60_000)
  assert total == 7 * (60_000 // 128)
  peak = 0.016 * 128 / 256
  middles = np.arange(10) / 10 + 0.05  # Of each tenth of the run: away from the steps where the rate halves.
  np.testing.assert_allclose(rate(middles * total) / peak, 0.5 ** np.arange(10), rtol=1e-6)  # float32 rates.
  trial = formula_schedule(0.016 * 16 / 256, 0, 40, 'exponential', period=4, rate=0.5)
  np.testing.assert_allclose(trial(middles * 40) / (0.016 * 16 / 256), 0.5 ** np.arange(10))
  # TF1 RMSProp's first step (squared average starting at 1, ε inside the root, L2 weight decay on kernels).
  plan = plan_for(config, DataCounts(60_000, 1, 10), 1)
  assert plan.steps_per_epoch == 468
  optimizer = create_optimizer(config, learning_rate_fn(plan.schedule, plan.peak_learning_rate), config.weight_decay)
  kernel, gradient = np.full((2, 3), 0.5), np.linspace(-1.0, 1.0, 6).reshape(2, 3)
  updates, _ = optimizer.update({'kernel': gradient}, optimizer.init({'kernel': kernel}), {'kernel': kernel})
  g = gradient + config.weight_decay * kernel
  np.testing.assert_allclose(updates['kernel'], -peak * g / np.sqrt(0.9 + 0.1 * g ** 2 + 1e-3), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# End-to-end sweeps: worker processes


def start_worker(directory, log_name, *args):
  """A `python -m bw_jax.sweep run` process of the smoke sweep, its output in DIRECTORY/LOG_NAME.log."""
  with open(os.path.join(directory, f'{log_name}.log'), 'w') as log:
    return start_test_process([sys.executable, '-m', 'bw_jax.sweep', 'run', f'--config={SMOKE_SWEEP}',
                               f'--dir={directory}', *args], cwd=REPO, env=WORKER_ENV, stdout=log,
                              stderr=subprocess.STDOUT)


def wait_all(workers, directory, timeout=900):
  try:
    codes = [w.wait(timeout=timeout) for w in workers]
  finally:
    for worker in workers:
      stop_test_process(worker)
  logs = '\n'.join(open(p).read()[-3000:] for p in sorted(glob.glob(os.path.join(directory, '*.log'))))
  assert codes == [0] * len(workers), logs
  return logs


def run_two_workers(directory, *args):
  """Two workers; the second starts once the first has taken a trial (wait_for_a_started_trial), as a second
  machine joins a running sweep."""
  os.makedirs(directory, exist_ok=True)
  first = start_worker(directory, 'worker0', *args)
  try:
    wait_for_a_started_trial(directory, first)
  except BaseException:
    stop_test_process(first)
    raise
  return wait_all([first, start_worker(directory, 'worker1', *args)], directory)


def load(directory, storage=None):
  return optuna.load_study(study_name='sweep_smoke',
                           storage=sweep_study.create_storage(storage or sweep_study.default_storage(directory)))


def assert_budget_of_distinct_complete_trials(study, n_trials):
  trials = study.get_trials(deepcopy=False)
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  assert len(complete) == n_trials
  assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials
  assert sorted(sweep_study.original_number(t) for t in complete) == sweep_study.fresh_numbers(trials)[:n_trials]
  assert sweep_study.finished_count(trials) == n_trials
  assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
  return complete


@pytest.fixture(scope='module')
def sqlite_sweep(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('sweep_sqlite'))
  logs = run_two_workers(directory)
  return directory, load(directory), logs


@pytest.mark.slow  # Worker processes train smoke trials.
def test_two_workers_on_sqlite_spend_the_budget_exactly(sqlite_sweep):
  directory, study, logs = sqlite_sweep
  complete = assert_budget_of_distinct_complete_trials(study, 6)
  assert len({t.user_attrs['worker'] for t in complete}) == 2
  for trial in complete:
    assert trial.user_attrs['workdir'] == os.path.join(directory, 'trials', f'{trial.number:04d}')
    assert os.path.exists(os.path.join(trial.user_attrs['workdir'], 'summary.json'))
    assert trial.user_attrs['step'] == 4 and 0 <= trial.value <= 1
  assert logs.count(' COMPLETE eval_accuracy ') == 6 and '[6/6] trial ' in logs
  assert logs.count("Sweep 'sweep_smoke': 6/6 trials finished (6 complete") == 2


@pytest.mark.slow  # Worker processes train smoke trials.
def test_report_of_the_sweep(sqlite_sweep):
  directory, study, _ = sqlite_sweep
  sweep_cli.main(['report', f'--dir={directory}'])
  out = os.path.join(directory, 'report')
  for name in sweep_report.PLOTS:
    assert os.path.getsize(os.path.join(out, name)) > 1000, name
  csv = pd.read_csv(os.path.join(out, 'results.csv'))
  assert list(csv.columns[:6]) == ['number', 'state', 'eval_accuracy', 'eval_loss', 'seconds', 'step']
  assert set(SMOKE_KEYS + list(sweep_space.BLOCK_KEYS)) <= set(csv.columns)
  assert len(csv) == 6 and set(csv.state) == {'COMPLETE'}
  for _, row in csv.iterrows():
    trial = study.trials[row.number]
    assert row.eval_accuracy == trial.value
    assert [row[k] for k in SMOKE_KEYS] == [trial.params[k] for k in SMOKE_KEYS]
  best = study.best_trial
  top = sweep_report.ranked(csv, 'eval_accuracy', True).iloc[0]
  assert top.eval_accuracy == best.value  # Ties (4 steps of training) break by trial number.
  assert top.number == min(t.number for t in study.trials if t.value == best.value)
  summary = open(os.path.join(out, 'summary.md')).read()
  assert f'| {top.number} | {best.value:.4g} |' in summary.split('## Best trials')[1].split('\n')[4]


@pytest.mark.slow  # Worker processes train smoke trials.
def test_promote_from_the_sweep(sqlite_sweep, tmp_path, capsys):
  directory, study, _ = sqlite_sweep
  # 4 steps of training leave every trial at chance: below the default quality floor, nothing is promoted …
  assert re.search(r'Nothing promoted: no combination reaches the quality floor. Not '
                   r'promoted: stem 1 / MBConv 0 / head 1 \(trial \d+\): eval_accuracy',
                   usage_error(capsys, ['promote', f'--dir={directory}', '--top-k=3', f'--base={PROMOTE_BASE}',
                                        f'--out={tmp_path}']))
  assert not glob.glob(str(tmp_path / '*'))
  # … unless the floor is lowered below chance.
  sweep_cli.main(['promote', f'--dir={directory}', '--top-k=3', f'--base={PROMOTE_BASE}', f'--out={tmp_path}',
                  '--chance-margin=-0.1'])
  written = glob.glob(str(tmp_path / 'stem*.py'))
  assert [os.path.basename(p) for p in written] == ['stem1_mbconv0_head1.py']  # The one combination.
  config = load_config_file(written[0])
  validate_config(config)
  assert (config.model.stem_type, config.model.mbconv_type, config.model.head_type) == (1, 0, 1)


@pytest.fixture(scope='module')
def killed_sweep(tmp_path_factory):
  """Two workers, budget 3; worker 0 is SIGKILLed once its trial has checkpointed, then started again."""
  directory = str(tmp_path_factory.mktemp('sweep_killed'))
  victim, other = start_worker(directory, 'worker0', '--n-trials=3'), start_worker(directory, 'worker1',
                                                                                    '--n-trials=3')
  killed, study, deadline = None, None, time.time() + 600
  while killed is None and time.time() < deadline and victim.poll() is None:
    time.sleep(0.2)
    if not os.path.exists(os.path.join(directory, 'study.db')):
      continue
    try:
      study = study or load(directory)
    except Exception:  # The workers are still creating the tables or study.
      continue
    for t in study.get_trials(deepcopy=False):
      workdir = t.user_attrs.get('workdir', '')
      if (t.state == TrialState.RUNNING and t.user_attrs.get('worker', '').endswith(f':{victim.pid}')
          and (latest_checkpoint_step(workdir) or 0) >= 2):
        victim.send_signal(signal.SIGKILL)
        killed = t.number
  assert killed is not None, 'worker 0 never reached a checkpoint'
  assert victim.wait(timeout=60) == -signal.SIGKILL
  restarted = start_worker(directory, 'worker0_restarted', '--n-trials=3')
  logs = wait_all([other, restarted], directory)
  return load(directory), killed, logs


@pytest.mark.slow  # Worker processes train smoke trials.
def test_killed_worker_trial_is_retried_and_resumes(killed_sweep):
  study, killed, logs = killed_sweep
  complete = assert_budget_of_distinct_complete_trials(study, 3)
  dead = study.trials[killed]
  assert dead.state == TrialState.FAIL
  retries = [t for t in complete if sweep_study.is_retry(t)]
  assert [sweep_study.original_number(t) for t in retries] == [killed]
  retry = retries[0]
  assert retry.params == dead.params
  assert retry.user_attrs['workdir'] == dead.user_attrs['workdir']
  assert retry.user_attrs['resumed_from_step'] >= 2 and retry.user_attrs['step'] == 4
  assert f'trial {retry.number} retry of {killed}, resumed at step' in logs
  results = sweep_report.results_table(study)
  assert results.set_index('number').retried_from[retry.number] == killed


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.mark.slow  # Worker processes train smoke trials.
def test_two_workers_on_postgresql(postgres_url, sqlite_sweep, tmp_path):
  # 6 trials, as the SQLite sweep: the same slots, so the same seeded values (asserted below).
  run_two_workers(str(tmp_path), f'--storage={postgres_url}', '--n-trials=6')
  study = load(str(tmp_path), postgres_url)
  complete = assert_budget_of_distinct_complete_trials(study, 6)
  assert len({t.user_attrs['worker'] for t in complete}) == 2
  # Values are seeded by slot: the same six trials as the SQLite sweep's.
  sqlite_study = sqlite_sweep[1]
  assert sorted(tuple(sorted(t.params.items())) for t in complete) == sorted(
      tuple(sorted(sqlite_study.trials[n].params.items())) for n in range(6))
  assert not os.path.exists(tmp_path / 'study.db')
