"""The Tiny ImageNet → ImageNet workflow end to end, as a user runs it, on a generated download:
prepare → `sweep run` with two workers (from another directory, the data given by a --config override) →
report → promote → every promoted config loaded and validated, and its command run from elsewhere (it fails
cleanly: there is no ImageNet here)."""

import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from bw_jax.train.cli_errors import EXIT_USAGE
from bw_jax.train.config.files import load_config_file
from bw_jax.train.config.validation import validate_config
from bw_jax.data import tiny_imagenet
from bw_jax.sweep import __main__ as sweep_cli
from subprocess_runs import COMPILATION_CACHE_ENV, start_test_process, wait_for_a_started_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WNIDS = ['n01443537', 'n01629819', 'n01641577']
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # One per class: a tiny model learns them in steps.
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4
# A tiny BN EfficientNet at 32×32, 300 steps of 8 images (100 epochs of the 24 images) a trial: steps cost
# milliseconds next to the compile, and BN's running statistics (momentum 0.99) need a few hundred to settle.
SWEEP_FILE = f'''
import ml_collections

from bw_jax.train.config.files import load_config_file


def get_config():
  config = load_config_file({os.path.join(REPO, 'configs', 'sweeps', 'tiny_imagenet.py')!r})
  config.study_name = 'e2e_tiny_imagenet'
  train = config.train
  train.model.width_multiplier, train.model.depth_multiplier, train.model.stem_stride = 0.25, 0.1, 2
  train.model.stem_type, train.model.mbconv_type, train.model.head_type = 1, 0, 1
  train.model.dropout_rate, train.model.drop_connect_rate = 0.0, 0.0
  train.dataset.image_size, train.dataset.shuffle_buffer = 32, 64
  train.dataset.augment.random_crop, train.dataset.augment.flip = False, False
  train.batch_size, train.eval_batch_size, train.half_precision = 8, 12, False
  train.batch_size_per_device = None  # The global batch of 8 above, not configs/tiny_imagenet.py's 256 per device.
  train.label_smoothing, train.log_every_steps, train.eval_every_steps = 0.0, 100, 1000
  train.checkpoint_every_steps = 1000
  config.trial_budget.num_train_steps = 300
  # Per 256 images: peaks of 0.016–0.06 at batch 8.
  config.search_space = ml_collections.ConfigDict({{'learning_rate': ('log_float', 0.5, 2.0)}})
  config.stratify, config.pruner, config.n_trials = (), 'none', 4
  config.heartbeat_interval, config.grace_period = 1, 30
  return config
'''


def write_download(manual_dir: str) -> None:
  """tiny-imagenet-200.zip in the official layout: 3 classes of solid-colour 64×64 JPEGs with noise."""
  rng = np.random.default_rng(0)
  top = os.path.join(manual_dir, tiny_imagenet.FOLDER_NAME)

  def jpeg(path: str, label: int) -> None:
    pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-30, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(tf.io.encode_jpeg(pixels, quality=90).numpy())

  for label, wnid in enumerate(WNIDS):
    for i in range(TRAIN_PER_CLASS):
      jpeg(os.path.join(top, 'train', wnid, 'images', f'{wnid}_{i}.JPEG'), label)
  annotations = []
  for i in range(VAL_PER_CLASS * len(WNIDS)):
    jpeg(os.path.join(top, 'val', 'images', f'val_{i}.JPEG'), i % len(WNIDS))
    annotations.append(f'val_{i}.JPEG\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63\n')
  with open(os.path.join(top, 'val', 'val_annotations.txt'), 'w') as f:
    f.write(''.join(annotations))
  with open(os.path.join(top, 'wnids.txt'), 'w') as f:
    f.write(''.join(f'{wnid}\n' for wnid in WNIDS))
  with open(os.path.join(top, 'words.txt'), 'w') as f:
    f.write(''.join(f'{wnid}\tclass {wnid}\n' for wnid in WNIDS))
  shutil.make_archive(top, 'zip', manual_dir, tiny_imagenet.FOLDER_NAME)
  shutil.rmtree(top)


def subprocess_env() -> dict[str, str]:
  """This checkout first on the path (the processes run in another directory), and the suite's JAX cache."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
  return {**os.environ, 'PYTHONPATH': path, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2',
          **COMPILATION_CACHE_ENV}


def run_all(commands: list[list[str]], cwd: str, sweep_dir: str | None = None, timeout: float = 600
            ) -> list[tuple[int, str]]:
  """Runs the commands, each in its own session (killed with its children if anything fails); with
  `sweep_dir`, they are sweep workers and the later ones start once the first has taken a trial
  (wait_for_a_started_trial). Returns (exit status, output) of each."""
  logs = [os.path.join(cwd, f'process{i}.log') for i in range(len(commands))]
  processes = []
  try:
    for command, log in zip(commands, logs):
      if processes and sweep_dir:
        wait_for_a_started_trial(sweep_dir, processes[0])
      with open(log, 'w') as out:
        processes.append(start_test_process(command, cwd=cwd, env=subprocess_env(), stdout=out,
                                            stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  return [(code, open(log).read()) for code, log in zip(codes, logs)]


@pytest.mark.slow
def test_prepare_sweep_report_promote_on_a_generated_tiny_imagenet(tmp_path, capsys):
  elsewhere = tmp_path / 'elsewhere'  # Not the repository: every command runs here.
  manual_dir, data_dir = tmp_path / 'manual', tmp_path / 'tfds'
  elsewhere.mkdir()
  manual_dir.mkdir()
  write_download(str(manual_dir))
  tiny_imagenet.main(['--manual_dir', str(manual_dir), '--data_dir', str(data_dir)])
  assert f'--config.train.dataset.data_dir={data_dir} (bw_jax.sweep run)' in capsys.readouterr().out

  sweep_file, sweep_dir = elsewhere / 'sweep_e2e.py', tmp_path / 'sweep'
  sweep_file.write_text(SWEEP_FILE)
  run = [sys.executable, '-m', 'bw_jax.sweep', 'run', f'--config={sweep_file}', f'--dir={sweep_dir}',
         f'--config.train.dataset.data_dir={data_dir}']
  outcomes = run_all([run, run], str(elsewhere), str(sweep_dir))
  assert [code for code, _ in outcomes] == [0, 0], '\n'.join(out[-3000:] for _, out in outcomes)
  assert all("'e2e_tiny_imagenet': 4/4 trials finished (4 complete" in out for _, out in outcomes)

  sweep_cli.main(['report', f'--dir={sweep_dir}'])
  results = pd.read_csv(sweep_dir / 'report' / 'results.csv')
  assert len(results) == 4 and set(results.state) == {'COMPLETE'} and len(set(results.worker)) == 2
  assert set(results.num_classes) == {3} and results['flags'].isna().all()  # The data's classes; healthy.
  assert np.isfinite(results.eval_loss).all()
  log = open(os.path.join(results.workdir[0], 'train.log')).read()
  assert "Plan: tiny_imagenet 'train': 24 examples, 3 classes;" in log
  assert '  300 steps of 8 images (100 epochs of 3 steps)' in log
  assert 'first step done in' in log

  out = tmp_path / 'promoted'
  sweep_cli.main(['promote', f'--dir={sweep_dir}', '--top-k=3', f'--out={out}',
                  f"--base={os.path.join(REPO, 'configs', 'imagenet.py')}", f'--workdir-root={tmp_path / "runs"}'])
  promoted = sorted(p for p in os.listdir(out) if p.endswith('.py'))
  assert promoted == ['stem1_mbconv0_head1.py']  # The one combination, above 1/3 + 0.05.
  best = results.sort_values(['eval_accuracy', 'number'], ascending=[False, True]).iloc[0]
  assert best.eval_accuracy >= 1 / 3 + 0.05
  for name in promoted:
    config = load_config_file(str(out / name))
    validate_config(config)
    assert config.learning_rate == best.learning_rate and config.optimizer == 'nesterov'
    assert config.dataset.name == 'imagenet2012' and config.model.num_classes is None
    assert config.warmup_fraction == pytest.approx(20 / 300)  # round(2/30 · 300) = 20 of the trial's 300 steps.
  commands = (out / 'commands.sh').read_text().splitlines()[3:]
  assert len(commands) == len(promoted) and all(c.startswith(f'{sys.executable} -m bw_jax.main') for c in commands)

  # The promoted command, from another directory: its config loads, and the missing ImageNet is one clear
  # error before anything is built, with no workdir left behind.
  no_imagenet = f'--config.dataset.data_dir={tmp_path / "no_imagenet"}'
  [(code, output)] = run_all([[*shlex.split(commands[0]), no_imagenet]], str(elsewhere))
  assert code == EXIT_USAGE, output
  assert 'error: ImageNet 2012 is not prepared' in output and 'Traceback' not in output, output
  assert not (tmp_path / 'runs').exists()
