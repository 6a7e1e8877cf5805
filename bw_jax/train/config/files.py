"""Config files (`get_config()` modules) loaded by path from any working directory.

A config file may build on another with `from configs import default`, as flax's examples do. That import
needs the folder *above* `configs/` on `sys.path`; `python -m` from the repository root provides it, and
`add_config_root` provides it from anywhere else (an installed bw_jax run from another directory, a sweep
file in `configs/sweeps/`, a promoted config written outside the repository that imports a base recipe).
"""

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

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


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted leaf key of `config` ('train.dataset.data_dir', …)."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, f'{prefix}{key}.')
    else:
      keys.append(f'{prefix}{key}')
  return keys


def parse_value(text: str, kind: type) -> Any:
  """`text` as a value of `kind` (the key's type): 'true'/'false' for bool, Python literals for tuples."""
  if kind is str:
    return text
  if kind is bool:
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError('expected true or false')
    return text.lower() in ('true', '1')
  if kind in (int, float):
    return kind(text)
  value = ast.literal_eval(text)  # Tuples, lists, None.
  if kind is not type(None) and not isinstance(value, kind):
    raise ValueError(f'expected a {kind.__name__}')
  return value


def apply_overrides(config: ml_collections.ConfigDict, assignments: Sequence[str], what: str = 'config'
                    ) -> None:
  """Sets each 'KEY=VALUE' (e.g. 'train.dataset.data_dir=/data') on `config`, VALUE parsed as the type of the
  key it replaces (as `--config.KEY=VALUE` of bw_jax.main); raises one ValueError naming a bad key or value."""
  keys = leaf_keys(config)
  for assignment in assignments:
    key, sep, text = assignment.partition('=')
    if not sep:
      raise ValueError(f'--config.{assignment}: write --config.KEY=VALUE.')
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ''
      raise ValueError(f"--config.{assignment}: unknown {what} key '{key}'{hint}.")
    parent_key, _, name = key.rpartition('.')
    parent = config
    for part in parent_key.split('.') if parent_key else []:
      parent = parent[part]
    kind = parent.get_type(name)
    try:
      parent[name] = parse_value(text, kind)
    except (ValueError, TypeError, SyntaxError) as e:
      raise ValueError(f"--config.{assignment}: {text!r} is not a valid {kind.__name__} for '{key}' ({e}).") from None
