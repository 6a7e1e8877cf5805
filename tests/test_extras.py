"""bw_jax.extras and the optional parts built on it: one line naming the extra when a package is missing, and
TensorFlow, TFDS and clu imported only where data is read or metrics are written."""

import sys
import textwrap
import types

import pytest

from bw_jax import extras
from subprocess_runs import REPO, run_process, subprocess_env

HEAVY = ('tensorflow', 'tensorflow_datasets', 'clu')


def run_python(code: str, not_installed: tuple[str, ...] = ()) -> tuple[int, str, str]:
  """`code` in a new interpreter where importing any of `not_installed` fails as for a package not installed."""
  hide = ''.join(f'sys.modules[{module!r}] = None\n' for module in not_installed)
  code = f'import sys\n{hide}{textwrap.dedent(code)}'
  done = run_process([sys.executable, '-c', code], cwd=REPO, env=subprocess_env(), timeout=300)
  return done.returncode, done.stdout, done.stderr


def test_require_raises_one_line_naming_the_extra_and_the_missing_modules():
  extras.require('bw_jax.train', 'train', ('json', 'os.path'))  # Installed: nothing happens.
  with pytest.raises(extras.MissingExtraError) as raised:
    extras.require('bw_jax.train', 'train', ('json', 'no_such_module_bw', 'no_such_package_bw.sub'))
  assert str(raised.value) == ("bw_jax.train needs the [train] extra: pip install 'bw_jax[train]' "
                               '(no_such_module_bw, no_such_package_bw.sub not installed).')
  assert raised.value.name == 'bw_jax.train' and isinstance(raised.value, ImportError)


def test_import_extra_names_the_extra_for_a_missing_package_but_not_for_a_broken_one(tmp_path, monkeypatch):
  # A package that is installed but cannot import one of its own dependencies is not a missing extra.
  (tmp_path / 'broken_pkg_bw').mkdir()
  (tmp_path / 'broken_pkg_bw' / '__init__.py').write_text('import dependency_it_lacks_bw\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as raised:
    extras.import_extra('broken_pkg_bw', 'bw_jax.data', 'train')
  assert raised.value.name == 'dependency_it_lacks_bw' and not isinstance(raised.value, extras.MissingExtraError)
  with pytest.raises(extras.MissingExtraError, match=r"^bw_jax\.data needs the \[train\] extra: .*"
                                                     r'\(absent_pkg_bw not installed\)\.$'):
    extras.import_extra('absent_pkg_bw.submodule', 'bw_jax.data', 'train')
  assert extras.import_extra('json.decoder', 'bw_jax.data', 'train') is sys.modules['json.decoder']


def test_import_on_first_use_loads_once_at_the_first_attribute_read():
  loads = []

  def load():
    loads.append(1)
    return types.SimpleNamespace(answer=42, other='x')

  module = extras.import_on_first_use('some_module', load)
  assert isinstance(module, types.ModuleType) and module.__name__ == 'some_module'
  assert not loads
  assert (module.answer, module.other, module.answer) == (42, 'x', 42)
  assert loads == [1]
  with pytest.raises(AttributeError):
    module.missing_attribute


def test_each_optional_package_names_its_extra_in_one_line():
  for package, extra, missing in [('bw_jax.train', 'train', 'ml_collections'),
                                  ('bw_jax.data', 'train', 'ml_collections'),
                                  ('bw_jax.sweep', 'sweep', 'optuna')]:
    code, _, stderr = run_python(f'import {package}', not_installed=(missing,))
    assert code == 1
    assert stderr.splitlines()[-1] == (f"bw_jax.extras.MissingExtraError: {package} needs the [{extra}] extra: "
                                       f"pip install 'bw_jax[{extra}]' ({missing} not installed).")
    assert 'Traceback' in stderr and 'During handling' not in stderr  # No chained error from inside the import.


def test_python_m_bw_jax_main_without_the_train_extra_prints_one_line():
  code, stdout, stderr = run_python("""
      import runpy
      sys.argv = ['bw_jax.main', '--config=configs/smoke.py', '--workdir=/nonexistent']
      runpy.run_module('bw_jax.main', run_name='__main__', alter_sys=True)""", not_installed=('ml_collections', 'optax'))
  assert (code, stdout) == (1, '')
  assert stderr.splitlines() == ["error: bw_jax.train needs the [train] extra: pip install 'bw_jax[train]' "
                                 '(ml_collections, optax not installed).']


def test_the_train_step_path_imports_no_tensorflow_tfds_or_clu():
  # Everything benchmarks/accelerator.py's device sections use, here where TensorFlow is installed.
  code, stdout, stderr = run_python(f"""
      from bw_jax.data import default_dataset_config, imagenet, on_device
      from bw_jax.train import loop, optim, reporting, step
      from bw_jax.train.config.validation import base_config
      config = base_config()
      config.dataset = default_dataset_config('imagenet2012')
      model = step.create_model(config, imagenet.NUM_CLASSES)
      optim.create_optimizer(config, optim.learning_rate_fn(optim.Schedule('cosine', 100, 900), 0.1), 0.0)
      print([name for name in {HEAVY!r} if name in sys.modules])""")
  assert code == 0, stderr
  assert stdout.split() == ['[]']


def test_reading_data_without_tensorflow_names_the_train_extra():
  code, _, stderr = run_python("""
      from bw_jax import data
      data.create_split(data.default_dataset_config('imagenet2012'), 'train', 8, train=True)""",
                               not_installed=('tensorflow', 'tensorflow_datasets'))
  assert code == 1
  assert stderr.splitlines()[-1] == ("bw_jax.extras.MissingExtraError: bw_jax.data needs the [train] extra: "
                                     "pip install 'bw_jax[train]' (tensorflow not installed).")


def test_tensorflow_is_imported_with_the_gpus_hidden_whoever_asks_first():
  # TFDS and clu import TensorFlow themselves: through bw_jax they go through `tf_imports.tensorflow` first,
  # which hides the GPUs before TensorFlow creates a device.
  code, stdout, stderr = run_python("""
      from bw_jax.data import tf_imports
      from bw_jax.train import reporting
      calls = []
      hide = tf_imports.tensorflow
      tf_imports.tensorflow = lambda: calls.append('tensorflow') or hide()
      tf_imports.tfds.core
      reporting.metric_writers.MultiWriter
      print(calls, tf_imports.tf.config.get_visible_devices('GPU'))""")
  assert code == 0, stderr
  assert stdout.split('\n')[0] == "['tensorflow', 'tensorflow'] []"
