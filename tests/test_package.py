"""bw_jax as an installable library: its declared dependencies against the imports and requirements.txt,
the public names of `bw_jax`, and a wheel built from this checkout, installed into a fresh virtual
environment and used from outside the checkout."""

import ast
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tomllib

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

import bw_jax
from bw_jax.nn import kernels
from installs import PIP, build_wheel, check_run, site_packages
from subprocess_runs import COMPILATION_CACHE_ENV, REPO, as_a_user_runs_it, run_process, subprocess_env

with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
  PROJECT = tomllib.load(f)['project']
CORE = [Requirement(r) for r in PROJECT['dependencies']]
EXTRAS = {extra: [Requirement(r) for r in requirements]
          for extra, requirements in PROJECT['optional-dependencies'].items()}
# requirements.txt pins these for reproducible installs although bw_jax does not need them itself.
PINNED_ONLY = set()


def requirements_txt_pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        name, version = line.split('==')
        pins[canonicalize_name(name)] = version
  return pins


def third_party_imports(path: str, module_level_only: bool = False) -> set[str]:
  """Top-level names of the non-standard-library modules a Python file imports with `import` statements:
  anywhere in it, or only those run when it is imported."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in module_level_nodes(tree) if module_level_only else ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return {n for n in names if n not in sys.stdlib_module_names and n not in ('bw_jax', '__future__')}


def imports_naming_their_extra(path: str) -> dict[str, str]:
  """{top-level module name: extra} of the file's `import_extra(module, part, extra)` calls (bw_jax.extras),
  which import a package when a function runs and name the extra that installs it."""
  with open(path) as f:
    calls = [node for node in ast.walk(ast.parse(f.read()))
             if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'import_extra']
  assert all(isinstance(a, ast.Constant) for call in calls for a in (call.args[0], call.args[2])), path
  return {call.args[0].value.split('.')[0]: call.args[2].value for call in calls}


def module_level_nodes(tree: ast.Module) -> list[ast.AST]:
  """The nodes Python runs when it imports the module: everything but the bodies of functions."""
  nodes, todo = [], list(tree.body)
  while todo:
    node = todo.pop()
    nodes.append(node)
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      todo.extend(ast.iter_child_nodes(node))
  return nodes


def distribution_names(module: str) -> set[str]:
  return {canonicalize_name(d) for d in importlib.metadata.packages_distributions().get(module, [module])}


def declared(*parts: str) -> set[str]:
  """Distribution names of the core dependencies and of the extras `parts` (their own extras included)."""
  requirements = CORE + [r for part in parts for r in EXTRAS[part]]
  names = {canonicalize_name(r.name) for r in requirements}
  for r in requirements:
    names |= declared(*r.extras) if canonicalize_name(r.name) == 'bw-jax' else set()
  return names - {'bw-jax'}


# Which extra each part of the package needs; the layer, the model and the rest need the core alone.
PART_EXTRAS = {'train': ('train',), 'data': ('train',), 'main.py': ('train',), 'convert.py': ('train',),
               'finetune_demo.py': ('train',), 'sweep': ('sweep',)}


def part_of(path: str) -> str:
  return os.path.relpath(path, os.path.join(REPO, 'bw_jax')).split(os.sep)[0]


def test_every_third_party_import_of_the_package_is_declared_by_its_part_or_the_extra_it_names():
  undeclared = {}
  for path in glob.glob(os.path.join(REPO, 'bw_jax', '**', '*.py'), recursive=True):
    wanted = [(module, PART_EXTRAS.get(part_of(path), ())) for module in third_party_imports(path)]
    wanted += [(module, (extra,)) for module, extra in imports_naming_their_extra(path).items()]
    for module, extras in wanted:
      if not distribution_names(module) & declared(*extras):
        undeclared[os.path.relpath(path, REPO)] = module
  assert not undeclared
  assert imports_naming_their_extra(os.path.join(REPO, 'bw_jax', 'data', 'tf_imports.py')) == {
      'tensorflow': 'train', 'tensorflow_datasets': 'train'}  # What the test reads.


def required_modules(package_init: str) -> set[str]:
  """Top-level names of the modules a package's `require(part, extra, (modules...))` checks."""
  with open(package_init) as f:
    calls = [node for node in ast.walk(ast.parse(f.read()))
             if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'require']
  call, = calls
  return {element.value.split('.')[0] for element in call.args[2].elts}


@pytest.mark.parametrize('package', ['train', 'data', 'sweep'])
def test_an_optional_package_checks_every_package_its_modules_import_when_imported(package):
  # What its modules import as they are imported: each must be core, or checked by the package's
  # `require` first (one line naming the extra rather than a ModuleNotFoundError from one module).
  checked = required_modules(os.path.join(REPO, 'bw_jax', package, '__init__.py'))
  core = {canonicalize_name(r.name) for r in CORE}
  paths = glob.glob(os.path.join(REPO, 'bw_jax', package, '**', '*.py'), recursive=True)
  if package == 'train':
    paths.append(os.path.join(REPO, 'bw_jax', 'main.py'))  # It imports bw_jax.train first.
  unchecked = {}
  for path in paths:
    for module in third_party_imports(path, module_level_only=True) - checked:
      if not distribution_names(module) & core:
        unchecked[os.path.relpath(path, REPO)] = module
  assert not unchecked
  for module in checked:  # And `require` checks nothing its extra does not install.
    assert distribution_names(module) & declared(*PART_EXTRAS[package]), module


def test_the_core_install_is_jax_flax_and_numpy():
  # The layer and the model need nothing else (the test above); the training system comes with [train].
  assert {canonicalize_name(r.name) for r in CORE} == {'jax', 'jaxlib', 'flax', 'numpy'}
  assert {canonicalize_name(r.name) for r in EXTRAS['train']} >= {'tensorflow-cpu', 'clu', 'ml-collections'}


def test_public_names_are_those_of_their_modules():
  from bw_jax.models import depthwise
  from bw_jax.models import efficientnet
  from bw_jax.train import loop as train
  from bw_jax.nn import whitening
  for name, module in [('BatchWhitening', whitening), ('BWSettings', whitening), ('whiten', whitening),
                       ('whitening_matrix', whitening), ('batch_moments', whitening),
                       ('DepthwiseConv', depthwise), ('EfficientNet', efficientnet),
                       ('train_and_evaluate', train)]:
    assert getattr(bw_jax, name) is getattr(module, name)
  assert set(bw_jax.__all__) == set(dir(bw_jax))
  with pytest.raises(AttributeError, match="no attribute 'BatchNorm'"):
    bw_jax.BatchNorm


def run_python(code: str, python: str = sys.executable, cwd: str = REPO, env: dict | None = None
               ) -> subprocess.CompletedProcess:
  return run_process([python, '-c', code], cwd=cwd, env=env or subprocess_env(), timeout=300)


def test_import_bw_jax_loads_no_framework_until_a_name_is_used():
  done = run_python('import sys\nimport bw_jax\n'
                    'loaded = lambda: [m for m in ("jax", "flax", "tensorflow") if m in sys.modules]\n'
                    'print(loaded())\nbw_jax.BatchWhitening\nprint(loaded())')
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == ['[]', "['jax', 'flax']"]


# ----------------------------------------------------------------------------------------------------------
# The wheel, installed outside the checkout


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> dict[str, str]:
  """A wheel built from a copy of the checkout's package files, installed into a new virtual environment
  that also sees this environment's site-packages (the dependencies, the [train] extra's included; their .pth
  files, such as an editable bw_jax's, are not run) and nothing of the checkout. No network: --no-index,
  --no-deps. The core install alone: test_install_environments.py."""
  root = tmp_path_factory.mktemp('installed')
  venv, cwd = str(root / 'venv'), str(root / 'elsewhere')
  os.makedirs(cwd)
  wheel = build_wheel(str(root))
  check_run([sys.executable, '-m', 'venv', '--without-pip', venv])
  python = os.path.join(venv, 'bin', 'python')
  check_run([sys.executable, *PIP, '--python', python, 'install', '--no-deps', '--no-index', '--ignore-installed',
             wheel])
  ours = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
  with open(os.path.join(site_packages(python), 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(sorted(ours)) + '\n')
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
  # The test suite's persistent compilation cache (tests/test_train.py): the smoke programs compile once.
  env.update(COMPILATION_CACHE_ENV)
  return {'wheel': wheel, 'python': python, 'venv': venv, 'cwd': cwd, 'env': env}


@pytest.mark.slow  # Builds a wheel and imports TensorFlow in a new interpreter: ~30 s on 2 busy cores.
def test_installed_wheel_whitens_a_batch_as_numpy_does(installed):
  code = """
import bw_jax, jax, numpy as np
from bw_jax.nn import kernels
print(bw_jax.__file__, bw_jax.__version__, all(s.is_file() for s in kernels.SOURCES), kernels.available())
x = np.random.default_rng(0).normal(size=(64, 5)) @ np.triu(np.ones((5, 5)))
layer = bw_jax.BatchWhitening(use_running_average=False, group_size=None, epsilon=1e-3, use_scale=False,
                              use_bias=False)
variables = layer.init(jax.random.key(0), x.astype(np.float32))
y, _ = layer.apply(variables, x.astype(np.float32), mutable=['batch_stats'])
np.save('y.npy', np.asarray(y))
"""
  done = run_python(code, installed['python'], installed['cwd'], as_a_user_runs_it(installed['env']))
  assert done.returncode == 0, done.stderr
  module_file, version, has_kernel_source, kernels_available = done.stdout.split()
  assert module_file.startswith(installed['venv'] + os.sep), module_file  # Not the checkout's copy.
  assert has_kernel_source == 'True', 'the wheel must ship the C++ sources of the CPU kernels (package-data)'
  assert kernels_available == str(kernels.available()), done.stderr
  assert os.path.basename(installed['wheel']).startswith(f'bw_jax-{version}-')
  assert version == bw_jax.__version__
  x = np.random.default_rng(0).normal(size=(64, 5)) @ np.triu(np.ones((5, 5)))
  x = x.astype(np.float32).astype(np.float64)
  centred = x - x.mean(axis=0)
  lower = np.linalg.cholesky(centred.T @ centred / (len(x) - 1) + 1e-3 * np.eye(5))
  expected = np.linalg.solve(lower, centred.T).T
  np.testing.assert_allclose(np.load(os.path.join(installed['cwd'], 'y.npy')), expected, atol=2e-4)


@pytest.mark.slow  # Trains 2 steps of the smoke model and evaluates it: ~1-2 minutes on 2 busy cores.
def test_installed_wheel_trains_with_python_m_bw_jax_main(installed, tmp_path):
  where = run_python('import bw_jax.main; print(bw_jax.main.__file__)', installed['python'], installed['cwd'],
                     installed['env'])
  assert where.stdout.strip().startswith(installed['venv'] + os.sep), where.stdout + where.stderr
  done = run_process(
      [installed['python'], '-m', 'bw_jax.main', f'--config={os.path.join(REPO, "configs", "smoke.py")}',
       f'--workdir={tmp_path}', '--config.num_train_steps=2'], cwd=installed['cwd'], env=installed['env'])
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  assert 'eval_accuracy' in done.stdout and 'after 2 steps' in done.stdout
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['step'] == 2
