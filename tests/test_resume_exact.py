"""A run killed with SIGKILL while its checkpoint is being saved in the background resumes from the previous one
and ends bit for bit where an uninterrupted run ends: every array of the checkpoint, the optimizer state and the
weight EMA (`ema_decay` > 0) included, and the same eval. Both runs are `bw_jax.main` processes."""

import glob
import json
import os
import queue
import signal
import subprocess
import sys
import threading

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bw_jax.train.checkpoints import saved_steps
from subprocess_runs import (REPO, TIMEOUT, run_process, start_test_process, stop_test_process,
                             subprocess_env)

pytestmark = pytest.mark.slow  # Three runs of the smoke model.

STEPS, HELD_STEP = 8, 6  # Checkpoints every 3 steps: 3 is saved, 6 is held before its commit and killed there.
# The smoke model with BW at the stem only (a cheaper compile than BW in every block) and a weight EMA, whose
# copy of the parameters is saved, restored and evaluated.
FLAGS = ('--config=configs/smoke.py', '--config.model.stem_type=2', '--config.model.mbconv_type=0',
         '--config.model.head_type=1',
         '--config.ema_decay=0.9', f'--config.num_train_steps={STEPS}')
# bw_jax.main with the commit of one checkpoint held: Orbax has written its arrays into the step's temporary
# folder and waits (its background thread), before the rename that makes it a checkpoint. Orbax's private
# names: if they change, no SAVING line comes and the test says so.
HOLD_COMMIT = '''
import runpy, sys
from orbax.checkpoint._src.checkpointers import async_checkpointer
held_step, flags = sys.argv[1], sys.argv[2:]
commit = async_checkpointer._on_commit_callback

def held_commit(tmpdir, *args, **kwargs):
  if tmpdir.get_final().name == held_step:
    print(f'SAVING {held_step}', flush=True)
    sys.stdin.readline()
  return commit(tmpdir, *args, **kwargs)

async_checkpointer._on_commit_callback = held_commit
sys.argv = ['bw_jax.main', *flags]
runpy.run_module('bw_jax.main', run_name='__main__', alter_sys=True)
'''


def main_run(workdir) -> subprocess.CompletedProcess:
  done = run_process([sys.executable, '-m', 'bw_jax.main', *FLAGS, f'--workdir={workdir}'], cwd=REPO,
                     env=subprocess_env())
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done


def killed_while_saving(workdir) -> subprocess.CompletedProcess:
  """The run, SIGKILLed while the commit of checkpoint HELD_STEP is held; its stdout and status."""
  process = start_test_process([sys.executable, '-c', HOLD_COMMIT, str(HELD_STEP), *FLAGS, f'--workdir={workdir}'],
                               cwd=REPO, env=subprocess_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines: queue.Queue = queue.Queue()

  def read() -> None:
    for line in process.stdout:
      lines.put(line)
    lines.put(None)
  threading.Thread(target=read, daemon=True).start()
  stdout = []
  try:
    while not stdout or not stdout[-1].startswith('SAVING'):
      try:
        line = lines.get(timeout=TIMEOUT)
      except queue.Empty:
        pytest.fail(f'no SAVING line after {TIMEOUT} s:\n{"".join(stdout)}')
      if line is None:
        pytest.fail(f'exited with status {process.wait()} before the save of step {HELD_STEP}:\n{"".join(stdout)}')
      stdout.append(line)
    temporary = glob.glob(os.path.join(workdir, 'checkpoints', f'{HELD_STEP}.orbax-checkpoint-tmp*'))
    assert temporary and saved_steps(str(workdir)) == [3], os.listdir(os.path.join(workdir, 'checkpoints'))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
  finally:
    stop_test_process(process)
  return subprocess.CompletedProcess(process.args, process.returncode, ''.join(stdout), '')


def checkpoint_arrays(workdir, step: int) -> dict[str, np.ndarray]:
  """Every array of checkpoint `step` by its path ('opt_state/0/mu/…'), read back without a target."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    tree = manager.restore(step, args=ocp.args.StandardRestore())
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/').items()}


def test_killed_while_saving_resumes_from_the_previous_checkpoint_bit_for_bit_with_ema(tmp_path):
  straight_dir, killed_dir = tmp_path / 'straight', tmp_path / 'killed'
  main_run(straight_dir)
  killed = killed_while_saving(killed_dir)
  assert killed.returncode == -signal.SIGKILL
  assert saved_steps(str(killed_dir)) == [3], 'the held checkpoint must not count as saved'
  rerun = main_run(killed_dir)
  assert 'Restored checkpoint of step 3' in rerun.stderr, rerun.stderr[-3000:]
  straight, resumed = checkpoint_arrays(straight_dir, STEPS), checkpoint_arrays(killed_dir, STEPS)
  assert sorted(straight) == sorted(resumed)
  groups = {key.split('/')[0] for key in straight}
  assert {'params', 'ema_params', 'opt_state', 'batch_stats', 'step'} <= groups, groups
  assert any(key.startswith('batch_stats/') and key.endswith('/cov') for key in straight)  # A BW layer.
  different = [k for k in straight if (straight[k].dtype, straight[k].shape, straight[k].tobytes()) !=
               (resumed[k].dtype, resumed[k].shape, resumed[k].tobytes())]
  assert not different, f'{len(different)} of {len(straight)} arrays differ, e.g. {different[:5]}'
  # The EMA is a copy of its own: it differs from the parameters after 8 steps at decay 0.9.
  assert any(not np.array_equal(straight[k], straight['ema_params/' + k[len('params/'):]])
             for k in straight if k.startswith('params/'))
  summaries = [json.loads((workdir / 'summary.json').read_text()) for workdir in (straight_dir, killed_dir)]
  assert [(s['step'], s['eval_loss'], s['eval_accuracy']) for s in summaries] == [
      (STEPS, summaries[0]['eval_loss'], summaries[0]['eval_accuracy'])] * 2
