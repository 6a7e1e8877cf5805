"""The CPU kernels of BatchWhitening (`bw_jax/kernels`): the group products' values against float64 NumPy and
their derivatives of every order against the jnp reference; the Cholesky trials against NumPy's factor and
against the XLA path's fallback decisions; and what happens where the kernels cannot be built.

The layer-level tests (closed form against autodiff at 1e-10 for every method, degenerate batches) run in the
kernel layout wherever g is one of `group_products.KERNEL_GROUP_SIZES` (test_whitening_vjp.py).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bw_jax.nn import group_products as gp
from bw_jax.nn import kernels
from bw_jax.nn import whitening as bw
from bw_jax.nn import matrices as whitening_matrices
from subprocess_runs import run_process, subprocess_env

# Skipped only where the kernels are not used on purpose; where a compiler fails, every test here fails with
# its KernelBuildError (test_kernel_build.py).
if kernels.unavailable_reason():  # pragma: no cover - the machines the suite runs on have g++
  pytest.skip(f'the CPU kernels are not used here ({kernels.unavailable_reason()}); the layer uses XLA products, '
              'which the other tests cover', allow_module_level=True)

# (m, g, C): m not a multiple of the kernels' 4-row blocks, one and several row chunks, every g with its own
# code (vectors: 4, 8, 16, 32; unrolled: 6, 10, 12), and g = 3, 1 for the scalar loops.
CASES = [(37, 4, 8), (37, 8, 24), (3001, 16, 64), (513, 32, 64), (37, 6, 12), (37, 10, 20), (2003, 12, 24), (37, 3, 9),
         (37, 1, 5)]


def operands(m, channels, dtype, seed=0):
  rng = np.random.default_rng(seed)
  a, b = (rng.normal(size=(m, channels)) + 3.0 for _ in range(2))
  sa, sb, offset = (rng.normal(size=channels) for _ in range(3))
  return [np.asarray(v, dtype) for v in (a, sa, b, sb, offset)]


def np_cross(a, sa, b, sb, groups):
  """[a − sa]ᵀ[b − sb, 1] per group, float64."""
  da = (a - sa).astype(np.float64).reshape(len(a), groups, -1)
  db = (b - sb).astype(np.float64).reshape(len(b), groups, -1)
  return np.concatenate([np.einsum('mgi,mgj->gij', da, db), da.sum(0)[:, :, None]], axis=2)


def np_transform(a, sa, matrices, offset):
  groups = len(matrices)
  d = (a - sa).astype(np.float64).reshape(len(a), groups, -1)
  return np.einsum('mgj,gij->mgi', d, matrices.astype(np.float64)).reshape(a.shape) + offset


@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize('m, g, channels', CASES)
def test_kernels_compute_the_numpy_products(m, g, channels, dtype, tolerance):
  groups = channels // g
  a, sa, b, sb, offset = operands(m, channels, dtype)
  rng = np.random.default_rng(1)
  first, second = (np.asarray(rng.normal(size=(groups, g, g)), dtype) for _ in range(2))
  with jax.enable_x64(True):
    cross = kernels.group_cross(*map(jnp.asarray, (a, sa, b, sb)), groups)
    transform = kernels.group_transform(*map(jnp.asarray, (a, sa, first, offset)))
    transform2 = kernels.group_transform2(*map(jnp.asarray, (a, sa, first, b, sb, second, offset)))
  expected_cross = np_cross(a, sa, b, sb, groups)
  np.testing.assert_allclose(cross, expected_cross, rtol=tolerance, atol=tolerance * np.abs(expected_cross).max())
  for got, expected in ((transform, np_transform(a, sa, first, offset)),
                        (transform2, np_transform(a, sa, first, offset) + np_transform(b, sb, second, 0))):
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
  assert cross.dtype == transform.dtype == transform2.dtype == dtype


def test_kernel_results_do_not_depend_on_the_threads():
  # Partial cross products are summed in chunk order: repeated calls agree to the bit (runs stay deterministic).
  a, sa, b, sb, _ = operands(20000, 64, np.float32, seed=3)
  cross = jax.jit(lambda *args: kernels.group_cross(*args, 4))
  first = np.asarray(cross(a, sa, b, sb))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(cross(a, sa, b, sb)), first)


def test_derivatives_of_every_order_follow_the_reference():
  m, g, channels = 37, 4, 8
  with jax.enable_x64(True):
    a, sa, b, sb, offset = map(jnp.asarray, operands(m, channels, np.float64, seed=4))
    matrices = jnp.asarray(np.random.default_rng(5).normal(size=(2, g, g)))
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(m, channels)))

    def loss(products):
      def f(a, matrices):
        cross = products['cross'](a, sa, a, sb, 2)
        y = products['transform2'](a, sa, matrices, b, sb, matrices + cross[:, :, :g], offset)
        return jnp.sum(jnp.sin(weights * y)) + jnp.sum(cross ** 2) * 1e-3
      return f

    kernel = loss({'cross': kernels.group_cross, 'transform2': kernels.group_transform2})
    reference = loss({'cross': lambda *args: kernels.cross_reference(*args[:4], groups=args[4]),
                      'transform2': kernels.transform2_reference})
    for derivative in (jax.grad, lambda f: jax.grad(lambda *p: jnp.sum(jax.grad(f)(*p)[0] ** 2)),
                       lambda f: jax.jacfwd(jax.grad(f, argnums=1), argnums=1)):
      got, expected = derivative(kernel)(a, matrices), derivative(reference)(a, matrices)
      assert np.abs(np.asarray(expected)).max() > 1e-3
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(np.asarray(expected)).max())
    batched = jax.vmap(lambda a: kernels.group_transform(a, sa, matrices, offset))(jnp.stack([a, b]))
    np.testing.assert_allclose(batched[1], kernels.transform_reference(b, sa, matrices, offset), rtol=1e-12, atol=1e-12)


def test_mixed_or_unsupported_dtypes_name_what_the_kernels_take():
  a = jnp.ones((4, 8), jnp.float32)
  with pytest.raises(TypeError, match='float32 or float64 operands of one dtype'):
    kernels.group_transform(a.astype(jnp.bfloat16), a[0], jnp.ones((2, 4, 4)), a[0])


def test_the_cpu_picks_the_kernels_for_vectorised_group_sizes_and_xla_otherwise(monkeypatch):
  assert [gp.cpu_layout(c, g) for c, g in ((32, 16), (1152, 16), (24, 8), (24, 12), (40, 10), (27, 9), (240, 3),
                                           (128, 64))] == ['kernel'] * 5 + ['dense', 'batched', 'batched']
  monkeypatch.setattr(kernels, 'available', lambda: False)
  assert [gp.cpu_layout(c, 16) for c in (32, 64, 96, 1152)] == ['dense', 'dense', 'batched', 'batched']


def test_build_is_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
  path = kernels.build()
  built = path.stat().st_mtime_ns
  assert path.parent == tmp_path and path.suffix == '.so'
  assert kernels.build() == path and path.stat().st_mtime_ns == built, 'a cached build must not be compiled again'
  assert [p.name for p in tmp_path.iterdir()] == [path.name], 'no scratch files may be left behind'


def fallback_run(tmp_path, **env):
  """A fresh process whitening with BatchWhitening on the CPU, with `env` set; returns (stdout, stderr)."""
  script = ('import jax, jax.numpy as jnp, numpy as np\n'
            'from bw_jax.nn import group_products as gp, kernels, whitening as bw\n'
            'x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)\n'
            'y = bw.whiten(x, 16)\n'
            'cov = np.cov(np.asarray(y, np.float64).reshape(64, 2, 16)[:, 0].T)\n'
            'print(kernels.available(), gp.cpu_layout(32, 16), round(float(np.abs(cov - np.eye(16)).max()), 3))\n')
  environment = subprocess_env({kernels.CACHE_ENV: str(tmp_path / 'cache'), **env})
  result = run_process([sys.executable, '-c', script], env=environment, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip(), result.stderr


@pytest.mark.parametrize('env, says', [({kernels.DISABLE_ENV: '0'}, None),
                                       ({'CXX': '', 'PATH': '/nonexistent'}, 'no C++ compiler found')])
def test_without_the_kernels_the_layer_uses_xla_and_says_why(tmp_path, env, says):
  stdout, stderr = fallback_run(tmp_path, **env)
  available, layout, error = stdout.split()
  assert (available, layout) == ('False', 'dense')
  assert float(error) < 0.05, 'the XLA products must still whiten'
  warnings = [line for line in stderr.splitlines() if 'CPU group-product kernels are not available' in line]
  if says is None:  # switched off on purpose: nothing to warn about
    assert not warnings, stderr
  else:
    assert len(warnings) == 1 and says in warnings[0] and "XLA's batched products" in warnings[0], stderr


def test_export_refuses_the_kernels_and_works_with_them_switched_off(monkeypatch):
  # docs/design.md §5: jax.export needs BW_JAX_CPU_KERNELS=0 (its custom calls carry no compatibility promise).
  x = jnp.asarray(np.random.default_rng(7).normal(size=(64, 32)), jnp.float32)
  with pytest.raises(ValueError, match='custom calls whose targets have no compatibility guarantees'):
    jax.export.export(jax.jit(lambda x: bw.whiten(x, 16)), platforms=('cpu',))(x)
  monkeypatch.setattr(kernels, 'available', lambda: False)
  exported = jax.export.export(jax.jit(lambda x: bw.whiten(x, 16)), platforms=('cpu',))(x)
  assert 'BwGroup' not in exported.mlir_module() and 'BwCholesky' not in exported.mlir_module()
  np.testing.assert_allclose(exported.call(x), bw.whiten(x, 16), rtol=1e-4, atol=1e-4)


def test_the_kernel_layout_crosses_operands_with_and_without_ones_as_numpy():
  # group_products' 'kernel' layout returns (G, ka, kb) as the other layouts do: sums in the ones row and
  # column, m in the corner; operands of different samples and shifts take the separate row sum.
  m, g, channels = 37, 4, 8
  a, sa, b, sb, _ = operands(m, channels, np.float64, seed=8)
  blocks = lambda x, s: (x - s).reshape(m, -1, g)
  with_ones = lambda d: np.concatenate([d, np.ones((m, d.shape[1], 1))], axis=2)
  expected = {(False, False): (blocks(a, sa), blocks(b, sb)), (True, False): (with_ones(blocks(a, sa)), blocks(b, sb)),
              (False, True): (blocks(a, sa), with_ones(blocks(b, sb))),
              (True, True): (with_ones(blocks(a, sa)), with_ones(blocks(b, sb)))}
  with jax.enable_x64(True):
    for (a_ones, b_ones), (da, db) in expected.items():
      left = gp.InPlace(jnp.asarray(a), jnp.asarray(sa), a_ones)
      right = gp.InPlace(jnp.asarray(b), jnp.asarray(sb), b_ones)
      got = gp.cross_in_layout(left, right, g, 'kernel', jnp.float64)
      np.testing.assert_allclose(got, np.einsum('mgi,mgj->gij', da, db), rtol=1e-12, atol=1e-10,
                                 err_msg=f'ones: a {a_ones}, b {b_ones}')
    same = gp.InPlace(jnp.asarray(a), jnp.asarray(sa), True)  # the moments' [d, 1]ᵀ[d, 1]
    np.testing.assert_allclose(gp.cross_in_layout(same, same, g, 'kernel', jnp.float64),
                               np.einsum('mgi,mgj->gij', with_ones(blocks(a, sa)), with_ones(blocks(a, sa))),
                               rtol=1e-12, atol=1e-10)


def well_conditioned(batch, g, seed=0):
  """(batch, g, g) sample covariances of 4g + 4 samples (condition numbers ~10)."""
  a = np.random.default_rng(seed).normal(size=(batch, g, 4 * g + 4))
  return a @ a.transpose(0, 2, 1) / a.shape[-1]


def inverse_factor(cov, ridge):
  """L⁻¹ of cov + ridge·I per matrix, float64 NumPy."""
  eye = np.eye(cov.shape[-1])
  return np.stack([np.linalg.inv(np.linalg.cholesky(c + r * eye)) for c, r in zip(cov.astype(np.float64), ridge)])


@pytest.mark.parametrize('dtype, tolerance', [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize('batch, g', [(144, 16), (5, 3), (17, 8), (3, 1), (20, 32), (16, 12), (33, 6)])
def test_cholesky_trials_invert_numpys_factor(batch, g, dtype, tolerance):
  # Batches that fill the kernel's 16 lanes, leave some empty, and cross into a second block of lanes.
  cov = well_conditioned(batch, g).astype(dtype)
  exact = np.full(batch, 1e-3, dtype)
  with jax.enable_x64(True):
    s, exact_ok, relative_ok = kernels.cholesky_trials(jnp.asarray(cov), jnp.asarray(exact), jnp.asarray(2 * exact))
    stacked = (jnp.stack([v, v[::-1]]) for v in map(jnp.asarray, (cov, exact, exact)))
    batched = jax.vmap(kernels.cholesky_trials)(*stacked)  # one kernel call per element
  assert s.dtype == dtype and np.all(exact_ok) and np.all(relative_ok)
  expected = inverse_factor(cov, exact)
  np.testing.assert_allclose(s, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
  assert not np.any(np.triu(np.asarray(s), 1)), 'S = L⁻¹ is lower-triangular'
  np.testing.assert_array_equal(batched[0][1], s[::-1])


def covariances_at_every_fallback(batch=20, g=8, seed=5):
  """(batch, g, g) float64: healthy groups; groups where ε = 1e-5 drowns in round-off and only the relative ridge
  factorises: rank-2 at scale 1e12 (3, 9, 17: both lane blocks) and one whose second pivot is positive in any
  implementation but below its round-off floor (5: 2.4e-4 = two ulps of 1e12; without the floor its S would
  pass the norm test); a NaN group (11), that nothing saves."""
  cov = well_conditioned(batch, g, seed)
  rng = np.random.default_rng(seed + 1)
  for i in (3, 9, 17):
    v = rng.normal(size=(g, 2))
    cov[i] = 1e12 * v @ v.T
  cov[5] = 1e12 * np.eye(g)
  cov[5, :2, :2] = [[1e12, 1e12], [1e12, 1e12 + 2 * np.spacing(1e12)]]
  cov[11] = np.nan
  return cov


def test_cholesky_trials_retry_with_the_relative_ridge_as_the_xla_path_decides(monkeypatch):
  cov = covariances_at_every_fallback()
  g = cov.shape[-1]
  exact = np.full(len(cov), 1e-5)
  relative = 1e-5 + whitening_matrices.FALLBACK_RIDGE * np.trace(cov, axis1=1, axis2=2) / g
  with jax.enable_x64(True):
    s, exact_ok, relative_ok = map(np.asarray, kernels.cholesky_trials(*map(jnp.asarray, (cov, exact, relative))))
    expected_fell_back = np.isin(np.arange(len(cov)), (3, 5, 9, 11, 17))
    np.testing.assert_array_equal(exact_ok, ~expected_fell_back)
    np.testing.assert_array_equal(relative_ok, np.arange(len(cov)) != 11)
    healthy, retried = ~expected_fell_back, np.isin(np.arange(len(cov)), (3, 5, 9, 17))
    np.testing.assert_allclose(s[healthy], inverse_factor(cov[healthy], exact[healthy]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s[retried], inverse_factor(cov[retried], relative[retried]), rtol=1e-9, atol=1e-15)

    # The layer's S, fallbacks and derivative are the XLA path's (LAPACK and the same pivot floor).
    weights = jnp.asarray(np.random.default_rng(9).normal(size=cov.shape))
    def whitening_and_gradient():
      fn = jax.jit(lambda c: whitening_matrices.whitening_matrix_with_fallbacks(c, 'cholesky', 1e-5,
                                                                                accelerator_form=False))
      grad = jax.jit(jax.grad(lambda c: jnp.sum(whitening_matrices.whitening_matrix_with_fallbacks(
          c, 'cholesky', 1e-5, accelerator_form=False)[0] * weights)))
      healthy_cov = np.where(np.isnan(cov), np.eye(g), cov)  # a finite derivative needs a finite input
      return (*fn(jnp.asarray(cov)), grad(jnp.asarray(healthy_cov)))
    with_kernel = whitening_and_gradient()
    monkeypatch.setattr(whitening_matrices, 'cholesky_kernel_applies', lambda group_size: False)
    with_lapack = whitening_and_gradient()
  np.testing.assert_array_equal(with_kernel[1], expected_fell_back)
  np.testing.assert_array_equal(with_kernel[1], with_lapack[1])
  for got, expected in ((with_kernel[0], with_lapack[0]), (with_kernel[2], with_lapack[2])):
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.nanmax(np.abs(np.asarray(expected))))
