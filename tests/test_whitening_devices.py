"""BatchWhitening on 8 devices must compute what it computes on one (docs/design.md §2.4).

Eight devices on a CPU need XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is imported, so
the checks run in a fresh interpreter: this file is also that script (`python tests/test_whitening_devices.py
[PLACEMENT ...]` under those flags prints the JSON the tests read). Every check is the largest |difference|
between one training step placed on several devices and the same step on one device, for the output y, each
updated `batch_stats` entry and the input gradient dx of a scalar loss. Placements:

  jit_sharded       jax.jit, batch sharded over a 1-D mesh of Auto axes; the module knows nothing of devices.
  jit_explicit      jax.jit under a mesh of Explicit axes (`jax.set_mesh`), batch sharded: also `init` and
                    eval there, and y must stay sharded as the batch is.
  shard_map         jax.shard_map with axis_name='data': per-device moments, one psum.
  shard_map_groups  as shard_map with axis_index_groups = two groups of 4 devices; each group must equal
                    one device on its half of the batch.
  pmap              jax.pmap with axis_name='data' (flax's examples/imagenet way).

The script runs twice: with the CPU kernels (where they could be built) and with BW_JAX_CPU_KERNELS=0 (XLA's
products), the second time under explicit sharding only, where the two differ (the kernels run per shard).
"""

import json
import os
import sys
from typing import Any

import pytest

from subprocess_runs import run_process, subprocess_env

pytestmark = pytest.mark.slow  # Every test here reads a subprocess that compiles on 8 devices.

DEVICES = 8
BATCH_SHAPE = (16, 4, 4, 8)  # N divisible by DEVICES; m = 256 samples, 32 per device.
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
PLACEMENTS = ('jit_sharded', 'jit_explicit', 'shard_map', 'shard_map_groups', 'pmap')
# Module fields per case, and the placements each runs in. All start from running statistics that one
# earlier step moved away from (0, I), so the 'running' modes and the shard_map shift (the running mean) see
# non-trivial values; 'masked' counts 3 of every 4 examples.
CASES = {
    'cholesky': (dict(group_size=4, momentum=0.9), PLACEMENTS),
    'zca_running': (dict(group_size=4, momentum=0.9, method='zca', center_with='running', whiten_with='running'),
                    PLACEMENTS),
    'pca': (dict(group_size=4, momentum=0.9, method='pca'), ('jit_explicit',)),
    'newton': (dict(group_size=4, momentum=0.9, method='newton'), ('jit_explicit',)),
    'masked': (dict(group_size=4, momentum=0.9), ('jit_sharded', 'jit_explicit', 'shard_map')),
}
WITHOUT_KERNELS = ('jit_explicit',)  # the placements of the BW_JAX_CPU_KERNELS=0 run
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


def run_checks(placements: tuple[str, ...]) -> dict[str, Any]:
  """One training step per case and placement against one device: {'case/placement/quantity': diff}."""
  # JAX is imported here, not at the top, so that pytest importing this file leaves the device flags alone.
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
  import numpy as np

  from bw_jax.nn import kernels
  from bw_jax.nn.whitening import BatchWhitening

  devices = jax.devices()
  assert len(devices) == DEVICES, (
      f'expected {DEVICES} devices, got {devices}; run with '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} JAX_PLATFORMS=cpu')
  mesh = Mesh(devices, ('data',))
  explicit_mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Explicit,))
  replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  rng = np.random.default_rng(0)
  channels = BATCH_SHAPE[-1]
  mixing = np.eye(channels) + 0.5 * rng.normal(size=(channels, channels))  # correlates the channels
  offset = rng.uniform(-3.0, 3.0, size=channels)  # a mean far from the running mean: tests the shift
  warmup_x, x = (rng.normal(size=(2, *BATCH_SHAPE)) @ mixing + offset).astype(np.float32)
  weights = rng.normal(size=BATCH_SHAPE).astype(np.float32)  # loss = Σ y·weights (Σ y has ~zero grad)
  counted = np.broadcast_to((np.arange(BATCH_SHAPE[0]) % 4 != 1)[:, None, None, None], (*BATCH_SHAPE[:3], 1))

  def step_with_grad(call, variables, x, weights, mask):
    """y, stats and d(Σ y·weights)/dx for call(variables, x, mask) -> (y, stats)."""
    def loss(x):
      y, stats = call(variables, x, mask)
      return jnp.sum(y * weights), (y, stats)

    (_, (y, stats)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, stats, dx

  def train_call(model):
    def call(variables, x, mask):
      y, updates = model.apply(variables, x, use_running_average=False, mask=mask, mutable=['batch_stats'])
      return y, updates['batch_stats']
    return call

  def shard_map_call(model, groups):
    call = train_call(model)
    if groups:  # the groups' statistics differ: return every device's copy, stacked on a leading axis
      def local(variables, x, mask):
        y, stats = call(variables, x, mask)
        return y, jax.tree.map(lambda s: s[None], stats)
      stats_spec = P('data')
    else:  # out_specs P() with check_vma: the statistics are provably identical on every device
      local, stats_spec = call, P()
    # check_vma=True raises NotImplementedError for collectives with axis_index_groups in this JAX.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                         out_specs=(P('data'), stats_spec), check_vma=not groups)

  def on_explicit_mesh(model, variables, x, weights, mask):
    """init, the training step and eval under jit with the batch sharded over an Explicit mesh axis."""
    with jax.set_mesh(explicit_mesh):
      put = lambda a: None if a is None else jax.device_put(a, P('data'))
      xs, ws, ms = put(x), put(weights), put(mask)
      init = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x, use_running_average=False))(xs)
      step = jax.jit(lambda v, x, w, m: step_with_grad(train_call(model), v, x, w, m))(
          jax.device_put(variables, P()), xs, ws, ms)
      evaluated = jax.jit(lambda v, x: model.apply(v, x, use_running_average=True))(
          jax.device_put({**variables, 'batch_stats': step[1]}, P()), xs)
      sharded_like_x = all(a.sharding.is_equivalent_to(xs.sharding, xs.ndim) for a in (step[0], step[2], evaluated))
    return step, init[0], evaluated, sharded_like_x

  results: dict[str, Any] = {'devices': len(devices), 'kernels': kernels.available()}
  for case, (fields, case_placements) in CASES.items():
    placed = [p for p in case_placements if p in placements]
    if not placed:
      continue
    model = BatchWhitening(**fields)
    mask = counted if case == 'masked' else None
    variables = model.init(jax.random.key(0), warmup_x, use_running_average=False)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32),
                          variables['params'])  # γ ≠ 1, β ≠ 0
    _, stats = jax.jit(train_call(model))(variables, warmup_x, mask)
    variables = {'params': params, 'batch_stats': stats}

    single = jax.jit(lambda v, x, w, m: step_with_grad(train_call(model), v, x, w, m))
    reference = single(variables, x, weights, mask)
    on_devices = (jax.device_put(variables, replicated), jax.device_put(x, batch_sharded),
                  jax.device_put(weights, batch_sharded),
                  None if mask is None else jax.device_put(mask, batch_sharded))
    mapped = model.clone(axis_name='data')
    outputs, references = {}, {}
    for placement in placed:
      references[placement] = reference
      if placement == 'jit_sharded':
        outputs[placement] = single(*on_devices)
      elif placement == 'jit_explicit':
        outputs[placement], init_y, eval_y, sharded_like_x = on_explicit_mesh(model, variables, x, weights, mask)
        prefix = f'{case}/{placement}/'
        results[prefix + 'init_y'] = max_abs_difference(
            model.init_with_output(jax.random.key(0), x, use_running_average=False)[0], init_y)
        results[prefix + 'eval_y'] = max_abs_difference(model.apply(
            {**variables, 'batch_stats': reference[1]}, x, use_running_average=True), eval_y)
        results[prefix + 'sharded_like_x'] = float(sharded_like_x)
      elif placement == 'shard_map':
        outputs[placement] = jax.jit(lambda v, x, w, m: step_with_grad(shard_map_call(mapped, False), v, x, w, m))(
            *on_devices)
      elif placement == 'shard_map_groups':
        grouped = model.clone(axis_name='data', axis_index_groups=[list(g) for g in GROUPS])
        outputs[placement] = jax.jit(
            lambda v, x, w, m: step_with_grad(shard_map_call(grouped, True), v, x, w, m))(*on_devices)
        # Group k holds the k-th slice of the batch; each of its devices must hold that slice's statistics.
        halves = [single(variables, half_x, half_w, None)
                  for half_x, half_w in zip(np.split(x, len(GROUPS)), np.split(weights, len(GROUPS)))]
        per_group = lambda *s: np.repeat(np.stack(s), len(GROUPS[0]), axis=0)
        references[placement] = (np.concatenate([h[0] for h in halves]),
                                 jax.tree.map(per_group, *[h[1] for h in halves]),
                                 np.concatenate([h[2] for h in halves]))
      elif placement == 'pmap':
        per_device = lambda a: a.reshape(DEVICES, -1, *a.shape[1:])
        y, stats, dx = jax.pmap(lambda x, w: step_with_grad(train_call(mapped), variables, x, w, None),
                                axis_name='data')(per_device(x), per_device(weights))
        outputs[placement] = (y.reshape(x.shape), stats, dx.reshape(x.shape))  # stats: one copy per device

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


def device_run(placements: tuple[str, ...], **env: str) -> dict[str, Any]:
  # This repository's bw_jax first on the path (`subprocess_env`), whatever an installed one says.
  environment = subprocess_env({'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES}', **env})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = run_process([sys.executable, os.path.abspath(__file__), *placements], cwd=root, env=environment,
                     timeout=600)
  assert done.returncode == 0, f'device check script failed:\n{done.stdout}\n{done.stderr}'
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def results() -> dict[str, dict[str, Any]]:
  return {'kernels': device_run(PLACEMENTS), 'xla': device_run(WITHOUT_KERNELS, BW_JAX_CPU_KERNELS='0')}


def test_runs_on_eight_devices_with_and_without_the_cpu_kernels(results):
  assert results['kernels']['devices'] == results['xla']['devices'] == DEVICES
  assert results['xla']['kernels'] is False
  if not results['kernels']['kernels']:
    print('the CPU kernels could not be built here: both runs used XLA\'s products (test_kernels.py says why)')


@pytest.mark.parametrize('products, case, placement', [
    ('kernels', case, placement) for case, (_, placements) in CASES.items() for placement in placements] + [
    ('xla', case, placement) for case, (_, placements) in CASES.items() for placement in placements
    if placement in WITHOUT_KERNELS])
def test_training_step_matches_one_device(results, products, case, placement):
  prefix = f'{case}/{placement}/'
  checks = {k[len(prefix):]: v for k, v in results[products].items() if k.startswith(prefix)}
  expected = {'y', 'dx', 'dx_scale', 'stats/mean', 'stats/cov', 'stats/whitening'}
  if placement == 'jit_explicit':
    expected |= {'init_y', 'eval_y', 'sharded_like_x'}
    assert checks.pop('sharded_like_x') == 1.0, f'{prefix}: y, dx and the eval output must stay batch-sharded'
    expected.remove('sharded_like_x')
  assert set(checks) == expected, f'{prefix}: the script reported {sorted(checks)}'
  grad_tolerance = GRAD_RELATIVE_TOLERANCE * max(1.0, checks['dx_scale'])
  failures = [f'{name}: max |diff| {diff:.3g} > {TOLERANCE:g}' for name, diff in checks.items()
              if name not in ('dx', 'dx_scale') and not diff < TOLERANCE]
  if not checks['dx'] < grad_tolerance:
    failures.append(f'dx: max |diff| {checks["dx"]:.3g} > {grad_tolerance:.3g} '
                    f'(= {GRAD_RELATIVE_TOLERANCE:g} · max|dx| {checks["dx_scale"]:.3g})')
  assert not failures, f'{case} under {placement} ({products}) differs from one device:\n  ' + '\n  '.join(failures)


if __name__ == '__main__':
  from bw_jax.train.runtime import skip_final_garbage_collection
  skip_final_garbage_collection()
  print(json.dumps(run_checks(tuple(sys.argv[1:]) or PLACEMENTS)))
