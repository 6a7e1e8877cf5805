"""`config.init_from` and `python -m bw_jax.convert` (bw_jax/train/init_from.py, bw_jax/convert.py): a run that
starts from a trained BatchNorm run, converted to the smoke config's BW placements and calibrated."""

import contextlib
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.models import pretrained
from bw_jax.models import efficientnet as en
from bw_jax.nn.whitening import BWSettings
from bw_jax.train import loop as train
from bw_jax.train.config.validation import validate_config
from bw_jax.train.init_from import check_source, load_source
from configs import smoke
from subprocess_runs import COMPILATION_CACHE_ENV, REPO, run_process, subprocess_env

jax.config.update('jax_compilation_cache_dir', os.path.join(REPO, '.pytest_cache', 'jax_compilation'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def test_a_saved_record_loads_as_it_was(tmp_path):
  model = en.EfficientNet(num_classes=3, mbconv_type=2, head_type=2, bw=BWSettings(group_size=4),
                          width_multiplier=0.25, depth_multiplier=0.1)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)), jnp.float32)
  variables = model.init(jax.random.key(0, impl='rbg'), images, train=False)
  record = pretrained.Pretrained(model, pretrained.plain_variables(variables), (72.9,), (90.0,))
  pretrained.save(record, str(tmp_path))
  loaded = pretrained.load(str(tmp_path))
  assert loaded.model == model and loaded.mean == record.mean and loaded.std == record.std
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, record.variables)
  np.testing.assert_array_equal(loaded.logits(images), model.apply(variables, (images - 72.9) / 90.0, train=False))


def test_a_source_that_is_none_of_the_three_kinds_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    check_source(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='is none of: a Keras EfficientNet weights file'):
    check_source(str(tmp_path))
  config = smoke.get_config()
  config.init_calibration_batches = -1
  with pytest.raises(ValueError, match=r'config.init_calibration_batches=-1 is out of range'):
    validate_config(config)


def bn_smoke_config():
  """The smoke config with BatchNorm everywhere: the trained source."""
  config = smoke.get_config()
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = 1, 0, 1
  config.num_train_steps = 4
  return config


@pytest.fixture(scope='module')
def bn_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('bn_run'))
  with contextlib.redirect_stdout(io.StringIO()):
    summary = train.train_and_evaluate(bn_smoke_config(), workdir)
  return workdir, summary


@pytest.mark.slow  # Three smoke runs and the command (~2 minutes on 2 cores).
def test_a_run_starts_from_the_converted_and_calibrated_bn_run(bn_run, tmp_path):
  """The BN run converted to the smoke config's placements (MBConv 2, head 2): the command's record, the
  variables a run starts from, and its first eval, which after one step at a negligible learning rate
  equals the BN run's eval loss to the conversion's accuracy (a run from scratch is far from it)."""
  workdir, bn_summary = bn_run
  source = load_source(workdir)
  assert (source.model.mbconv_type, source.model.head_type) == (0, 1)
  out = str(tmp_path / 'converted')
  result = run_process([sys.executable, '-m', 'bw_jax.convert', '--config=configs/smoke.py', f'--out={out}',
                        f'--config.init_from={workdir}', '--config.init_calibration_batches=3'],
                       cwd=REPO, env=subprocess_env(COMPILATION_CACHE_ENV))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'converted from BatchNorm' in result.stdout and f'--config.init_from={out}' in result.stdout
  record = pretrained.load(out)
  assert (record.model.mbconv_type, record.model.head_type) == (2, 2)
  stats = record.variables['batch_stats']['head_bw']
  assert not np.allclose(stats['whitening'], np.eye(4))  # calibrated, no longer the identity

  def first_eval(init_from: str) -> dict:
    config = smoke.get_config()
    config.init_from, config.init_calibration_batches = init_from, 3
    config.num_train_steps, config.learning_rate = 1, 1e-9
    with contextlib.redirect_stdout(io.StringIO()) as console:
      summary = train.train_and_evaluate(config, str(tmp_path / f'from_{os.path.basename(init_from) or "scratch"}'))
    return summary, console.getvalue()

  from_bn, console = first_eval(workdir)
  assert 'converted from BatchNorm' in console and 'calibrated on 3 batches' in console
  scratch, _ = first_eval('')
  gap = abs(from_bn['eval_loss'] - bn_summary['eval_loss'])
  assert gap < 0.01 * bn_summary['eval_loss'], (from_bn['eval_loss'], bn_summary['eval_loss'])
  assert abs(scratch['eval_loss'] - bn_summary['eval_loss']) > 10 * gap
  from_record, _ = first_eval(out)  # The command's folder: converted already, calibrated again.
  assert abs(from_record['eval_loss'] - bn_summary['eval_loss']) < 0.01 * bn_summary['eval_loss']
