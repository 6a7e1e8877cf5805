"""Ctrl-C on `python -m bw_jax.main` (a subprocess): the first saves the step and exits 130, a second aborts
at once; SIGTERM saves the step and exits 143, so that a scheduler sees a job that did not finish. The smoke
model with BatchNorm everywhere (a cheaper compile); SIGTERM in the loop itself: tests/test_train.py."""

import signal
import time

import pytest

from bw_jax.train.checkpoints import saved_steps
from subprocess_runs import MainRun, wait_until

pytestmark = pytest.mark.slow  # Each test trains in a `bw_jax.main` process.

FLAGS = ('--config=configs/smoke.py', '--config.log_every_steps=1', '--config.model.mbconv_type=0',
         '--config.model.head_type=1')
PAUSE_STEP = 4  # Between checkpoint 3 and checkpoint 6.


def interrupted_run(tmp_path, presses: int, signum: int = signal.SIGINT) -> tuple[MainRun, str]:
  """The smoke run paused at PAUSE_STEP, sent `signum` `presses` times (each seen before the next), resumed."""
  workdir = str(tmp_path / 'run')
  run = MainRun(str(tmp_path / 'run.log'), *FLAGS, f'--workdir={workdir}', pause_at=PAUSE_STEP)
  try:
    run.wait_for_pause()
    wait_until(lambda: 3 in saved_steps(workdir), 'checkpoint 3')
    for press in range(presses):
      run.process.send_signal(signum)
      if press == 0 and signum == signal.SIGINT:
        wait_until(lambda: 'Ctrl-C' in run.stderr or run.process.poll() is not None, 'the first Ctrl-C message')
      time.sleep(0.5)
    run.resume()
  finally:
    run.finish()
  return run, workdir


def test_ctrl_c_saves_the_step_says_so_and_exits_130(tmp_path):
  run, workdir = interrupted_run(tmp_path, presses=1)
  assert run.process.returncode == 130, run.failure('exit status')
  assert f'Stopped by Ctrl-C (SIGINT) at step {PAUSE_STEP}; its checkpoint is saved' in run.stdout, run.failure('')
  assert 'saving a checkpoint at this step' in run.stderr and 'Traceback' not in run.stderr
  assert saved_steps(workdir) == [3, PAUSE_STEP]


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
  run, workdir = interrupted_run(tmp_path, presses=2)
  assert run.process.returncode == 130, run.failure('exit status')
  assert 'Ctrl-C again: stopped at once without saving; the checkpoint of step 3 is kept.' in run.stdout, (
      run.failure(''))
  assert saved_steps(workdir) == [3]


def test_sigterm_saves_the_step_and_exits_143(tmp_path):
  run, workdir = interrupted_run(tmp_path, presses=1, signum=signal.SIGTERM)
  assert run.process.returncode == 143, run.failure('exit status')
  assert (f'Stopped by SIGTERM at step {PAUSE_STEP}; its checkpoint is saved: rerun the same command to resume '
          '(exit status 143).') in run.stdout, run.failure('')
  assert 'Traceback' not in run.stderr and saved_steps(workdir) == [3, PAUSE_STEP]
