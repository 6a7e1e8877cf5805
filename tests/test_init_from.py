"""`config.init_from`, `python -m bw_jax.convert` and the fine-tuning demo (bw_jax/train/init_from.py,
bw_jax/convert.py, bw_jax/finetune_demo.py): runs that start from a trained BatchNorm run, converted to the main
job's BW placements and calibrated."""

import contextlib
import functools
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax import finetune_demo
from bw_jax.models import pretrained
from bw_jax.models import efficientnet as en
from bw_jax.nn.whitening import BWSettings
from bw_jax.train.config.validation import validate_config
from bw_jax.train.init_from import check_source, load_source
from configs import smoke
from subprocess_runs import REPO, run_process, subprocess_env

jax.config.update('jax_compilation_cache_dir', os.path.join(REPO, '.pytest_cache', 'jax_compilation'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def test_a_saved_record_loads_as_it_was(tmp_path):
  model = en.EfficientNet(num_classes=3, mbconv_type=2, head_type=2, bw=BWSettings(group_size=4),
                          width_multiplier=0.25, depth_multiplier=0.1)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)), jnp.float32)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0, impl='rbg'), images, train=False)
  record = pretrained.Pretrained(model, pretrained.plain_variables(variables), (72.9,), (90.0,))
  pretrained.save(record, str(tmp_path))
  loaded = pretrained.load(str(tmp_path))
  assert loaded.model == model and loaded.mean == record.mean and loaded.std == record.std
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, record.variables)
  np.testing.assert_array_equal(loaded.logits(images), record.logits(images))
  expected = model.apply(variables, (images - 72.9) / 90.0, train=False)  # Op by op: another rounding.
  np.testing.assert_allclose(loaded.logits(images), expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))


def test_a_source_that_is_none_of_the_three_kinds_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    check_source(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='is none of: a Keras EfficientNet weights file'):
    check_source(str(tmp_path))
  config = smoke.get_config()
  config.init_calibration_batches = -1
  with pytest.raises(ValueError, match=r'config.init_calibration_batches=-1 is out of range'):
    validate_config(config)


@pytest.mark.slow  # The demo on the smoke config: three short runs, two conversions, five evaluations (~2 min).
def test_the_finetune_demo_and_the_convert_command(tmp_path, monkeypatch):
  """`make finetune-demo`'s steps at smoke size: BN run -> main job's BW placements (MBConv 2, head 2) -> calibrated
  -> fine-tuned through config.init_from; and `python -m bw_jax.convert` on the same BN run."""
  monkeypatch.setattr(finetune_demo, 'SMOKE_STEPS', {'bn': 8, 'finetune': 3, 'scratch': 3})
  workdir = str(tmp_path / 'demo')
  with contextlib.redirect_stdout(io.StringIO()):
    rows = finetune_demo.run_demo(workdir, smoke=True)
  bn, before, calibrated, tuned, scratch = (metrics for _, metrics in rows)
  # The conversion to these placements is exact in evaluation; calibration compensates all but the BW before
  # squeeze-excite, approximately.
  images = next(finetune_demo.eval_batches(finetune_demo.demo_configs(workdir, smoke=True)['bn']))['image']
  evaluate = lambda record: np.asarray(jax.jit(functools.partial(record.model.apply, train=False))(
      record.variables, images))  # normalised images
  bn_logits = evaluate(load_source(os.path.join(workdir, 'bn')))
  converted_logits = evaluate(pretrained.load(os.path.join(workdir, 'uncalibrated')))
  assert np.max(np.abs(converted_logits - bn_logits)) <= 1e-5 * np.max(np.abs(bn_logits))
  assert before['eval_loss'] == pytest.approx(bn['eval_loss'], rel=1e-4)
  assert calibrated['eval_loss'] == pytest.approx(bn['eval_loss'], rel=1e-2)
  # Training mode whitens with each batch's S: before calibration the convolutions expect S = I, after it the
  # running statistics are the data's and both modes nearly agree.
  gap = lambda m: abs(m['batch_loss'] - m['eval_loss'])
  assert gap(before) > 5 * gap(calibrated), (before, calibrated)
  assert all(np.isfinite(list(m.values())).all() for m in (tuned, scratch))
  with open(os.path.join(workdir, 'table.md')) as f:
    assert f.read().count('\n') == 2 + len(rows)

  out = str(tmp_path / 'converted_by_the_command')
  demo = finetune_demo.demo_configs(workdir, smoke=True)['finetune']
  overrides = [f'--config.model.width_multiplier={demo.model.width_multiplier}',
               f'--config.model.depth_multiplier={demo.model.depth_multiplier}',
               f'--config.batch_size={demo.batch_size}',
               f'--config.init_calibration_batches={demo.init_calibration_batches}',
               f'--config.init_from={os.path.join(workdir, "bn")}']
  result = run_process([sys.executable, '-m', 'bw_jax.convert', '--config=configs/finetune_fashion_mnist.py',
                        f'--out={out}', *overrides], cwd=REPO, env=subprocess_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'converted from BatchNorm' in result.stdout and f'--config.init_from={out}' in result.stdout
  by_command, by_demo = pretrained.load(out), pretrained.load(os.path.join(workdir, 'converted'))
  assert by_command.model == by_demo.model
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), by_command.variables,
               by_demo.variables)
