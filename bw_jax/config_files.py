"""Config files (`get_config()` modules) loaded by path from any working directory.

A config file may build on another with `from configs import default`, as flax's examples do. That import
needs the folder *above* `configs/` on `sys.path`; `python -m` from the repository root provides it, and
`add_config_root` provides it from anywhere else (an installed bw_jax run from another directory, a sweep
file in `configs/sweeps/`, a promoted config written outside the repository that imports a base recipe).
"""

import importlib.util
import os
import sys
from typing import Sequence

import ml_collections


def config_root(path: str) -> str | None:
  """The directory that holds the `configs/` folder `path` lives in (at any depth), or None."""
  directory = os.path.dirname(os.path.abspath(path))
  while True:
    parent = os.path.dirname(directory)
    if os.path.basename(directory) == 'configs':
      return parent
    if parent == directory:
      return None
    directory = parent


def add_config_root(path: str) -> None:
  """Puts `config_root(path)` first on sys.path so that the file's `from configs import …` works."""
  root = config_root(path)
  if root is not None and root not in sys.path:
    sys.path.insert(0, root)


def config_path_in_flags(argv: Sequence[str]) -> str | None:
  """PATH of `--config=PATH` or `--config PATH` in a command line (None when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':', 1)[0]  # config_flags allows `--config=file.py:arg`.
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':', 1)[0]
  return None


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path`, from any working directory."""
  if not os.path.isfile(path):
    raise ValueError(f'Config file {path!r} does not exist.')
  add_config_root(path)
  name = 'bw_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
