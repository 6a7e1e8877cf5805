"""The suite's XLA flags (tests/subprocess_runs.py): every process of the suite compiles with them, and the
processes that run code as a user pastes it do not."""

import os
import sys

from subprocess_runs import SUITE_XLA_FLAGS, as_a_user_runs_it, run_process, subprocess_env

DEVICE_COUNT = '--xla_force_host_platform_device_count=8'


def test_this_process_and_its_children_have_the_suite_flags_added_to_their_own():
  for flag in SUITE_XLA_FLAGS:
    assert flag in os.environ['XLA_FLAGS'].split()
  assert subprocess_env({'XLA_FLAGS': DEVICE_COUNT})['XLA_FLAGS'].split() == [DEVICE_COUNT, *SUITE_XLA_FLAGS]
  assert subprocess_env()['XLA_FLAGS'].split() == list(SUITE_XLA_FLAGS)


def test_as_a_user_runs_it_keeps_only_the_callers_own_flags():
  assert as_a_user_runs_it(subprocess_env({'XLA_FLAGS': DEVICE_COUNT}))['XLA_FLAGS'] == DEVICE_COUNT
  env = as_a_user_runs_it(subprocess_env())
  assert 'XLA_FLAGS' not in env
  assert env == {k: v for k, v in subprocess_env().items() if k != 'XLA_FLAGS'}  # The rest is left as it was.


def test_a_child_compiles_with_the_suite_flags():
  """XLA refuses an unknown flag when JAX creates its devices: a flag that a new jaxlib renamed fails here
  first, in one line, rather than in every test that starts a process."""
  done = run_process([sys.executable, '-c', 'import jax; print(int(jax.jit(lambda x: x + 1)(1)))'],
                     env=subprocess_env(), timeout=300)
  assert done.returncode == 0 and done.stdout.split() == ['2'], done.stdout + done.stderr[-3000:]
