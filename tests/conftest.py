"""Test-session settings and shared fixtures."""

import json
import os
import resource
import time

import pytest

from bw_jax.train.runtime import configure_cpu_dispatch, skip_final_garbage_collection
from postgres_server import postgres_binaries, postgres_server
from subprocess_runs import use_suite_xla_flags

use_suite_xla_flags()  # Before any test creates the devices; why: tests/subprocess_runs.py.

configure_cpu_dispatch()  # Before any test creates the devices; why: bw_jax/train/runtime.py.
skip_final_garbage_collection()  # Each pytest process exits ~1.5 s sooner (bw_jax/train/runtime.py).

# The modules that take longest (pytest worker seconds from a fresh clone) run first: with `--dist loadfile` a
# worker takes whole modules in collection order, and one of these taken last would leave the other worker
# idle for minutes at the end.
LONGEST_FIRST = ('test_train_distributed.py', 'test_sweep.py', 'test_compare.py', 'test_train.py',
                 'test_efficientnet.py', 'test_colab.py', 'test_sweep_race.py', 'test_sweep_tiny_imagenet_e2e.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the order within a module stays.


# With BW_JAX_CPU_PROFILE=FILE, each test appends a JSON line to FILE: its wall time and the CPU seconds of this
# process and of the processes it started and waited for (what benchmarks/suite_cpu.py tabulates). Module-scoped
# fixtures count towards the first test that uses them. A pytest that a test starts (test_kernel_build) counts
# in that test's subprocess seconds, not with lines of its own: the variable is unset while a test runs.
CPU_PROFILE = os.environ.get('BW_JAX_CPU_PROFILE')


def cpu_seconds(who: int) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  if not CPU_PROFILE:
    yield
    return
  wall, own, children = time.monotonic(), cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
  os.environ.pop('BW_JAX_CPU_PROFILE', None)
  try:
    yield
  finally:
    os.environ['BW_JAX_CPU_PROFILE'] = CPU_PROFILE
  line = {'test': item.nodeid, 'wall': time.monotonic() - wall, 'own_cpu': cpu_seconds(resource.RUSAGE_SELF) - own,
          'children_cpu': cpu_seconds(resource.RUSAGE_CHILDREN) - children, 'pid': os.getpid()}
  with open(CPU_PROFILE, 'a') as f:  # One short write per line: the workers' lines do not interleave.
    f.write(json.dumps(line) + '\n')


@pytest.fixture
def patch_layer(monkeypatch):
  """`monkeypatch.setattr` for what BatchWhitening reads while it is traced (which kernels and layouts it
  uses): the layer's compiled function keeps its traces, so JAX's caches are cleared after each change and
  again after the change is undone."""
  import jax

  def setattr(target, name, value):
    monkeypatch.setattr(target, name, value)
    jax.clear_caches()
  yield setattr
  monkeypatch.undo()
  jax.clear_caches()


@pytest.fixture(scope='module')
def postgres_url():
  """The URL of a PostgreSQL server of its own (tests/postgres_server.py); stopped at the module's end."""
  binaries = postgres_binaries()
  if binaries is None:
    pytest.skip('PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does it)')
  with postgres_server(binaries) as url:
    yield url
