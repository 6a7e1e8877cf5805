"""A throwaway PostgreSQL server for the sweep tests (the `postgres_url` fixture of tests/conftest.py)."""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from typing import Iterator


def postgres_binaries() -> str | None:
  """Directory of initdb / pg_ctl (Debian's postgresql package, newest version), or None."""
  found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'))
  if found:
    return os.path.dirname(found[-1])
  pg_ctl = shutil.which('pg_ctl')
  return os.path.dirname(pg_ctl) if pg_ctl else None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(binaries: str) -> Iterator[str]:
  """A server of its own in a temporary directory on a loopback port, with an empty database `sweep`;
  yields its SQLAlchemy URL and stops it at the end."""
  as_user = []
  data = tempfile.mkdtemp(prefix='bw_jax_pg_')
  if os.geteuid() == 0:  # The server refuses to run as root.
    shutil.chown(data, 'postgres', 'postgres')
    as_user = ['runuser', '-u', 'postgres', '--']
  port = free_port()
  subprocess.run([*as_user, f'{binaries}/initdb', '-D', data, '-U', 'postgres', '-A', 'trust', '--no-sync'],
                 check=True, capture_output=True)
  options = f'-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off'
  stop = [*as_user, f'{binaries}/pg_ctl', '-D', data, '-m', 'immediate', 'stop']
  subprocess.run([*as_user, f'{binaries}/pg_ctl', '-D', data, '-o', options, '-l', f'{data}/server.log', '-w',
                  'start'], check=True, capture_output=True)
  # pg_ctl detaches the server: a watchdog stops it (and removes its files) should pytest itself be killed.
  watchdog = subprocess.Popen(
      ['sh', '-c', f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; '
                   f'{" ".join(stop)} >/dev/null 2>&1; rm -rf {data}'], start_new_session=True)
  try:
    import psycopg2
    connection = psycopg2.connect(host='127.0.0.1', port=port, user='postgres', dbname='postgres')
    connection.autocommit = True
    connection.cursor().execute('CREATE DATABASE sweep')
    connection.close()
    yield f'postgresql+psycopg2://postgres@127.0.0.1:{port}/sweep'
  finally:
    watchdog.kill()
    watchdog.wait()
    subprocess.run(stop, capture_output=True)
    shutil.rmtree(data, ignore_errors=True)
