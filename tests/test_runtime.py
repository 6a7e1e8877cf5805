"""bw_jax.train.runtime in fresh processes: configure_cpu_dispatch (JAX reads the setting when it creates its CPU
client), and the entry points that must call it before anything creates the devices; and
skip_final_garbage_collection."""

import os
import subprocess
import sys

import pytest

from bw_jax.train.cli_errors import EXIT_PREEMPTED
from subprocess_runs import REPO, run_process, subprocess_env

# A call that computes for a while (40 chained 384×384 matmuls), then whether its result is ready the moment
# the call returns: always with synchronous dispatch, practically never with asynchronous dispatch.
PROBE = """
import jax
import jax.numpy as jnp

def probe(*args, **kwargs):
  chain = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ y), x))
  x = jnp.ones((384, 384)) / 384
  chain(x).block_until_ready()  # Compiled before the timed call.
  print('ready' if chain(x).is_ready() else 'pending')
"""
# `python -m MODULE ARGS` with its training replaced by the probe.
ENTRY_POINT = PROBE + """
import runpy, sys
from bw_jax.train import loop as train
from bw_jax.sweep import worker
# Then as a run stopped by SIGTERM before its first step: bw_jax.main exits with status 143.
train.train_and_evaluate = lambda *args: probe() or {'preempted': True, 'step': 0, 'signal': 'SIGTERM'}
worker.Worker.run = probe
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return run_process([sys.executable, *args], cwd=REPO, env=subprocess_env(), timeout=timeout)


@pytest.mark.parametrize('setup, expected', [('', 'pending'), ('configure_cpu_dispatch()', 'ready')],
                         ids=['default', 'configured'])
def test_configure_cpu_dispatch_makes_a_call_return_with_its_result(setup, expected):
  """The default case shows that the probe tells asynchronous from synchronous dispatch."""
  done = run_python('-c', f'from bw_jax.train.runtime import configure_cpu_dispatch\n{setup}\n{PROBE}\nprobe()')
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == [expected]


def test_configure_cpu_dispatch_after_the_devices_exist_raises():
  done = run_python('-c', 'import jax\nfrom bw_jax.train.runtime import configure_cpu_dispatch\njax.devices()\n'
                          'configure_cpu_dispatch()')
  assert done.returncode != 0
  assert 'configure_cpu_dispatch() was called after JAX created its devices' in done.stderr


def test_configure_cpu_dispatch_does_nothing_with_a_jax_without_the_option():
  # A newer JAX may drop the option or the private module that tells whether the devices exist.
  done = run_python('-c', """
import sys, jax
from bw_jax.train import runtime
sys.modules['jax._src.xla_bridge'] = None
print(runtime.backends_exist())
def read(name):
  raise AttributeError(f'Unrecognized config option: {name}')
jax.config.read, jax.config.update = read, lambda *args: print('updated', args)
runtime.configure_cpu_dispatch()
print('returned')""")
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['False', 'returned']


@pytest.mark.slow  # Each imports TensorFlow and builds the model: ~20 s on 2 busy cores.
@pytest.mark.parametrize('command, status', [
    (['bw_jax.main', f'--config={os.path.join(REPO, "configs", "smoke.py")}', '--workdir={out}'], EXIT_PREEMPTED),
    (['bw_jax.sweep', 'run', f'--config={os.path.join(REPO, "configs", "sweeps", "smoke.py")}', '--dir={out}'], 0),
], ids=['main', 'sweep'])
def test_entry_points_train_with_synchronous_dispatch(command, status, tmp_path):
  """They validate the config first, which creates the devices: the setting must come before."""
  done = run_python('-c', ENTRY_POINT, *[arg.format(out=tmp_path / 'out') for arg in command])
  assert done.returncode == status, done.stdout + done.stderr
  assert 'ready' in done.stdout.split(), done.stdout


# An exit handler registered first runs last: it sees what skip_final_garbage_collection's handler did.
FREEZE_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0, flush=True))
from bw_jax.train.runtime import skip_final_garbage_collection
if sys.argv[1] == 'skip':
  skip_final_garbage_collection()
print('frozen before exit:', gc.get_freeze_count() > 0, flush=True)
"""


@pytest.mark.parametrize('mode', ['skip', 'default'])
def test_skip_final_garbage_collection_freezes_what_is_alive_once_the_program_ends(mode):
  result = run_process([sys.executable, '-c', FREEZE_AT_EXIT, mode], cwd=REPO, env=subprocess_env())
  assert result.returncode == 0, result.stderr
  skip = mode == 'skip'
  assert result.stdout.splitlines() == ['frozen before exit: False', f'frozen at exit: {skip}'], result.stdout
