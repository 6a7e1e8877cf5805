"""A `bw_jax.main` run that fails ends with one `error:` line and exit status 1 (bw_jax/train/cli_errors.py), and
soon: a diverged run (its summary.json says where), a full disk (which folder), and a checkpoint save that fails
while a writer thread never finishes (Python would wait for that thread at exit for ever)."""

import json
import os
import re
import subprocess
import sys

import pytest

from bw_jax.train.checkpoints import saved_steps
from bw_jax.train.cli_errors import EXIT_FAILURE, EXIT_GRACE_SECONDS
from subprocess_runs import (REPO, TIMEOUT, run_process, start_test_process,
                             stop_test_process, subprocess_env, wait_until)
from test_cli_errors import in_private_mount, private_mounts

pytestmark = pytest.mark.slow  # Each test trains the smoke model in a `bw_jax.main` process.

SMOKE = ('--config=configs/smoke.py', '--config.log_every_steps=1')
# bw_jax.main with Orbax's CheckpointManager.save failing as a full disk makes TensorStore fail, and leaving
# behind a thread that never ends, as a writer blocked after a failed save does.
STUCK_WRITER = '''
import runpy, sys, threading
import orbax.checkpoint as ocp

def failing_save(self, step, *args, **kwargs):
  threading.Thread(target=threading.Event().wait, name='stuck_writer').start()
  raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{self.directory}/{step}.orbax-checkpoint-tmp/'
                   'x": Failed to write 61513 bytes to file 12: No space left on device')

ocp.CheckpointManager.save = failing_save
sys.argv = ['bw_jax.main', *sys.argv[1:]]
runpy.run_module('bw_jax.main', run_name='__main__', alter_sys=True)
'''


def main_run(workdir, *flags, wrap=()) -> subprocess.CompletedProcess:
  return run_process([*wrap, sys.executable, '-m', 'bw_jax.main', *SMOKE, f'--workdir={workdir}', *flags], cwd=REPO,
                     env=subprocess_env(), timeout=TIMEOUT)


def the_failure_line(done: subprocess.CompletedProcess) -> str:
  """The one `error: …` line of a failed run (status 1), the last line on stderr; no traceback anywhere."""
  assert done.returncode == EXIT_FAILURE, done.stdout[-2000:] + done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert [line for line in lines if line.startswith('error: ')] == lines[-1:], done.stderr[-3000:]
  assert 'Traceback' not in done.stderr and 'exception was never retrieved' not in done.stderr, done.stderr[-5000:]
  return lines[-1]


def test_a_diverged_run_is_one_line_and_its_summary_says_where(tmp_path):
  """At a learning rate of 1e30 the loss is non-finite from step 2 or 3 on: one line names the step, and
  summary.json records it with the reason."""
  workdir = tmp_path / 'run'
  line = the_failure_line(main_run(workdir, '--config.learning_rate=1e30'))
  match = re.fullmatch(r'error: Training loss is (nan|inf|-inf) at step (\d+); no checkpoint was written\. '
                       r'Lower config\.learning_rate \(now 1e\+30\).*', line)
  assert match and int(match.group(2)) in (2, 3), line
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert {k: summary[k] for k in ('diverged', 'step', 'error')} == {
      'diverged': True, 'step': int(match.group(2)), 'error': 'NonFiniteLossError'}
  assert summary['reason'] == line[len('error: '):] and summary['config']['learning_rate'] == 1e30


def test_a_full_disk_names_the_folder_in_one_line(tmp_path):
  """The workdir on a 512 KiB file system: config.json and the event files fit, the checkpoint (~1.3 MB) does
  not; Orbax's threads fail, the run says which folder is full in one line (they logged ~330 before)."""
  if private_mounts():
    pytest.skip(private_mounts())
  (tmp_path / 'disk').mkdir()
  line = the_failure_line(main_run(tmp_path / 'disk' / 'run', wrap=in_private_mount(
      f'-t tmpfs -o size=512k none {tmp_path / "disk"}')))
  assert line == (f'error: The checkpoint of step 3 could not be saved in {tmp_path / "disk" / "run" / "checkpoints"}: '
                  'No space left on device (the disk is full); no checkpoint is saved yet.')


def test_a_failed_save_with_a_writer_that_never_ends_exits_within_seconds(tmp_path):
  """The save of step 1 fails and leaves a non-daemon thread that never finishes: the run reports the failure
  in one line and its process ends with status 1 within EXIT_GRACE_SECONDS of deciding to exit."""
  workdir, log = tmp_path / 'run', tmp_path / 'stderr.log'
  with open(log, 'w') as stderr:
    process = start_test_process([sys.executable, '-c', STUCK_WRITER, *SMOKE, f'--workdir={workdir}',
                                  '--config.checkpoint_every_steps=1'], cwd=REPO,
                                 env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    wait_until(lambda: 'error: ' in log.read_text() or process.poll() is not None, 'the error line')
    try:
      status = process.wait(timeout=EXIT_GRACE_SECONDS + 20)
    except subprocess.TimeoutExpired:
      pytest.fail(f'still running {EXIT_GRACE_SECONDS + 20} s after its error line:\n{log.read_text()[-3000:]}')
  finally:
    stop_test_process(process)
  done = subprocess.CompletedProcess(process.args, status, '', log.read_text())
  assert the_failure_line(done) == (f'error: The checkpoint of step 1 could not be saved in {workdir / "checkpoints"}: '
                                    'No space left on device (the disk is full); no checkpoint is saved yet.')
  assert saved_steps(str(workdir)) == [] and not os.path.exists(workdir / 'summary.json')
