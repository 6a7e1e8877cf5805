"""Where a C++ compiler is present the CPU kernels must build, or setup and the tests fail loudly; without a
compiler (or with BW_JAX_CPU_KERNELS=0) the layer uses XLA's products after one warning. Each case in a fresh
process, with a kernel cache of its own and a compiler that fails on purpose where one is needed."""

import os
import sys

import pytest

from bw_jax.nn import kernels
from subprocess_runs import REPO, run_process, subprocess_env

BROKEN_COMPILER = '#!/bin/sh\necho "group_products.cc:1:1: error: this compiler fails on purpose" >&2\nexit 1\n'
# Two kernel tests that run wherever the kernels build: one of the kernels themselves, one of the layer.
KERNEL_TESTS = ('tests/test_kernels.py::test_kernel_results_do_not_depend_on_the_threads',
                'tests/test_whitening_vjp.py::test_whitening_with_affine_equals_numpy_and_autodiff_in_every_layout_'
                'float64[kernel]')


def environment(tmp_path, **env) -> dict[str, str]:
  return subprocess_env({kernels.CACHE_ENV: str(tmp_path / 'cache'), **env})


def broken_compiler(tmp_path) -> dict[str, str]:
  """An environment whose $CXX is a compiler that fails on every source."""
  path = tmp_path / 'c++'
  path.write_text(BROKEN_COMPILER)
  path.chmod(0o755)
  return environment(tmp_path, CXX=str(path))


def build_ahead(env):
  return run_process([sys.executable, '-m', 'bw_jax.nn.kernels'], env=env, cwd=REPO, timeout=300)


def test_setup_fails_in_one_line_when_the_compiler_fails(tmp_path):
  done = build_ahead(broken_compiler(tmp_path))
  assert done.returncode == 1, done.stdout + done.stderr
  lines = done.stderr.strip().splitlines()
  assert lines[-1].startswith(f'error: the CPU kernels do not build with {tmp_path / "c++"}: group_products.cc:1:1: '
                              'error: this compiler fails on purpose'), done.stderr
  assert f'{kernels.DISABLE_ENV}=0' in lines[-1] and 'Traceback' not in done.stderr


def test_without_a_compiler_setup_succeeds_with_one_warning(tmp_path):
  done = build_ahead(environment(tmp_path, CXX='', PATH='/nonexistent'))
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == ('bw_jax CPU kernels: not used (no C++ compiler found: set $CXX, or install g++); '
                                 'BatchWhitening uses XLA on the CPU.')
  assert len([line for line in done.stderr.splitlines() if 'kernels are not available' in line]) == 1, done.stderr


def test_switched_off_setup_succeeds_without_a_warning(tmp_path):
  done = build_ahead(broken_compiler(tmp_path) | {kernels.DISABLE_ENV: '0'})
  assert done.returncode == 0 and 'switched off by BW_JAX_CPU_KERNELS=0' in done.stdout, done.stdout + done.stderr
  assert 'kernels are not available' not in done.stderr


@pytest.mark.slow  # A pytest session of its own.
def test_the_kernel_tests_fail_rather_than_skip_when_the_compiler_fails(tmp_path):
  done = run_process([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *KERNEL_TESTS],
                     env=broken_compiler(tmp_path), cwd=REPO, timeout=600)
  summary = done.stdout.strip().splitlines()[-1]
  assert done.returncode == 1 and summary.startswith('2 failed'), done.stdout[-3000:]
  assert 'KernelBuildError' in done.stdout and 'skipped' not in summary
  assert not os.listdir(tmp_path / 'cache'), 'a failed build leaves nothing in the cache'


@pytest.mark.slow  # Starts bw_jax.main, which loads TensorFlow.
def test_training_with_a_failing_compiler_stops_in_one_line(tmp_path):
  done = run_process([sys.executable, '-m', 'bw_jax.main', '--config=configs/smoke.py',
                      f'--workdir={tmp_path / "run"}'], env=broken_compiler(tmp_path), cwd=REPO, timeout=600)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert lines[-1].startswith('error: the CPU kernels do not build with ') and 'Compiling' not in done.stdout
