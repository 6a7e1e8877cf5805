"""BatchWhitening lowered for GPU and TPU from this CPU host, and the accelerator form's results on the CPU.

On accelerators the fallback retry is always computed and selected (no conditional that could wait on its
predicate) and Newton's loop is unrolled; the CPU keeps `lax.cond` and the rolled loop. The lowered text
still holds `jax.lax.platform_dependent`'s switches on a constant platform index, which XLA folds; the
checks below fold them first (MLIR inline + canonicalize, then unused functions dropped) and then look for what
must not remain.
"""

import re

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir, passmanager
import numpy as np
import pytest

from bw_jax.nn import whitening as bw
from bw_jax.nn import matrices as whitening_matrices
from test_whitening import correlated, degenerate_batches

# The factorisations each platform must call (jax 0.10.2): cuSOLVER on cuda, XLA's own ops on TPU.
FACTORISATIONS = {
    ('cholesky', 'cuda'): ['custom_call @cusolver_potrf_ffi', 'stablehlo.triangular_solve'],
    ('cholesky', 'tpu'): ['stablehlo.cholesky', 'stablehlo.triangular_solve'],
    ('zca', 'cuda'): ['custom_call @cusolver_syevd_ffi'], ('zca', 'tpu'): ['custom_call @Eigh'],
    ('pca', 'cuda'): ['custom_call @cusolver_syevd_ffi'], ('pca', 'tpu'): ['custom_call @Eigh'],
    ('newton', 'cuda'): [], ('newton', 'tpu'): [],
}
CONDITIONALS = re.compile(r'stablehlo\.(case|if|while)|scf\.')


def folded_training_step_text(method: str, dtype, platform: str, channels: int = 80) -> str:
  """The StableHLO of jit(grad) of a BW training step lowered for `platform`, constant switches folded."""
  module = bw.BatchWhitening(group_size=16, method=method)
  x = jnp.ones((8, channels), dtype)
  variables = module.init(jax.random.key(0), x, use_running_average=False)

  def loss(params, x):
    y, updates = module.apply({**variables, 'params': params}, x, use_running_average=False,
                              mutable=['batch_stats'])
    return jnp.sum(jnp.square(y.astype(jnp.float32))), updates

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  lowered = step.trace(variables['params'], x).lower(lowering_platforms=(platform,))
  stablehlo = lowered.compiler_ir('stablehlo')
  with stablehlo.context:
    folded = ir.Module.parse(str(stablehlo))
    passmanager.PassManager.parse('builtin.module(inline,canonicalize,symbol-dce)').run(folded.operation)
  return str(folded)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('method', bw.METHODS)
def test_accelerator_lowering_has_no_conditional_callback_or_float64(method, platform, dtype):
  text = folded_training_step_text(method, dtype, platform)
  assert not CONDITIONALS.search(text), CONDITIONALS.search(text).group(0)
  assert 'callback' not in text.lower()
  assert 'f64' not in text
  for call in FACTORISATIONS[method, platform]:
    assert call in text, f'{call} missing from the {platform} lowering of {method}'


def test_cpu_lowering_keeps_the_conditional_retry_and_the_rolled_newton_loop(patch_layer):
  # The same check passes on accelerators only because the forms differ: on the CPU both remain.
  assert 'stablehlo.while' in folded_training_step_text('newton', jnp.float32, 'cpu')
  # Cholesky's two trials are one kernel call where the CPU kernels are built (the retry inside it), else
  # LAPACK's factorisation with the conditional retry.
  text = folded_training_step_text('cholesky', jnp.float32, 'cpu')
  if whitening_matrices.cholesky_kernel_applies(16):
    assert 'BwCholeskyTrialsF32' in text and 'stablehlo.case' not in text
  patch_layer(whitening_matrices, 'cholesky_kernel_applies', lambda group_size: False)
  text = folded_training_step_text('cholesky', jnp.float32, 'cpu')
  assert 'stablehlo.case' in text and 'BwCholeskyTrials' not in text


def covariances_needing_every_path() -> np.ndarray:
  """(G, 8, 8): a healthy group, one that needs the relative-ridge retry, and one only the diagonal saves."""
  _, healthy = bw.batch_moments(jnp.asarray(correlated(80, (64, 8))), None)
  _, retry = bw.batch_moments(jnp.asarray(degenerate_batches()['duplicated_at_scale_1e6'], jnp.float64), None)
  broken = np.where(np.eye(8) > 0, 4.0, np.nan)
  return np.stack([np.asarray(healthy)[0], np.asarray(retry)[0], broken])


@pytest.mark.parametrize('method', bw.METHODS)
def test_select_form_equals_conditional_form_float64(method):
  with jax.enable_x64(True):
    covs = covariances_needing_every_path()
    for covariances in (covs[:1], covs):  # every group healthy (the retry is skipped on CPU), and all paths
      forms = [jax.jit(lambda c, f=form: bw.whitening_matrix_with_fallbacks(c, method, 1e-5,
                                                                             accelerator_form=f))(covariances)
               for form in (False, True)]
      np.testing.assert_array_equal(forms[0][1], forms[1][1])
      np.testing.assert_allclose(forms[0][0], forms[1][0], rtol=1e-12, atol=1e-12)
    # Newton's matrix products never break down on the rank-deficient group; the factorisations do.
    assert list(np.asarray(forms[0][1])) == [False, method != 'newton', True]
