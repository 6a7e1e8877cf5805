"""Test-session settings and shared fixtures."""

import jax
import pytest

from postgres_server import postgres_binaries, postgres_server

# jax 0.10.2 on CPU: with asynchronous dispatch, block_until_ready intermittently never returned (all XLA
# threads idle) in long benchmark runs; synchronous dispatch has never hung here, and a hung CI run would
# only show up as a time-out.
jax.config.update('jax_cpu_enable_async_dispatch', False)


@pytest.fixture(scope='module')
def postgres_url():
  """The URL of a PostgreSQL server of its own (tests/postgres_server.py); stopped at the module's end."""
  binaries = postgres_binaries()
  if binaries is None:
    pytest.skip('PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does it)')
  with postgres_server(binaries) as url:
    yield url
