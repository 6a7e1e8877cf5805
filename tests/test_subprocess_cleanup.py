"""Processes that tests start die with the test run, even when pytest itself is SIGKILLed."""

import os
import signal
import subprocess
import sys
import time

from subprocess_runs import start_test_process, stop_test_process

TESTS = os.path.dirname(os.path.abspath(__file__))
# A stand-in for pytest: starts a long child the way the tests do, prints its pid, then waits. It imports
# subprocess_runs from tests/, given by PYTHONPATH as pytest's `pythonpath` gives it to the tests.
FAKE_PYTEST = '''
import sys, time
from subprocess_runs import start_test_process
child = start_test_process([sys.executable, '-c', 'import time; time.sleep(600)'])
print(child.pid, flush=True)
time.sleep(600)
'''


def alive(pid: int) -> bool:
  """True while `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def test_a_killed_test_process_takes_its_children_along():
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')]))}
  fake_pytest = subprocess.Popen([sys.executable, '-c', FAKE_PYTEST], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True, env=env)
  try:
    child = int(fake_pytest.stdout.readline())
    assert alive(child)
    fake_pytest.send_signal(signal.SIGKILL)
    fake_pytest.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not alive(child), f'process {child} outlived the killed test process'
  finally:
    if fake_pytest.poll() is None:
      os.killpg(fake_pytest.pid, signal.SIGKILL)
      fake_pytest.wait()


def test_stop_test_process_kills_the_whole_group():
  parent = start_test_process([sys.executable, '-c', 'import subprocess, sys, time; '
                               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                               'print(p.pid, flush=True); time.sleep(600)'], stdout=subprocess.PIPE, text=True)
  grandchild = int(parent.stdout.readline())
  stop_test_process(parent)
  deadline = time.monotonic() + 10
  while alive(grandchild) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not alive(grandchild)
