"""What a run records must be what ran: the metric window across checkpoints, the resume record written only
after a successful restore, a summary of the steps that trained, and bad data refused before anything is
written (smoke config; the runs share their compiled programs)."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from bw_jax.data import fashion_mnist
from bw_jax.train import loop as train
from bw_jax.train import programs
from configs import smoke
from test_train import train_capturing_console  # Also sets the suite's compilation cache.


def scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalar summaries in `workdir`'s event files."""
  events = EventAccumulator(workdir, size_guidance={'tensors': 0}).Reload()
  return {tag: {e.step: float(make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
          for tag in events.Tags()['tensors'] if events.SummaryMetadata(tag).plugin_data.plugin_name == 'scalars'}


@pytest.fixture(scope='module')
def six_steps(tmp_path_factory):
  """(workdir, console) of the smoke config's 6 steps: a log line every 2 steps, a checkpoint every 3."""
  workdir = str(tmp_path_factory.mktemp('six_steps'))
  config = smoke.get_config()
  assert (config.log_every_steps, config.checkpoint_every_steps, config.num_train_steps) == (2, 3, 6)
  return workdir, train_capturing_console(config, workdir)[1]


@pytest.mark.slow  # Trains the smoke config twice (one compile).
def test_logged_metrics_are_the_means_of_every_step_since_the_last_log_line(six_steps, tmp_path):
  """The reference: the same 6 steps logged every step (each value one step's). With a log line every 2 steps
  and a checkpoint at step 3, the values at steps 2, 4 and 6 are the means of steps (1, 2), (3, 4), (5, 6):
  the checkpoint's look at the losses must not drop step 3 from the window."""
  workdir, console = six_steps
  config = smoke.get_config()
  config.log_every_steps = 1
  train_capturing_console(config, str(tmp_path))
  each_step, logged = scalars(str(tmp_path)), scalars(workdir)
  for tag in ('train/loss', 'train/accuracy', 'train/learning_rate'):
    assert sorted(each_step[tag]) == [1, 2, 3, 4, 5, 6] and sorted(logged[tag]) == [2, 4, 6]
    for step in (2, 4, 6):
      expected = np.mean([each_step[tag][step - 1], each_step[tag][step]])
      assert logged[tag][step] == pytest.approx(expected, rel=1e-6), (tag, step)
  loss_4 = np.mean([each_step['train/loss'][3], each_step['train/loss'][4]])
  assert f'step 4/6  epoch 0.00  loss {loss_4:.4f}  ' in console


@pytest.mark.slow  # Evaluates the smoke run's checkpoint.
def test_a_rerun_with_fewer_steps_records_the_steps_that_ran(six_steps, tmp_path):
  """A finished 6-step run rerun with num_train_steps=3 trains nothing and evaluates step 6: summary.json
  says 6 steps trained, in `step`, `epochs` and the recorded config."""
  workdir = shutil.copytree(six_steps[0], str(tmp_path / 'run'))
  config = smoke.get_config()
  config.num_train_steps = 3
  summary, console = train_capturing_console(config, workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    written = json.load(f)
  assert written['step'] == summary['step'] == 6
  assert written['config']['num_train_steps'] == 6
  assert written['epochs'] == pytest.approx(6 * 16 / 60_000)
  assert 'step 6' in console and 'num_train_steps=3' in console  # Said, not only recorded.


def no_model(*args, **kwargs):
  raise AssertionError('the model was built')


def test_resume_allow_changes_refuses_a_key_that_changes_parameter_shapes_before_anything_runs(tmp_path,
                                                                                             monkeypatch):
  """model.bw.group_size changes the parameters' shapes: allowing it on resume cannot work, so the config is
  refused at once, naming the key, before the workdir is touched (its config.json, its checkpoints)."""
  monkeypatch.setattr(programs, 'create_model', no_model)
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  record = workdir / 'checkpoints' / 'config.json'
  record.write_text('{"written by": "an earlier run"}')
  config = smoke.get_config()
  config.model.bw.group_size = 8
  config.resume_allow_changes = 'model.bw.group_size'
  with pytest.raises(ValueError, match=r"^config.resume_allow_changes names model.bw.group_size, which changes "
                                       r"the shapes of the parameters"):
    train.train_and_evaluate(config, str(workdir))
  assert record.read_text() == '{"written by": "an earlier run"}'
  assert sorted(os.listdir(workdir)) == ['checkpoints']


def truncated_copy(directory) -> str:
  """The four Fashion-MNIST files in `directory`, the training images' gzip stream cut in half."""
  source = os.path.dirname(fashion_mnist.split_files('train', None)[0])
  os.makedirs(directory)
  for name in os.listdir(source):
    shutil.copy(os.path.join(source, name), directory)
  images = os.path.join(directory, 'train-images-idx3-ubyte.gz')
  with open(images, 'r+b') as f:
    f.truncate(os.path.getsize(images) // 2)
  with pytest.raises(EOFError):  # The reference: Python's own gzip reader fails on it.
    with gzip.open(images) as f:
      f.read()
  return str(directory)


@pytest.mark.skipif(fashion_mnist.split_files('train', None) is None,
                    reason='Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
def test_a_truncated_data_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.setattr(programs, 'create_model', no_model)
  config = smoke.get_config()
  config.dataset.data_dir = truncated_copy(tmp_path / 'data')
  with pytest.raises(fashion_mnist.DataError, match=r'train-images-idx3-ubyte.gz is truncated'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
