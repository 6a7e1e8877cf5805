"""Config files load from any working directory: `config_root` finds the folder above `configs/`, and a file's
`from configs import …` reads the `configs/` it lives in, not one on the caller's path."""

import os
import shutil
import sys

import pytest

from bw_jax.train.config.files import config_path_in_flags, config_root
from subprocess_runs import REPO, run_process, subprocess_env


@pytest.mark.parametrize('relative, root', [
    ('proj/configs/smoke.py', 'proj'),
    ('proj/configs/sweeps/smoke.py', 'proj'),  # At any depth below configs/.
    ('proj/configs/a/configs/b.py', 'proj/configs/a'),  # The nearest configs/ above the file.
    ('proj/other/smoke.py', None),
    ('smoke.py', None),
])
def test_config_root_is_the_folder_that_holds_the_nearest_configs_folder(tmp_path, relative, root):
  expected = None if root is None else str(tmp_path / root)
  assert config_root(str(tmp_path / relative)) == expected


def test_config_root_of_a_relative_path_is_taken_from_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config_root('configs/sweeps/smoke.py') == str(tmp_path)


@pytest.mark.parametrize('argv, path', [
    (['--config=configs/smoke.py', '--workdir=w'], 'configs/smoke.py'),
    (['--workdir', 'w', '--config', 'configs/smoke.py'], 'configs/smoke.py'),
    (['--config=configs/smoke.py:arg'], 'configs/smoke.py'),
    (['--workdir=w'], None),
])
def test_config_path_in_flags(argv, path):
  assert config_path_in_flags(argv) == path


def test_a_copied_configs_folder_loads_its_own_modules_from_another_directory(tmp_path):
  """A copy of configs/ whose default.py differs (ε = 0.25), loaded by absolute path in a process whose
  working directory and sys.path hold neither it nor the checkout: its sweep file's `from configs import
  smoke` and smoke's `from configs import default` must read the copy."""
  configs = shutil.copytree(os.path.join(REPO, 'configs'), str(tmp_path / 'project' / 'configs'),
                            ignore=shutil.ignore_patterns('__pycache__'))
  default = os.path.join(configs, 'default.py')
  with open(default) as f:
    text = f.read()
  assert text.count('config.model.bw.epsilon = 0.1\n') == 1
  with open(default, 'w') as f:
    f.write(text.replace('config.model.bw.epsilon = 0.1\n', 'config.model.bw.epsilon = 0.25\n'))
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  code = ('import sys; from bw_jax.train.config.files import load_config_file; '
          "print(load_config_file(sys.argv[1]).train.model.bw.epsilon); "
          "print(sorted({m.__file__ for n, m in sys.modules.items() if n.startswith('configs.')}))")
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}  # The checkout is not on the path.
  done = run_process([sys.executable, '-c', code, os.path.join(configs, 'sweeps', 'smoke.py')], cwd=str(elsewhere),
                     env=env, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  epsilon, modules = done.stdout.splitlines()
  assert float(epsilon) == 0.25
  assert modules == str(sorted([default, os.path.join(configs, 'smoke.py')]))
