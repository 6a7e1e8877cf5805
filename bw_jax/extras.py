"""What the optional parts of bw_jax need, and one line naming the extra to install when it is missing.

`pip install bw_jax` installs the layer and the model (jax, jaxlib, flax, numpy). The extras of
pyproject.toml add the rest: `[train]` the training system (`bw_jax.train`, `bw_jax.data`, `bw_jax.main`),
`[sweep]` sweeps and comparisons (`bw_jax.sweep`), `[postgres]` a PostgreSQL sweep storage. Each optional
subpackage calls `require` when it is imported, so that a missing package is reported as

    bw_jax.train needs the [train] extra: pip install 'bw_jax[train]' (ml_collections not installed).

rather than as a traceback from deep inside an import. Packages that only some uses of a part need, and that
are slow or heavy to import (TensorFlow for the input pipeline, clu for metric files), are bound with
`import_on_first_use`: the module is imported when one of its attributes is first read, so that a train step
runs where TensorFlow is not installed (an accelerator image) and pays nothing for it where it is.
"""

from collections.abc import Callable, Sequence
import importlib
import importlib.util
import types


class MissingExtraError(ImportError):
  """A part of bw_jax was imported or used without a package its extra installs; the message is one line."""


def is_installed(module: str) -> bool:
  """Whether `module` (dotted names too) can be imported, without importing it (only its parent packages)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ModuleNotFoundError, ValueError):  # A parent package is missing; or `module` is set to None.
    return False


def missing_extra_message(part: str, extra: str, missing: Sequence[str]) -> str:
  return f"{part} needs the [{extra}] extra: pip install 'bw_jax[{extra}]' ({', '.join(missing)} not installed)."


def require(part: str, extra: str, modules: Sequence[str]) -> None:
  """Raises MissingExtraError unless every one of `modules` can be imported: `part` (a module name, as the
  user imports it) needs them, and `extra` (a [project.optional-dependencies] name) installs them."""
  missing = [module for module in modules if not is_installed(module)]
  if missing:
    # `name` = the part: `python -m` of a part's package then prints this line alone (runpy reports an
    # ImportError of the package it is asked to run as one line naming the error).
    raise MissingExtraError(missing_extra_message(part, extra, missing), name=part)


def import_extra(module: str, part: str, extra: str) -> types.ModuleType:
  """`importlib.import_module(module)`, or MissingExtraError when `module`'s package is not installed. An
  installed package that fails to import (one of its own dependencies missing) raises its own error."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name is None or not (module == error.name or module.startswith(error.name + '.')):
      raise
    raise MissingExtraError(missing_extra_message(part, extra, [error.name]), name=part) from None


class _ModuleOnFirstUse(types.ModuleType):
  """Stands for a module until one of its attributes is read, then imports it (with `load`) and forwards
  every attribute read to it. Setting attributes is not forwarded (mock.patch the real module's)."""

  def __init__(self, name: str, load: Callable[[], types.ModuleType]):
    super().__init__(name)
    self.__dict__['_load_module'] = load

  def __getattr__(self, attribute: str):  # Called only for names this stand-in does not hold itself.
    if '_module' not in self.__dict__:
      self.__dict__['_module'] = self._load_module()
    return getattr(self.__dict__['_module'], attribute)


def import_on_first_use(module: str, load: Callable[[], types.ModuleType]) -> types.ModuleType:
  """A stand-in for `module` that calls `load` (a function importing and configuring it, e.g. with
  `import_extra`) when one of its attributes is first read, and forwards every read to what `load` returned.

  Module-level code that reads the stand-in (a base class, a decorator, a constant) imports the module there
  and then; annotations must then be strings (`from __future__ import annotations`).
  """
  return _ModuleOnFirstUse(module, load)



def exit_without_extra(package: str) -> None:
  """For a `python -m` command: imports `package`, whose import checks its extra; without the extra, exits with
  that check's one line (`error: …`, status 1 as any SystemExit with a message) instead of a traceback."""
  try:
    importlib.import_module(package)
  except MissingExtraError as error:
    raise SystemExit(f'error: {error}') from None
