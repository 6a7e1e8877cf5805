"""BatchWhitening on 8 devices must compute what it computes on one (docs/design.md §2.4).

Eight devices on a CPU need XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is imported, so
the checks run in a fresh interpreter: this file is also that script (`python tests/test_whitening_devices.py`
under those flags prints the JSON the tests read). Every check is the largest |difference| between one
training step placed on several devices and the same step on one device, for the output y, each updated
`batch_stats` entry and the input gradient dx of a scalar loss. Placements:

  jit_sharded       jax.jit, batch sharded over a 1-D mesh; the module knows nothing about devices.
  shard_map         jax.shard_map with axis_name='data': per-device moments, one pmean.
  shard_map_groups  as shard_map with axis_index_groups = two groups of 4 devices; each group must equal
                    one device on its half of the batch.
"""

import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # Every test here reads a subprocess that compiles on 8 devices.

DEVICES = 8
BATCH_SHAPE = (16, 4, 4, 8)  # N divisible by DEVICES; m = 256 samples, 32 per device.
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
# Module fields per case. Both start from running statistics that one earlier step moved away from (0, I),
# so the 'running' modes and the shard_map shift (the running mean) see non-trivial values.
CASES = {
    'cholesky': dict(group_size=4, momentum=0.9),
    'zca_running': dict(group_size=4, momentum=0.9, method='zca', center_with='running',
                        whiten_with='running'),
}
PLACEMENTS = ('jit_sharded', 'shard_map', 'shard_map_groups')
# Float32 sums in another order move batch_stats by ~1e-7 and y = S(x − μ), with |x| up to ~10, by up to
# ~6e-6 (measured over four seeds): 1e-5 passes round-off and fails any real error (dropping the device
# groups gives differences of 0.01-0.5).
TOLERANCE = 1e-5
# dx = J(x)ᵀ·weights sums ~m products of O(1) terms whose float32 round-off grows with the size of dx and
# with the conditioning of S, so it is compared relative to max|dx| (3-5 here; the measured differences are
# at most 2e-6 of it).
GRAD_RELATIVE_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------------------
# The script (run in the subprocess)


def max_abs_difference(reference, other) -> float:
  import numpy as np

  return float(np.max(np.abs(np.asarray(other, np.float64) - np.asarray(reference, np.float64))))


def run_checks() -> dict[str, Any]:
  """One training step per case and placement against one device: {'case/placement/quantity': diff}."""
  # JAX is imported here, not at the top, so that pytest importing this file leaves the device flags alone.
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import numpy as np

  from bw_jax.nn.whitening import BatchWhitening

  devices = jax.devices()
  assert len(devices) == DEVICES, (
      f'expected {DEVICES} devices, got {devices}; run with '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} JAX_PLATFORMS=cpu')
  mesh = Mesh(devices, ('data',))
  replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  rng = np.random.default_rng(0)
  channels = BATCH_SHAPE[-1]
  mixing = np.eye(channels) + 0.5 * rng.normal(size=(channels, channels))  # correlates the channels
  offset = rng.uniform(-3.0, 3.0, size=channels)  # a mean far from the running mean: tests the shift
  warmup_x, x = (rng.normal(size=(2, *BATCH_SHAPE)) @ mixing + offset).astype(np.float32)
  weights = rng.normal(size=BATCH_SHAPE).astype(np.float32)  # loss = Σ y·weights (Σ y has ~zero grad)

  def step_with_grad(call, variables, x, weights):
    """y, stats and d(Σ y·weights)/dx for call(variables, x) -> (y, stats)."""
    def loss(x):
      y, stats = call(variables, x)
      return jnp.sum(y * weights), (y, stats)

    (_, (y, stats)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, stats, dx

  def train_call(model):
    def call(variables, x):
      y, updates = model.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
      return y, updates['batch_stats']
    return call

  def shard_map_call(model, groups):
    call = train_call(model)
    if groups:  # the groups' statistics differ: return every device's copy, stacked on a leading axis
      def local(variables, x):
        y, stats = call(variables, x)
        return y, jax.tree.map(lambda s: s[None], stats)
      stats_spec = P('data')
    else:  # out_specs P() with check_vma: the statistics are provably identical on every device
      local, stats_spec = call, P()
    # check_vma=True raises NotImplementedError for collectives with axis_index_groups in this JAX.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data')), out_specs=(P('data'), stats_spec),
                         check_vma=not groups)

  results: dict[str, Any] = {'devices': len(devices)}
  for case, fields in CASES.items():
    model = BatchWhitening(**fields)
    variables = model.init(jax.random.key(0), warmup_x, use_running_average=False)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32),
                          variables['params'])  # γ ≠ 1, β ≠ 0
    _, stats = jax.jit(train_call(model))(variables, warmup_x)
    variables = {'params': params, 'batch_stats': stats}

    single = jax.jit(lambda v, x, w: step_with_grad(train_call(model), v, x, w))
    on_devices = (jax.device_put(variables, replicated), jax.device_put(x, batch_sharded),
                  jax.device_put(weights, batch_sharded))
    mapped = model.clone(axis_name='data')
    grouped = model.clone(axis_name='data', axis_index_groups=[list(g) for g in GROUPS])
    outputs = {
        'jit_sharded': single(*on_devices),
        'shard_map': jax.jit(lambda v, x, w: step_with_grad(shard_map_call(mapped, False), v, x, w))(
            *on_devices),
        'shard_map_groups': jax.jit(
            lambda v, x, w: step_with_grad(shard_map_call(grouped, True), v, x, w))(*on_devices),
    }
    # Group k holds the k-th slice of the batch; each of its devices must hold that slice's statistics.
    halves = [single(variables, half_x, half_w)
              for half_x, half_w in zip(np.split(x, len(GROUPS)), np.split(weights, len(GROUPS)))]
    per_group = lambda *s: np.repeat(np.stack(s), len(GROUPS[0]), axis=0)
    grouped_reference = (np.concatenate([h[0] for h in halves]),
                         jax.tree.map(per_group, *[h[1] for h in halves]),
                         np.concatenate([h[2] for h in halves]))
    reference = single(variables, x, weights)
    references = {'jit_sharded': reference, 'shard_map': reference, 'shard_map_groups': grouped_reference}

    for placement, (y, stats, dx) in outputs.items():
      ref_y, ref_stats, ref_dx = references[placement]
      prefix = f'{case}/{placement}/'
      results[prefix + 'y'] = max_abs_difference(ref_y, y)
      for path, ref_stat in jax.tree_util.tree_flatten_with_path(ref_stats)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        results[f'{prefix}stats/{name}'] = max_abs_difference(ref_stat, stats[name])
      results[prefix + 'dx'] = max_abs_difference(ref_dx, dx)
      results[prefix + 'dx_scale'] = float(np.max(np.abs(ref_dx)))
  return results


# ----------------------------------------------------------------------------------------------------------
# The tests (run by pytest)


@pytest.fixture(scope='module')
def results() -> dict[str, float]:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}', JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=root, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, f'device check script failed:\n{done.stdout}\n{done.stderr}'
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_runs_on_eight_devices(results):
  assert results['devices'] == DEVICES


@pytest.mark.parametrize('placement', PLACEMENTS)
@pytest.mark.parametrize('case', CASES)
def test_training_step_matches_one_device(results, case, placement):
  prefix = f'{case}/{placement}/'
  checks = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
  expected = {'y', 'dx', 'dx_scale', 'stats/mean', 'stats/cov', 'stats/whitening'}
  assert set(checks) == expected, f'{prefix}: the script reported {sorted(checks)}'
  grad_tolerance = GRAD_RELATIVE_TOLERANCE * max(1.0, checks['dx_scale'])
  failures = [f'{name}: max |diff| {diff:.3g} > {TOLERANCE:g}' for name, diff in checks.items()
              if name not in ('dx', 'dx_scale') and not diff < TOLERANCE]
  if not checks['dx'] < grad_tolerance:
    failures.append(f'dx: max |diff| {checks["dx"]:.3g} > {grad_tolerance:.3g} '
                    f'(= {GRAD_RELATIVE_TOLERANCE:g} · max|dx| {checks["dx_scale"]:.3g})')
  assert not failures, f'{case} under {placement} differs from one device:\n  ' + '\n  '.join(failures)


if __name__ == '__main__':
  from bw_jax.train.runtime import skip_final_garbage_collection
  skip_final_garbage_collection()
  print(json.dumps(run_checks()))
