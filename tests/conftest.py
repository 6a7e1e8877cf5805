"""Test-session settings and shared fixtures."""

import os

from subprocess_runs import xla_flags

# Before JAX starts its CPU backend (it reads XLA_FLAGS then); processes the tests start inherit it. Why:
# TEST_XLA_FLAGS in tests/subprocess_runs.py. A device count or other flag given by the caller is kept.
os.environ['XLA_FLAGS'] = xla_flags(*os.environ.get('XLA_FLAGS', '').split())

import pytest  # noqa: E402

from bw_jax.runtime import configure_cpu_dispatch  # noqa: E402
from postgres_server import postgres_binaries, postgres_server  # noqa: E402

configure_cpu_dispatch()  # Before any test creates the devices; why: bw_jax/runtime.py.


@pytest.fixture(scope='module')
def postgres_url():
  """The URL of a PostgreSQL server of its own (tests/postgres_server.py); stopped at the module's end."""
  binaries = postgres_binaries()
  if binaries is None:
    pytest.skip('PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does it)')
  with postgres_server(binaries) as url:
    yield url
