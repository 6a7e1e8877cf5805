"""bw_jax where only some packages are installed, each in a fresh virtual environment:

- the core install, `pip install bw_jax` (jax, jaxlib, flax, numpy and what they need): trains a BW
  EfficientNet step as the checkout does, and its training commands name the extra they need in one line;
- the GPU machine's image (those plus tensorboard and pillow; no TensorFlow, TFDS, clu, ml-collections or
  Optuna; no registry): benchmarks/device_run.sh --quick runs from the repository with the wheels
  `make device-wheels` fetches, and writes its JSON and Markdown.

One build serves both (~1 minute from pip's cache): the core venv, and an image venv that sees the core venv's
packages (a .pth file) and adds the image's others. Every package resolves to this environment's version.
"""

import json
import os
import sys

import pytest

from installs import PIP, build_wheel, check_run, installed_distributions, site_packages, this_environments_versions
from subprocess_runs import COMPILATION_CACHE_ENV, REPO, run_process, subprocess_env
from test_benchmark_accelerator import check_quick_results

pytestmark = pytest.mark.slow  # Each builds or uses virtual environments.

CORE = {'jax', 'jaxlib', 'flax', 'numpy'}
# What the GPU image has besides the core install's packages (README of the device tool; our pins).
IMAGE_EXTRA = ('tensorboard', 'pillow')
IMAGE = CORE | {'optax', 'orbax-checkpoint', 'scipy', 'absl-py', 'pyyaml', *IMAGE_EXTRA}
NEITHER = {'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets', 'clu', 'ml-collections', 'optuna'}

# Two plain SGD steps (jax.grad: optax is not a core dependency) of a tiny BW EfficientNet on one batch.
TRAIN_STEP = """
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bw_jax
from bw_jax import BWSettings, EfficientNet

model = EfficientNet(num_classes=10, stem_type=2, mbconv_type=2, head_type=2, bw=BWSettings(group_size=4),
                     width_multiplier=0.25, depth_multiplier=0.1)
images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
labels = jnp.arange(8) % 10
variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), images, train=False)


def loss_fn(params, batch_stats):
  logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
  log_probabilities = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probabilities, labels[:, None], 1)), updates['batch_stats']


@jax.jit
def sgd_step(params, batch_stats):
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
  return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), batch_stats, loss


params, batch_stats, losses = variables['params'], variables['batch_stats'], []
for _ in range(2):
  params, batch_stats, loss = sgd_step(params, batch_stats)
  losses.append(float(loss))
imported = [m for m in ('optax', 'orbax', 'ml_collections', 'clu', 'tensorflow') if m in sys.modules]
print(json.dumps({'bw_jax': bw_jax.__file__, 'losses': losses, 'imported': imported}))
"""


@pytest.fixture(scope='module')
def constraints(tmp_path_factory) -> str:
  return this_environments_versions(str(tmp_path_factory.mktemp('constraints') / 'constraints.txt'))


@pytest.fixture(scope='module')
def core_python(tmp_path_factory, constraints) -> str:
  """The python of a new virtual environment holding the wheel of bw_jax and what pip installs for it."""
  root = tmp_path_factory.mktemp('core')
  wheel = build_wheel(str(root))
  check_run([sys.executable, '-m', 'venv', str(root / 'venv')])
  python = str(root / 'venv' / 'bin' / 'python')
  check_run([python, *PIP, 'install', '--quiet', '--constraint', constraints, wheel])
  return python


@pytest.fixture(scope='module')
def image_python(tmp_path_factory, core_python, constraints) -> str:
  """The python of a virtual environment with the core venv's packages and the image's others."""
  venv = tmp_path_factory.mktemp('image') / 'venv'
  check_run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
  python = str(venv / 'bin' / 'python')
  with open(os.path.join(site_packages(python), 'core_venv.pth'), 'w') as f:
    f.write(site_packages(core_python) + '\n')
  check_run([sys.executable, *PIP, '--python', python, 'install', '--quiet', '--constraint', constraints,
             *IMAGE_EXTRA])
  return python


def outside_the_checkout(tmp_path) -> dict:
  """Where and how an installed bw_jax runs: cwd `tmp_path`, nothing of the checkout on PYTHONPATH."""
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
  return {'cwd': str(tmp_path), 'env': {**env, **COMPILATION_CACHE_ENV}}


def test_the_core_install_holds_jax_flax_and_numpy_but_no_training_package(core_python):
  distributions = installed_distributions(core_python)
  assert CORE | {'bw-jax'} <= distributions and not distributions & (NEITHER | set(IMAGE_EXTRA))


def test_the_core_install_trains_a_bw_efficientnet_step_as_the_checkout_does(core_python, tmp_path):
  installed = json.loads(check_run([core_python, '-c', TRAIN_STEP], **outside_the_checkout(tmp_path)))
  checkout = json.loads(check_run([sys.executable, '-c', TRAIN_STEP], cwd=REPO, env=subprocess_env()))
  assert installed['bw_jax'].startswith(os.path.dirname(os.path.dirname(core_python)))  # The venv's copy.
  assert installed['imported'] == checkout['imported'] == []  # Not even optax or Orbax, which flax brings.
  assert installed['losses'][1] < installed['losses'][0]
  assert installed['losses'] == pytest.approx(checkout['losses'], rel=1e-5)


@pytest.mark.parametrize('command, extra, missing', [
    (['bw_jax.main', '--config=smoke.py', '--workdir=run'], 'train', 'ml_collections'),
    (['bw_jax.sweep', 'run', '--config=smoke.py', '--dir=sweep'], 'sweep',
     'matplotlib, ml_collections, optuna, pandas, sklearn, sqlalchemy'),
], ids=['main', 'sweep'])
def test_the_core_install_names_the_extra_a_command_needs_in_one_line(core_python, tmp_path, command, extra,
                                                                      missing):
  done = run_process([core_python, '-m', *command], timeout=300, **outside_the_checkout(tmp_path))
  part = 'bw_jax.train' if extra == 'train' else 'bw_jax.sweep'
  line = f"{part} needs the [{extra}] extra: pip install 'bw_jax[{extra}]' ({missing} not installed)."
  assert done.returncode == 1 and done.stdout == ''
  assert len(done.stderr.splitlines()) == 1 and line in done.stderr, done.stderr


def test_the_gpu_image_runs_device_run_quick_from_the_repository(image_python, tmp_path):
  distributions = installed_distributions(image_python)
  assert IMAGE <= distributions and not distributions & NEITHER
  wheels = tmp_path / 'wheels'
  check_run(['make', '--no-print-directory', 'device-wheels', f'DEVICE_WHEELS={wheels}', f'PYTHON={sys.executable}'],
            cwd=REPO)
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    pin, = [line.strip().split('==')[1] for line in f if line.startswith('ml-collections==')]
  assert sorted(os.listdir(wheels)) == [f'ml_collections-{pin}-py3-none-any.whl']
  out = tmp_path / 'out'
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
  env.update(COMPILATION_CACHE_ENV, PYTHON=image_python, DEVICE_WHEELS=str(wheels), OUT=str(out))
  done = run_process([os.path.join(REPO, 'benchmarks', 'device_run.sh'), '--quick', '--out', str(tmp_path / 'not')],
                     cwd=str(tmp_path), env=env)
  assert done.returncode == 0, done.stdout[-3000:]
  results = check_quick_results(str(out), with_pipeline=False)  # $OUT wins over --out.
  assert results['bw_jax'] == os.path.join(REPO, 'bw_jax')  # The repository's, not the core venv's wheel.
  with open(out / 'log.txt') as f:
    assert f.read() == done.stdout  # stdout and stderr, as device_run.sh printed them.
  assert not (tmp_path / 'not').exists()
