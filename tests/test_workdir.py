"""One run per workdir (`bw_jax/train/workdir.py`): the lock, what a refused run says, and two `bw_jax.main`
runs started at once on one workdir (exactly one is refused, in one line naming the other; neither hangs)."""

import datetime
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from bw_jax.train import workdir as run_workdir
from subprocess_runs import (COMPILATION_CACHE_ENV, REPO, free_port, start_test_process, stop_test_process,
                             subprocess_env)

# A process that takes the workdir's lock: prints 'owner' and holds it until its stdin closes, or prints the
# refusal and exits 2.
TAKER = '''
import sys
from bw_jax.train.workdir import WorkdirInUseError, WorkdirLock
try:
  lock = WorkdirLock.take(sys.argv[1])
except WorkdirInUseError as e:
  print('refused', e, flush=True)
  sys.exit(2)
print('owner', flush=True)
sys.stdin.read()
'''
# A host of a two-process jax.distributed job (gloo on CPU) that holds the workdir for a moment: prints 'held', or
# the refusal and exits 2.
HOST = '''
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from bw_jax.train.workdir import WorkdirError, hold_workdir
try:
  with hold_workdir(sys.argv[3]):
    print('held', flush=True)
except WorkdirError as e:
  print('refused', e, flush=True)
  sys.exit(2)
'''
LOCK_ROUNDS = 8
MAIN_ROUNDS = 2
TIMEOUT = 300  # Seconds; a run that hangs gets here.


def start_taker(workdir) -> subprocess.Popen:
  return start_test_process([sys.executable, '-c', TAKER, str(workdir)], env=subprocess_env(), cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def owner_pattern(pid: int) -> str:
  """What a refusal says of the run holding the workdir: its pid, host and an ISO time with its offset."""
  return rf'in use by another run \(pid {pid} on host {re.escape(socket.gethostname())} since (\S+)\)'


def assert_recent(iso_time: str) -> None:
  since = datetime.datetime.fromisoformat(iso_time)
  assert since.tzinfo is not None
  age = datetime.datetime.now(datetime.timezone.utc) - since
  assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10), iso_time


def test_a_file_or_a_path_under_a_file_is_refused_in_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(run_workdir.WorkdirError, match=r'^--workdir \S+/file is a file; give a directory'):
    run_workdir.make_workdir(str(tmp_path / 'file'), '--workdir')
  with pytest.raises(run_workdir.WorkdirError, match=rf'/file/a/b cannot be created: {tmp_path}/file is a file'):
    run_workdir.make_workdir(str(tmp_path / 'file' / 'a' / 'b'))
  run_workdir.make_workdir(str(tmp_path / 'new' / 'run'))
  assert (tmp_path / 'new' / 'run').is_dir()


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
  lock = run_workdir.WorkdirLock.take(str(tmp_path))
  try:
    with pytest.raises(run_workdir.WorkdirInUseError, match=owner_pattern(os.getpid())) as refused:
      run_workdir.WorkdirLock.take(str(tmp_path))  # Another open file: flock refuses it in this process too.
    assert_recent(re.search(owner_pattern(os.getpid()), str(refused.value)).group(1))
    assert '\n' not in str(refused.value)
  finally:
    lock.release()
  run_workdir.WorkdirLock.take(str(tmp_path)).release()


def test_two_processes_at_once_one_owns_and_one_is_refused_naming_it(tmp_path):
  """LOCK_ROUNDS rounds of two processes started together on one workdir; a SIGKILLed owner leaves no lock."""
  for round_ in range(LOCK_ROUNDS):
    workdir = tmp_path / str(round_)
    workdir.mkdir()
    takers = [start_taker(workdir) for _ in range(2)]
    try:
      firsts = {taker.pid: taker.stdout.readline().split(' ', 1) for taker in takers}
      owners = [pid for pid, words in firsts.items() if words[0].strip() == 'owner']
      assert len(owners) == 1, firsts
      refused = next(taker for taker in takers if taker.pid != owners[0])
      assert refused.wait(timeout=TIMEOUT) == 2
      assert re.search(owner_pattern(owners[0]), firsts[refused.pid][1]), firsts
      owner = next(taker for taker in takers if taker.pid == owners[0])
      if round_ % 2:
        owner.send_signal(signal.SIGKILL)  # The kernel drops a dead owner's lock.
      owner.stdin.close()
      assert owner.wait(timeout=TIMEOUT) in (0, -signal.SIGKILL)
      run_workdir.WorkdirLock.take(str(workdir)).release()
    finally:
      for taker in takers:
        stop_test_process(taker)


def start_main(workdir, *flags) -> subprocess.Popen:
  """The smoke config with BatchNorm everywhere, as tests/test_train_signals.py runs it: the lock does not care,
  and its train step traces and lowers in a fifth of the BW smoke model's time (1 s against 5 s here)."""
  return start_test_process(
      [sys.executable, '-m', 'bw_jax.main', '--config=configs/smoke.py', '--config.model.mbconv_type=0',
       '--config.model.head_type=1', f'--workdir={workdir}', *flags], cwd=REPO,
      env=subprocess_env(COMPILATION_CACHE_ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # One of each pair trains the smoke model.
def test_two_runs_started_at_once_on_one_workdir_one_refused_none_hangs(tmp_path):
  """MAIN_ROUNDS times: two `bw_jax.main` runs saving every step, started together on one workdir. Exactly one
  is refused (status 2, one line naming the other's pid, host and start) before it compiles anything; the
  other trains to the end, and neither hangs."""
  for round_ in range(MAIN_ROUNDS):
    workdir = tmp_path / f'run{round_}'
    runs = [start_main(workdir, '--config.checkpoint_every_steps=1', '--config.num_train_steps=2')
            for _ in range(2)]
    try:
      outputs = {run.pid: run.communicate(timeout=TIMEOUT) for run in runs}
    finally:
      for run in runs:
        stop_test_process(run)
    statuses = {run.pid: run.returncode for run in runs}
    assert sorted(statuses.values()) == [0, 2], {pid: (statuses[pid], err[-2000:]) for pid, (_, err) in outputs.items()}
    winner = next(pid for pid, status in statuses.items() if status == 0)
    loser = next(pid for pid, status in statuses.items() if status == 2)
    stdout, stderr = outputs[loser]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: workdir {workdir} is in use by another run'), stderr[-3000:]
    assert re.search(owner_pattern(winner), last) and 'Traceback' not in stderr, stderr[-3000:]
    assert 'Compiling' not in stdout
    assert 'eval_accuracy' in outputs[winner][0]


def gloo_missing() -> str:
  """Why two processes on CPU cannot run collectives here ('' when they can)."""
  from jax._src.lib import _jax  # What jax_cpu_collectives_implementation='gloo' uses.
  return '' if hasattr(_jax, 'make_gloo_tcp_collectives') else 'this jaxlib has no gloo CPU collectives'


def two_hosts_holding(workdir) -> list[tuple[int, str]]:
  """(exit status, last line of stdout: gloo prints before it) of the two hosts of a job that holds `workdir`."""
  address = f'localhost:{free_port()}'
  hosts = [start_test_process([sys.executable, '-c', HOST, address, str(i), str(workdir)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [host.communicate(timeout=TIMEOUT) for host in hosts]
  finally:
    for host in hosts:
      stop_test_process(host)
  return [(host.returncode, (out.strip().splitlines() or [''])[-1]) for host, (out, _) in zip(hosts, outputs)]


@pytest.mark.slow  # Two jax.distributed processes.
def test_on_two_hosts_process_0_holds_the_workdir_and_both_refuse_together(tmp_path):
  if gloo_missing():
    pytest.skip(gloo_missing())
  assert two_hosts_holding(tmp_path) == [(0, 'held')] * 2
  lock = run_workdir.WorkdirLock.take(str(tmp_path))  # This process is the other run now.
  try:
    done = two_hosts_holding(tmp_path)
  finally:
    lock.release()
  assert [status for status, _ in done] == [2, 2] and done[0][1] == done[1][1], done
  assert re.search(owner_pattern(os.getpid()), done[1][1]), done
