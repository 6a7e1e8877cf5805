"""bw_jax installed outside the checkout, for the tests that use it (test_package.py,
test_install_environments.py): a wheel built from a copy of the package files, and virtual environments."""

import glob
import importlib.metadata
import os
import shutil
import sys

from packaging.utils import canonicalize_name

from subprocess_runs import REPO, run_process

PIP = ['-m', 'pip', '--disable-pip-version-check', '--no-input']


def check_run(command: list[str], timeout: float = 600, **kwargs) -> str:
  """Runs `command` (dying with this process); its stdout, or an assertion error with its output."""
  done = run_process(command, timeout=timeout, **kwargs)
  assert done.returncode == 0, f'{command}:\n{done.stdout}\n{done.stderr}'
  return done.stdout


def build_wheel(root: str) -> str:
  """The path of a wheel of bw_jax built in `root` from a copy of the checkout's package files (what an sdist
  holds: the package, pyproject.toml, README.md). No network: --no-index, --no-build-isolation."""
  source, dist = os.path.join(root, 'source'), os.path.join(root, 'dist')
  shutil.copytree(os.path.join(REPO, 'bw_jax'), os.path.join(source, 'bw_jax'),
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), source)
  check_run([sys.executable, *PIP, 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '--wheel-dir', dist,
             source])
  wheel, = glob.glob(os.path.join(dist, 'bw_jax-*.whl'))
  return wheel


def site_packages(python: str) -> str:
  return check_run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip()


def this_environments_versions(path: str) -> str:
  """Writes a pip constraints file to `path` pinning every distribution of this environment (bw_jax
  excepted) at its version: an environment built with it resolves to what the suite runs with."""
  pins = {canonicalize_name(d.metadata['Name']): d.version for d in importlib.metadata.distributions()}
  pins.pop('bw-jax', None)
  with open(path, 'w') as f:
    f.write(''.join(f'{name}=={version}\n' for name, version in sorted(pins.items())))
  return path


def installed_distributions(python: str) -> set[str]:
  """Canonical names of the distributions `python`'s environment holds (site-packages and .pth paths)."""
  code = 'import importlib.metadata as m; print(*{d.metadata["Name"] for d in m.distributions()})'
  return {canonicalize_name(name) for name in check_run([python, '-c', code]).split()}
