"""BatchWhitening against float64 NumPy references of docs/design.md §1–2."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from bw_jax.nn import vjp
from bw_jax.nn import whitening as bw

METHODS = bw.METHODS
EXACT_METHODS = ('cholesky', 'zca', 'pca')


def correlated(seed: int, shape: tuple[int, ...], scale: float = 1.0, offset: float = 0.5) -> np.ndarray:
  """Samples with a random dense covariance and non-zero mean, channels last."""
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  mixing = rng.normal(size=(channels, channels)) + 2.0 * np.eye(channels)
  z = rng.normal(size=(int(np.prod(shape[:-1])), channels))
  return (scale * (z @ mixing + offset * rng.normal(size=channels))).reshape(shape)


# float64 NumPy references --------------------------------------------------------------------------------


def np_moments(x: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
  samples = x.reshape(-1, x.shape[-1]).astype(np.float64)
  mean = samples.mean(0)
  c = samples - mean
  groups = samples.shape[1] // g
  cov = np.stack([c[:, k * g:(k + 1) * g].T @ c[:, k * g:(k + 1) * g] for k in range(groups)])
  return mean, cov / (samples.shape[0] - 1)


def np_whitening(cov: np.ndarray, method: str, eps: float, newton_iterations: int = 5) -> np.ndarray:
  """S of the seed for each group: L⁻¹, UΛ^{-1/2}Uᵀ or Λ^{-1/2}Uᵀ of Σ + εI, or IterNorm's T Newton–Schulz
  steps on (Σ + εI)/tr in their coupled form (docs/design.md §1.3)."""
  out = []
  for c in cov + eps * np.eye(cov.shape[-1]):
    if method == 'cholesky':
      out.append(np.linalg.inv(np.linalg.cholesky(c)))
    elif method == 'newton':
      trace, eye = np.trace(c), np.eye(len(c))
      y, z = c / trace, eye
      for _ in range(newton_iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
      out.append(z / np.sqrt(trace))
    else:
      w, u = np.linalg.eigh(c)
      out.append(u @ np.diag(w ** -0.5) @ u.T if method == 'zca' else np.diag(w ** -0.5) @ u.T)
  return np.stack(out)


def match_row_signs(s: np.ndarray, like: np.ndarray) -> np.ndarray:
  """PCA's S is defined up to the sign of each row (eigenvector): flip rows of `s` to agree with `like`."""
  return s * np.sign(np.sum(s * np.asarray(like), axis=-1, keepdims=True))


def np_apply(x: np.ndarray, mean: np.ndarray, s: np.ndarray) -> np.ndarray:
  groups, g, _ = s.shape
  c = (x.reshape(-1, x.shape[-1]) - mean).reshape(-1, groups, g)
  return np.einsum('mgj,gij->mgi', c, s).reshape(x.shape)


def group_covariances(y: np.ndarray, g: int) -> np.ndarray:
  return np_moments(np.asarray(y, np.float64), g)[1]


def train_apply(module, variables, x):
  return module.apply(variables, x, use_running_average=False, mutable=['batch_stats', bw.HEALTH_COLLECTION])


# Math of one training step -------------------------------------------------------------------------------


@pytest.mark.parametrize('method', EXACT_METHODS)
def test_training_output_is_white_float64(method):
  x = correlated(0, (256, 4, 4, 16))  # m = 4096 samples ≫ g = 8
  with jax.enable_x64(True):
    y = bw.whiten(jnp.asarray(x), group_size=8, method=method, epsilon=1e-5)
    assert y.dtype == jnp.float64
  # Exactly, cov(y) = S Σ Sᵀ = I − ε S Sᵀ: off by ε/λ_min ≈ 1e-5 here.
  np.testing.assert_allclose(group_covariances(y, 8), np.broadcast_to(np.eye(8), (2, 8, 8)), atol=1e-3)


@pytest.mark.parametrize('method', EXACT_METHODS)
def test_training_output_is_white_float32(method):
  # float32 moments over 4096 samples carry ~1e-6 relative error and the factorisation of a matrix with
  # condition number ~1e2 loses two more digits: 1e-3 still leaves a margin of ~10×.
  x = correlated(1, (256, 4, 4, 16)).astype(np.float32)
  y = bw.whiten(jnp.asarray(x), group_size=8, method=method, epsilon=1e-5)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(group_covariances(y, 8), np.broadcast_to(np.eye(8), (2, 8, 8)), atol=1e-3)


@pytest.mark.parametrize('method', EXACT_METHODS)
def test_output_equals_numpy_seed_formula(method):
  x = correlated(2, (64, 3, 3, 12))
  eps = 1e-3
  mean, cov = np_moments(x, 4)
  s = np_whitening(cov, method, eps)
  with jax.enable_x64(True):
    j_mean, j_cov = bw.batch_moments(jnp.asarray(x), 4)
    j_s = bw.whitening_matrix(j_cov, method, eps)
    y = bw.whiten(jnp.asarray(x), 4, method, eps)
  np.testing.assert_allclose(j_mean, mean, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(j_cov, cov, rtol=1e-12, atol=1e-12)
  s = match_row_signs(s, j_s) if method == 'pca' else s
  np.testing.assert_allclose(j_s, s, atol=1e-9)
  np.testing.assert_allclose(y, np_apply(x, mean, s), atol=1e-9)
  if method == 'cholesky':
    assert np.allclose(np.triu(j_s, 1), 0.0), 'L⁻¹ must be lower-triangular'
  if method == 'zca':
    np.testing.assert_allclose(j_s, np.swapaxes(j_s, -1, -2), atol=1e-12)


@pytest.mark.parametrize('channels', [bw.DENSE_MAX_CHANNELS, bw.DENSE_MAX_CHANNELS + 8])
def test_dense_and_batched_group_products_match_numpy(channels):
  # Up to DENSE_MAX_CHANNELS the group products run as one block-diagonal matmul, above as G batched ones.
  x = correlated(7, (40, channels)).astype(np.float32)
  mean, cov = np_moments(x, 8)
  s = np.random.default_rng(8).normal(size=(channels // 8, 8, 8))
  j_mean, j_cov = bw.batch_moments(jnp.asarray(x), 8)
  np.testing.assert_allclose(j_cov, cov, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(bw.apply_whitening(jnp.asarray(x), j_mean, jnp.asarray(s, jnp.float32)),
                             np_apply(x, mean, s), rtol=1e-4, atol=1e-3)


def test_pca_and_zca_differ_by_an_orthogonal_matrix():
  x = correlated(3, (512, 6))
  with jax.enable_x64(True):
    y_zca = np.asarray(bw.whiten(jnp.asarray(x), None, 'zca'))
    y_pca = np.asarray(bw.whiten(jnp.asarray(x), None, 'pca'))
  rotation, *_ = np.linalg.lstsq(y_pca, y_zca, rcond=None)
  np.testing.assert_allclose(y_pca @ rotation, y_zca, atol=1e-9)
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(6), atol=1e-6)
  assert not np.allclose(rotation, np.eye(6), atol=1e-2), 'PCA should rotate away from ZCA'


def test_newton_converges_to_zca():
  x = correlated(4, (512, 8))
  with jax.enable_x64(True):
    _, cov = bw.batch_moments(jnp.asarray(x), None)
    zca = np.asarray(bw.whitening_matrix(cov, 'zca', 1e-5))
    errors = [np.abs(np.asarray(bw.whitening_matrix(cov, 'newton', 1e-5, t)) - zca).max()
              for t in (1, 3, 5, 10, 20, 40)]
  # Monotone until it reaches float64 round-off, where it stays (the uncoupled IterNorm recursion would
  # instead blow the round-off up again on this condition number).
  assert all(b < a or b < 1e-12 for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-12 * np.abs(zca).max() and errors[2] > 1e-2, errors


def test_group_whitening_equals_per_slice_whitening():
  x = jnp.asarray(correlated(5, (32, 4, 4, 12)).astype(np.float32))
  grouped = bw.whiten(x, group_size=4)
  for k in range(3):
    np.testing.assert_allclose(grouped[..., 4 * k:4 * k + 4], bw.whiten(x[..., 4 * k:4 * k + 4], None),
                               atol=2e-5)


def test_axis_name_moments_use_shifted_single_pass_formula():
  x = correlated(6, (64, 6), offset=50.0).astype(np.float32)
  mean, cov = np_moments(x, 3)
  j_mean, j_cov = jax.vmap(lambda v: bw.batch_moments(v, 3, axis_name='d', shift=jnp.asarray(mean)),
                           axis_name='d', out_axes=None)(jnp.asarray(x).reshape(4, 16, 6))
  np.testing.assert_allclose(j_mean, mean, rtol=1e-5)
  np.testing.assert_allclose(j_cov, cov, rtol=1e-4, atol=1e-4)


# The module: running statistics --------------------------------------------------------------------------


@pytest.mark.parametrize('method', EXACT_METHODS)
def test_running_statistics_are_hand_computed_ema(method):
  momentum, eps, g = 0.8, 1e-3, 4
  module = bw.BatchWhitening(group_size=g, momentum=momentum, epsilon=eps, method=method)
  batches = [correlated(10 + k, (16, 2, 2, 8)).astype(np.float32) for k in range(3)]
  variables = module.init(jax.random.key(0), jnp.asarray(batches[0]), use_running_average=False)
  init_stats = variables['batch_stats']
  np.testing.assert_array_equal(init_stats['mean'], np.zeros(8))
  np.testing.assert_array_equal(init_stats['cov'], np.broadcast_to(np.eye(4), (2, 4, 4)))
  np.testing.assert_array_equal(init_stats['whitening'], np.broadcast_to(np.eye(4), (2, 4, 4)))

  mean, cov = np.zeros(8), np.broadcast_to(np.eye(4), (2, 4, 4))
  step = jax.jit(lambda v, x: train_apply(module, v, x))
  for x in batches:
    stored = np.asarray(variables['batch_stats']['whitening'])  # PCA's row signs follow the stored S
    y, updates = step(variables, x)
    variables = {**variables, **updates}
    batch_mean, batch_cov = np_moments(x, g)
    mean = momentum * mean + (1 - momentum) * batch_mean
    cov = momentum * cov + (1 - momentum) * batch_cov
    np.testing.assert_allclose(y, np_apply(x, batch_mean, match_row_signs(np_whitening(batch_cov, method, eps),
                                                                          stored)),
                               atol=2e-4, err_msg='a batch-mode training step whitens with batch moments')
  stats = variables['batch_stats']
  np.testing.assert_allclose(stats['mean'], mean, atol=1e-5)
  np.testing.assert_allclose(stats['cov'], cov, atol=1e-5)
  np.testing.assert_allclose(stats['whitening'],
                             match_row_signs(np_whitening(cov, method, eps), stats['whitening']), atol=1e-4)
  assert variables['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 0.0}

  x_eval = correlated(20, (5, 2, 2, 8)).astype(np.float32)
  y_eval = module.apply(variables, x_eval, use_running_average=True)
  np.testing.assert_allclose(y_eval, np_apply(x_eval, stats['mean'], np.asarray(stats['whitening'])),
                             atol=1e-5)


@pytest.mark.parametrize('center_with, whiten_with', [('running', 'running'), ('running', 'batch'),
                                                     ('batch', 'running')])
def test_running_modes_use_the_updated_running_statistics(center_with, whiten_with):
  momentum, eps = 0.8, 1e-3
  module = bw.BatchWhitening(group_size=4, momentum=momentum, epsilon=eps, center_with=center_with,
                             whiten_with=whiten_with, use_scale=False, use_bias=False)
  warm_up, x = (correlated(k, (32, 8)).astype(np.float32) for k in (29, 30))
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  variables = {**variables, **train_apply(module, variables, warm_up)[1]}  # running stats away from (0, I)
  old_mean, old_cov = np_moments(warm_up, 4)
  old_mean, old_cov = (1 - momentum) * old_mean, momentum * np.eye(4) + (1 - momentum) * old_cov
  y, updates = train_apply(module, variables, x)
  batch_mean, batch_cov = np_moments(x, 4)
  mean = momentum * old_mean + (1 - momentum) * batch_mean
  cov = momentum * old_cov + (1 - momentum) * batch_cov
  used_mean = mean if center_with == 'running' else batch_mean
  used_cov = cov if whiten_with == 'running' else batch_cov
  np.testing.assert_allclose(y, np_apply(x, used_mean, np_whitening(used_cov, 'cholesky', eps)), atol=1e-4)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], mean, atol=1e-5)
  np.testing.assert_allclose(stats['cov'], cov, atol=1e-5)
  np.testing.assert_allclose(stats['whitening'], np_whitening(cov, 'cholesky', eps), atol=1e-4)


def test_pca_eval_channels_keep_the_signs_of_training_channels():
  # PCA rows are eigenvectors up to sign; without alignment eval flipped some channels against training.
  module = bw.BatchWhitening(group_size=8, method='pca', momentum=0.8, use_scale=False, use_bias=False)
  mixing = np.random.default_rng(0).normal(size=(8, 8)) + 2 * np.eye(8)
  batches = [(np.random.default_rng(k).normal(size=(64, 8)) @ mixing).astype(np.float32) for k in range(30)]
  variables = module.init(jax.random.key(0), batches[0], use_running_average=False)
  step = jax.jit(lambda v, x: train_apply(module, v, x))
  for x in batches:
    y, updates = step(variables, x)
    variables = {**variables, **updates}
  y_eval = module.apply(variables, batches[-1], use_running_average=True)
  correlations = [np.corrcoef(y[:, c], y_eval[:, c])[0, 1] for c in range(8)]
  assert min(correlations) > 0.9, correlations


def test_init_in_training_mode_changes_no_statistic():
  module = bw.BatchWhitening(group_size=2)
  x = correlated(31, (8, 6)).astype(np.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  stats = variables['batch_stats']
  np.testing.assert_array_equal(stats['mean'], np.zeros(6))
  np.testing.assert_array_equal(stats['cov'], np.broadcast_to(np.eye(2), (3, 2, 2)))
  np.testing.assert_array_equal(stats['whitening'], np.broadcast_to(np.eye(2), (3, 2, 2)))
  assert set(variables) == {'params', 'batch_stats'}  # the counters only when asked for
  counters = bw.BatchWhitening(group_size=2, track_health=True).init(jax.random.key(0), x,
                                                                      use_running_average=False)['bw_health']
  assert counters == {'fallbacks': 0.0, 'skipped_updates': 0.0}


def test_affine_scale_and_bias_apply_per_channel_after_whitening():
  module = bw.BatchWhitening(group_size=3)
  x = correlated(32, (16, 6)).astype(np.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  gamma, beta = np.arange(1.0, 7.0, dtype=np.float32), np.linspace(-1, 1, 6, dtype=np.float32)
  variables = {**variables, 'params': {'scale': gamma, 'bias': beta}}
  y, _ = train_apply(module, variables, x)
  np.testing.assert_allclose(y, gamma * np.asarray(bw.whiten(x, 3)) + beta, atol=1e-5)


def test_eager_calls_run_one_compiled_program_per_shape_with_the_traced_layer_s_results():
  """Called eagerly, the layer and `whiten` run one compiled program per shape and settings (not ~100
  dispatched operations), with the results of the same call traced into a jitted function; the autodiff
  switch of `autodiff_backward()` is part of the program's key."""
  module = bw.BatchWhitening(group_size=3, momentum=0.5)
  x = correlated(34, (16, 6)).astype(np.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  compiled = vjp._compiled_whiten_training
  compiled.clear_cache()
  eager = [train_apply(module, variables, x + shift) for shift in (0.0, 1.0)]  # one shape, twice
  assert compiled._cache_size() == 1
  for shift, (y, updates) in zip((0.0, 1.0), eager):
    y_jit, updates_jit = jax.jit(lambda v, x: train_apply(module, v, x))(variables, x + shift)
    np.testing.assert_allclose(y, y_jit, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_jit)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with bw.autodiff_backward():
    train_apply(module, variables, x)
  assert compiled._cache_size() == 2
  np.testing.assert_allclose(bw.whiten(x, 3), jax.jit(lambda x: bw.whiten(x, 3))(x), rtol=1e-6, atol=1e-6)
  bw.whiten(x + 1.0, 3)
  assert compiled._cache_size() == 3  # whiten's settings: one more program


def test_eval_runs_no_factorisation():
  module = bw.BatchWhitening(group_size=4, method='zca')
  x = jnp.ones((2, 8))
  variables = module.init(jax.random.key(0), correlated(33, (16, 8)).astype(np.float32),
                          use_running_average=False)
  jaxpr = str(jax.make_jaxpr(lambda v, x: module.apply(v, x, use_running_average=True))(variables, x))
  train = str(jax.make_jaxpr(lambda v, x: train_apply(module, v, x))(variables, x))
  assert 'eigh' in train
  assert all(op not in jaxpr for op in ('eigh', 'cholesky', 'triangular_solve')), jaxpr


def test_bfloat16_input_gives_bfloat16_output_and_float32_statistics():
  module = bw.BatchWhitening(group_size=4, use_scale=False, use_bias=False)
  x = correlated(34, (64, 2, 2, 8)).astype(np.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  y16, updates16 = train_apply(module, variables, jnp.asarray(x, jnp.bfloat16))
  y32, updates32 = train_apply(module, variables, x)
  assert y16.dtype == jnp.bfloat16
  assert {updates16['batch_stats'][k].dtype for k in ('mean', 'cov', 'whitening')} == {jnp.dtype('float32')}
  # bf16 input rounding (2⁻⁸ relative) is the only difference: outputs agree to bf16 precision.
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)
  np.testing.assert_allclose(updates16['batch_stats']['cov'], updates32['batch_stats']['cov'], rtol=0.02,
                             atol=0.02)


# Gradients -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # Finite differences of every method and source in float64: ~25 CPU-s in all.
@pytest.mark.parametrize('source', bw.STAT_SOURCES)
@pytest.mark.parametrize('method', METHODS)
def test_gradients_match_finite_differences_float64(method, source):
  module = bw.BatchWhitening(group_size=3, method=method, momentum=0.6, epsilon=1e-2,
                             center_with=source, whiten_with=source)
  x = correlated(40, (10, 6))
  with jax.enable_x64(True):
    variables = module.init(jax.random.key(0), jnp.asarray(x), use_running_average=False)
    # Start from non-trivial running statistics, so that 'running' mode mixes old and batch moments.
    variables = {**variables, **train_apply(module, variables, jnp.asarray(correlated(41, (10, 6))))[1]}
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(10, 6)))
    loss = lambda x: jnp.sum(weights * train_apply(module, variables, x)[0])
    check_grads(loss, (jnp.asarray(x),), order=1, modes=('rev',), eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # Second order in float64.
def test_cholesky_second_derivative_matches_autodiff_through_the_factorisation():
  # The Cholesky gradient is written by hand from S alone; it must differentiate again (Hessian-vector
  # products, gradient penalties). Reference: autodiff through jnp.linalg.cholesky + solve_triangular.
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    _, cov = bw.batch_moments(jnp.asarray(correlated(43, (64, 4))), None)
    weights, direction = (jnp.asarray(rng.normal(size=(1, 4, 4))) for _ in range(2))
    direction = direction + jnp.swapaxes(direction, -1, -2)
    ours = lambda c: jnp.sum(weights * bw.whitening_matrix(c, 'cholesky', 1e-5))
    reference = lambda c: jnp.sum(weights * bw.cholesky_whitening(c + 1e-5 * jnp.eye(4)))
    second = lambda f: jax.jvp(lambda c: jax.jvp(f, (c,), (direction,))[1], (cov,), (direction,))[1]
    assert abs(float(second(reference))) > 1e-3
    np.testing.assert_allclose(second(ours), second(reference), rtol=1e-9)


@pytest.mark.parametrize('method', ('zca', 'pca'))
def test_gradients_are_finite_for_repeated_eigenvalues(method):
  # Two constant channels: Σ + εI has the eigenvalue ε twice, where the textbook eigh derivative is inf.
  x = correlated(42, (16, 4)).astype(np.float32)
  x[:, 2:] = 3.0
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(bw.whiten(x, None, method))))(jnp.asarray(x))
  assert np.all(np.isfinite(grad))


def test_zca_gradient_at_repeated_eigenvalues_matches_finite_differences():
  # Exactly repeated eigenvalues (isotropic data) exercise the divided-difference limit −½λ^{-3/2}.
  with jax.enable_x64(True):
    cov = jnp.asarray(np.diag([2.0, 2.0, 5.0]))
    direction = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    direction = direction + direction.T
    _, tangent = jax.jvp(lambda c: bw.zca_whitening(c[None])[0], (cov,), (direction,))
    h = 1e-6
    numeric = (bw.zca_whitening((cov + h * direction)[None]) - bw.zca_whitening((cov - h * direction)[None]))
    np.testing.assert_allclose(tangent, numeric[0] / (2 * h), atol=1e-6)


# Degenerate batches --------------------------------------------------------------------------------------


def degenerate_batches() -> dict[str, np.ndarray]:
  x = correlated(50, (12, 2, 2, 8)).astype(np.float32)
  duplicated = x.copy()
  duplicated[..., 1] = duplicated[..., 0]
  constant = x.copy()
  constant[..., 4:] = 7.0
  return {
      'fewer_samples_than_group': correlated(51, (3, 8)).astype(np.float32),
      'duplicated_channels': duplicated,
      'constant_channels': constant,
      'scale_1e6': x * 1e6,
      'scale_1e-6': x * 1e-6,
      'duplicated_at_scale_1e6': duplicated * 1e6,
      'all_zero': np.zeros_like(x),
  }


def np_training_step(x: np.ndarray, method: str, eps: float, momentum: float) -> tuple[np.ndarray, ...]:
  """float64 NumPy of a first training step from (0, I) on (m, C) samples in one group, where Σ + εI needs
  no fallback: y, and the running mean, cov and whitening it leaves (PCA's rows signed as the stored S = I)."""
  aligned = lambda s: match_row_signs(s, np.broadcast_to(np.eye(s.shape[-1]), s.shape)) if method == 'pca' else s
  mean, cov = np_moments(x, x.shape[-1])
  running_cov = momentum * np.eye(x.shape[-1]) + (1 - momentum) * cov
  return (np_apply(x, mean, aligned(np_whitening(cov, method, eps))), (1 - momentum) * mean, running_cov,
          aligned(np_whitening(running_cov, method, eps)))


# Known answers: an all-zero batch is whitened to 0 (x − μ = 0) with a zero gradient, and a batch scaled by
# 1e6 to what its unscaled self is whitened to (S(s²Σ + εI)·s = S(Σ + ε/s²·I): the ridge shrinks to 1e-17)
# and by 1e-6 to what ε then dominates; none needs a fallback.
KNOWN_ANSWERS = {'all_zero': None, 'scale_1e6': 1e-6, 'scale_1e-6': None}


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('case', list(degenerate_batches()))
def test_degenerate_batches_give_finite_outputs_stats_and_gradients(method, case):
  x = jnp.asarray(degenerate_batches()[case])
  eps, momentum = 1e-5, 0.9
  module = bw.BatchWhitening(group_size=8, method=method, momentum=momentum, epsilon=eps)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  y, updates = train_apply(module, variables, x)
  grad = jax.grad(lambda x: jnp.sum(jnp.tanh(train_apply(module, variables, x)[0])))(x)
  assert np.all(np.isfinite(y)), f'{case}: non-finite output'
  assert np.all(np.isfinite(grad)), f'{case}: non-finite gradient'
  for name, value in updates['batch_stats'].items():
    assert np.all(np.isfinite(value)), f'{case}: non-finite running {name}'
  y_eval = module.apply({**variables, **updates}, x, use_running_average=True)
  assert np.all(np.isfinite(y_eval)), f'{case}: non-finite eval output'
  if case not in KNOWN_ANSWERS:
    return
  assert updates['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 0.0}
  x64 = np.asarray(x, np.float64).reshape(-1, 8)
  y_ref, mean, (cov,), (whitening,) = np_training_step(x64, method, eps, momentum)  # one group
  # PCA's eigenvectors of a nearly isotropic Σ + εI (ε dominates at scale 1e-6) are not determined in float32:
  # there, compare what every whitening S has in common, SᵀS = (Σ + εI)⁻¹, so the Gram matrix of y.
  gram = (lambda a: a @ a.T) if method == 'pca' else (lambda a: a)
  close = lambda got, expected, what, tolerance=1e-4: np.testing.assert_allclose(
      gram(np.asarray(got, np.float64).reshape(expected.shape)), gram(expected),
      atol=tolerance * max(np.abs(gram(expected)).max(), 1e-30), err_msg=f'{case}: {what}')
  close(y, y_ref, 'y')
  if KNOWN_ANSWERS[case] is not None:  # the unscaled batch, whitened with the ridge scaled as its covariance
    close(y, np_training_step(x64 * KNOWN_ANSWERS[case], method, eps * KNOWN_ANSWERS[case] ** 2, momentum)[0],
          'y against the unscaled batch')
  stats = updates['batch_stats']
  # float32 sums of m samples lose ~m·2⁻²⁴ of the samples' size |x| (the mean), of |x|² (the covariance).
  size = np.abs(x64).max()
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5, atol=1e-6 * size)
  np.testing.assert_allclose(stats['cov'][0], cov, rtol=1e-5, atol=1e-6 * size ** 2)
  # PCA's SᵀS = (cov + εI)⁻¹ carries float32 eigh's error times the condition number (~2e-4 at scale 1e6).
  close(np.asarray(stats['whitening'][0]).T, whitening.T, 'running whitening', 1e-3)
  close(y_eval, (x64 - mean) @ whitening.T, 'eval output', 1e-3)  # the running S's error, as above
  if case == 'all_zero':
    assert not np.any(np.asarray(y)) and not np.any(np.asarray(y_eval)), 'x − μ = 0 must whiten to exactly 0'
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)  # Σ_i y_i = S Σ_i (x_i − μ) ≡ 0 whatever S: no gradient


def test_rank_deficient_group_at_large_scale_falls_back_and_is_counted():
  x = jnp.asarray(degenerate_batches()['duplicated_at_scale_1e6'])
  module = bw.BatchWhitening(group_size=8, method='cholesky')
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  y, updates = train_apply(module, variables, x)
  assert updates['bw_health']['fallbacks'] >= 1
  # Fallback (relative ridge) still whitens: unit variance on the independent directions, none is blown up.
  variances = np.var(np.asarray(y).reshape(-1, 8), axis=0, ddof=1)
  assert np.all(variances < 1.01) and np.median(variances) > 0.9, variances


def test_diagonal_fallback_standardises_channels():
  cov = jnp.asarray(np.full((1, 3, 3), np.nan, np.float32))
  s, fell_back = bw.whitening_matrix_with_fallbacks(jnp.where(jnp.eye(3) > 0, 4.0, cov), 'cholesky', 1e-5)
  assert bool(fell_back[0])
  np.testing.assert_allclose(s[0], np.eye(3) / np.sqrt(4.0 + 1e-5 + bw.FALLBACK_RIDGE * 4.0), rtol=1e-6)


def test_non_finite_batch_never_enters_running_statistics():
  module = bw.BatchWhitening(group_size=4)
  x = correlated(52, (16, 8)).astype(np.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  variables = {**variables, **train_apply(module, variables, x)[1]}
  bad = x.copy()
  bad[3, 5] = np.nan
  _, updates = train_apply(module, variables, bad)
  for name in ('mean', 'cov', 'whitening'):
    np.testing.assert_array_equal(updates['batch_stats'][name], variables['batch_stats'][name], err_msg=name)
  assert updates['bw_health'] == {'fallbacks': 0.0, 'skipped_updates': 1.0}


# Bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='svd'), "method='svd' is not supported; choose one of 'cholesky', 'zca', 'pca', 'newton'"),
    (dict(center_with='global'), "center_with='global' is not supported; choose one of 'batch', 'running'"),
    (dict(whiten_with='ema'), "whiten_with='ema' is not supported"),
    (dict(group_size=0), 'group_size must be a positive int or None'),
    (dict(group_size=True), 'group_size must be a positive int or None'),
    (dict(group_size=4.0), 'group_size must be a positive int or None'),
    (dict(newton_iterations=0), 'newton_iterations must be a positive int'),
    (dict(momentum=1.5), 'momentum must lie in [0, 1]'),
    (dict(epsilon=0.0), 'epsilon must be > 0'),
])
def test_bad_settings_are_rejected_at_construction(kwargs, message):
  with pytest.raises(ValueError) as error:
    bw.BatchWhitening(**kwargs)
  assert message in str(error.value)


@pytest.mark.parametrize('shape, kwargs, message', [
    ((8, 6), dict(group_size=4), 'group_size=4 does not divide the 6 input channels'),
    ((6,), {}, 'expects (N, ..., C)'),
])
def test_bad_input_is_rejected_before_computing(shape, kwargs, message):
  with pytest.raises(ValueError) as error:
    bw.BatchWhitening(**kwargs).init(jax.random.key(0), jnp.ones(shape), use_running_average=False)
  assert message in str(error.value)


@pytest.mark.parametrize('channels, group_size, expected', [(32, 16, 16), (40, 16, 10), (1152, 64, 64),
                                                            (672, 64, 56), (24, None, 24), (7, 16, 7)])
def test_fit_group_size_is_the_largest_divisor_not_above(channels, group_size, expected):
  assert bw.fit_group_size(channels, group_size) == expected


def test_init_with_axis_name_works_outside_the_mapped_axis():
  # Flax's pattern: init outside shard_map/pmap with axis_name baked into the layer, as BatchNorm allows.
  x = jnp.asarray(correlated(60, (16, 8)).astype(np.float32))
  variables = bw.BatchWhitening(axis_name='data', group_size=4).init(jax.random.key(0), x,
                                                                     use_running_average=False)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(8))


def test_numpy_integer_group_size_is_accepted():
  x = jnp.asarray(correlated(61, (16, 8)).astype(np.float32))
  np.testing.assert_allclose(
      bw.BatchWhitening(group_size=np.int64(4), use_bias=False, use_scale=False).apply(
          {}, x, use_running_average=False, mutable=['batch_stats'])[0], bw.whiten(x, 4), atol=1e-6)
