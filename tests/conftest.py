"""Test-session settings and shared fixtures."""

import pytest

from bw_jax.runtime import configure_cpu_dispatch
from postgres_server import postgres_binaries, postgres_server

configure_cpu_dispatch()  # Before any test creates the devices; why: bw_jax/runtime.py.


@pytest.fixture(scope='module')
def postgres_url():
  """The URL of a PostgreSQL server of its own (tests/postgres_server.py); stopped at the module's end."""
  binaries = postgres_binaries()
  if binaries is None:
    pytest.skip('PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does it)')
  with postgres_server(binaries) as url:
    yield url
