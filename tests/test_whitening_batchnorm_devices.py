"""BatchWhitening as a drop-in for `flax.linen.BatchNorm` on 8 devices (docs/design.md §2.4).

(a) `axis_name`, `axis_index_groups` and masks under `pmap`: BatchWhitening(group_size=1) against flax's
    BatchNorm (rescaled as in tests/test_whitening_batchnorm.py) and group whitening against float64 NumPy.
(b) flax's examples/imagenet pattern: a `pmap` train step whose per-device `batch_stats` are
    `jax.lax.pmean`ed across devices (`sync_batch_stats`), with a group-whitening model, against the device
    average of float64 NumPy running statistics.
(c) a small ResNet built as flax's examples/imagenet builds it (norm injected with functools.partial,
    initialised on one image whose last stage is 1×1), trained a few steps with BW under `pmap` with
    axis_name and under `jax.jit` on a mesh of Explicit axes; and bw_jax's EfficientNet train step
    (bw_jax/train/step.py) under the Explicit mesh: parameters and statistics against one device.

Eight devices on a CPU need XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is imported, so
the checks run in a fresh interpreter: this file is also that script, as tests/test_whitening_devices.py
(`python tests/test_whitening_batchnorm_devices.py [efficientnet]`: (a)-(c), or the EfficientNet step alone).
"""

import json
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from subprocess_runs import start_test_process, subprocess_env
from test_whitening_batchnorm import (EPSILON, MOMENTUM, TOLERANCE, batchnorm_scale, inputs, max_abs_difference,
                                      np_apply, np_cholesky_whitening, np_masked_moments)

DEVICES = 8
LOCAL_SHAPE = (4, 2, 2, 4)  # one device's batch, NHWC: 16 samples, 4 channels


# ----------------------------------------------------------------------------------------------------------
# The device script (run in the subprocess)


def run_device_checks() -> dict[str, float]:
  """{check name: max |difference|} for the axis_name, mask and pmap/pmean checks on 8 devices."""
  # JAX is imported here, so that pytest importing this file leaves the device flags alone.
  from flax import linen as nn
  import jax

  from bw_jax.nn.whitening import BatchWhitening

  assert jax.device_count() == DEVICES, f'expected {DEVICES} devices, got {jax.devices()}'
  results: dict[str, float] = {'devices': jax.device_count()}
  x = inputs(0, (DEVICES, *LOCAL_SHAPE))  # (devices, N, H, W, C)
  c_all = x.shape[-1]

  def mapped_step(module, mask=None):
    """pmap of one training step: y and the updated batch_stats on every device."""
    variables = module.init(jax.random.key(0), x[0], use_running_average=False)
    step = lambda x, mask: module.apply(variables, x, use_running_average=False, mask=mask,
                                        mutable=['batch_stats'])
    y, updates = jax.pmap(step, axis_name='batch')(x, mask)
    return y, updates['batch_stats']

  def compare(name, counted, mask, device_slices, **fields):
    """BW(g=1) and BatchNorm (ε' for `counted` samples) under pmap against each other and NumPy."""
    bw = BatchWhitening(group_size=1, epsilon=EPSILON, momentum=MOMENTUM, axis_name='batch', **fields)
    bn = nn.BatchNorm(epsilon=EPSILON * (counted - 1) / counted, momentum=MOMENTUM, axis_name='batch', **fields)
    (y_bw, s_bw) = mapped_step(bw, mask)
    (y_bn, s_bn) = mapped_step(bn, None if mask is None else np.broadcast_to(mask, x.shape))
    results[f'{name}/y'] = max_abs_difference(batchnorm_scale(counted) * y_bn, y_bw)
    results[f'{name}/mean'] = max_abs_difference(s_bn['mean'], s_bw['mean'])
    # Each device holds the moments of the devices it reduces over (the slices of its device group).
    var_u = np.concatenate([np.broadcast_to(np_masked_moments(
        x[d], None if mask is None else mask[d][..., 0], 1)[1][:, 0, 0], (d.stop - d.start, c_all))
        for d in device_slices])
    results[f'{name}/cov'] = max_abs_difference(MOMENTUM + (1 - MOMENTUM) * var_u, s_bw['cov'][..., 0, 0])
    results[f'{name}/var'] = max_abs_difference(
        MOMENTUM + (1 - MOMENTUM) * var_u * (counted - 1) / counted, s_bn['var'])

  m = x[0].size // c_all * DEVICES
  compare('axis_name', m, None, [slice(0, DEVICES)])
  compare('axis_index_groups', m // 2, None, [slice(0, 4), slice(4, 8)],
          axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
  # A mask with the same count on every device: BatchNorm's pmean of per-device masked means is then the
  # mean of all counted samples, and BW must agree with it.
  rows = np.arange(LOCAL_SHAPE[0]) < 3
  same_count = np.broadcast_to(rows[None, :, None, None, None], (DEVICES, *LOCAL_SHAPE[:-1], 1))
  compare('mask_same_count', int(same_count.sum()), same_count, [slice(0, DEVICES)])

  # A different count on each device: BW's moments are those of all counted samples (BatchNorm averages
  # the per-device means instead: docs/design.md §2).
  uneven = np.arange(LOCAL_SHAPE[0])[None, :] < (np.arange(DEVICES) % 3 + 2)[:, None]  # 2-4 rows each
  uneven = np.broadcast_to(uneven[:, :, None, None, None], (DEVICES, *LOCAL_SHAPE[:-1], 1))
  y_bw, s_bw = mapped_step(BatchWhitening(group_size=2, epsilon=EPSILON, momentum=MOMENTUM,
                                          axis_name='batch'), uneven)
  mean, cov = np_masked_moments(x, uneven[..., 0], 2)
  results['mask_uneven/mean'] = max_abs_difference(np.broadcast_to((1 - MOMENTUM) * mean, (DEVICES, c_all)),
                                                   s_bw['mean'])
  results['mask_uneven/cov'] = max_abs_difference(
      np.broadcast_to(MOMENTUM * np.eye(2) + (1 - MOMENTUM) * cov, (DEVICES, 2, 2, 2)), s_bw['cov'])
  results['mask_uneven/y'] = max_abs_difference(np_apply(x, mean, np_cholesky_whitening(cov, EPSILON)), y_bw)

  results.update(imagenet_style_train_and_sync(x))
  results.update(resnet_on_devices())
  return results


def imagenet_style_train_and_sync(x: np.ndarray) -> dict[str, float]:
  """Two pmap train steps (grads pmean'ed, per-device batch_stats) then flax's examples/imagenet
  `sync_batch_stats`, against the device average of float64 per-device running statistics."""
  from flax import jax_utils, linen as nn
  from flax.training import train_state
  import jax
  import optax

  from bw_jax.nn.whitening import BatchWhitening

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = BatchWhitening(group_size=2, momentum=MOMENTUM, epsilon=EPSILON, use_running_average=not train)(x)
      return nn.Dense(3)(x.mean(axis=(1, 2)))

  class TrainState(train_state.TrainState):  # as examples/imagenet/train.py
    batch_stats: Any

  model = Tiny()
  variables = model.init(jax.random.key(0), x[0], train=False)
  state = jax_utils.replicate(TrainState.create(apply_fn=model.apply, params=variables['params'],
                                                tx=optax.sgd(0.1), batch_stats=variables['batch_stats']))

  def train_step(state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name='batch')
    return state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])

  def sync_batch_stats(state):  # examples/imagenet/train.py
    cross_replica_mean = jax.pmap(lambda x: jax.lax.pmean(x, 'x'), 'x')
    return state.replace(batch_stats=cross_replica_mean(state.batch_stats))

  step = jax.pmap(train_step, axis_name='batch')
  batches = [x, inputs(1, x.shape)]
  labels = np.random.default_rng(2).integers(0, 3, size=(DEVICES, LOCAL_SHAPE[0]))
  for images in batches:
    state = step(state, images, labels)
  synced = jax.device_get(sync_batch_stats(state).batch_stats['BatchWhitening_0'])

  per_device = {'mean': [], 'cov': [], 'whitening': []}
  for d in range(DEVICES):
    mean, cov = np.zeros(4), np.broadcast_to(np.eye(2), (2, 2, 2))
    for images in batches:
      batch_mean, batch_cov = np_masked_moments(images[d], None, 2)
      mean = MOMENTUM * mean + (1 - MOMENTUM) * batch_mean
      cov = MOMENTUM * cov + (1 - MOMENTUM) * batch_cov
    for name, value in zip(per_device, (mean, cov, np_cholesky_whitening(cov, EPSILON))):
      per_device[name].append(value)
  out = {f'pmap_sync/{name}': max_abs_difference(np.broadcast_to(np.mean(v, 0), synced[name].shape),
                                                 synced[name]) for name, v in per_device.items()}
  out['pmap_sync/devices_differed'] = max_abs_difference(per_device['mean'][0], per_device['mean'][1])
  out['pmap_sync/all_float32'] = float(all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(synced)))
  return out


def resnet(norm_layer: Any, axis_name: str | None) -> Any:
  """A 3-stage ResNet of one basic block per stage, as flax's examples/imagenet/models.py builds its ResNets:
  conv and norm bound once with functools.partial and handed to the blocks."""
  import functools

  from flax import linen as nn
  import jax.numpy as jnp

  class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
      y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
      y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
      if x.shape != y.shape:
        x = self.norm(name='norm_proj')(self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(x))
      return nn.relu(x + y)

  class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      conv = functools.partial(nn.Conv, use_bias=False)
      norm = functools.partial(norm_layer, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               axis_name=axis_name)
      x = nn.relu(norm(name='bn_init')(conv(4, (3, 3), name='conv_init')(x)))
      for stage in range(3):
        x = ResNetBlock(4 * 2 ** stage, conv=conv, norm=norm, strides=(2, 2) if stage else (1, 1))(x)
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
  return ResNet()


def resnet_on_devices() -> dict[str, float]:
  """Three SGD steps of the ResNet with BW (g = 4) on 8 devices, under pmap and under an explicit mesh,
  against the same steps on one device with the global batch."""
  import functools

  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, PartitionSpec as P
  import optax

  from bw_jax.nn.whitening import BatchWhitening

  norm = functools.partial(BatchWhitening, group_size=4)
  rng = np.random.default_rng(5)
  images = rng.normal(size=(3, 16, 4, 4, 3)).astype(np.float32)  # 3 steps of 16 images: 2 per device
  labels = rng.integers(0, 3, size=(3, 16))
  # examples/imagenet/train.py's `initialized`: one image, train=True by default; the last stage is 1×1.
  variables = jax.jit(resnet(norm, None).init)({'params': jax.random.key(0)}, jnp.ones((1, 4, 4, 3)))
  out = {'resnet/init_collections': float(set(variables) == {'params', 'batch_stats'})}

  def train_step(model, params, batch_stats, images, labels, axis_name=None):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), batch_stats

  def run(step, put_batch=lambda a: a, put_state=lambda tree: tree):
    params, batch_stats = put_state((variables['params'], variables['batch_stats']))
    for k in range(3):
      params, batch_stats = step(params, batch_stats, put_batch(images[k]), put_batch(labels[k]))
    return params, batch_stats

  single = run(jax.jit(functools.partial(train_step, resnet(norm, None))))
  per_device = lambda a: a.reshape(DEVICES, -1, *a.shape[1:])
  pmapped = jax.pmap(functools.partial(train_step, resnet(norm, 'batch'), axis_name='batch'), axis_name='batch',
                     in_axes=(None, None, 0, 0), out_axes=(None, None))
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    explicit = run(jax.jit(functools.partial(train_step, resnet(norm, None))),
                   lambda a: jax.device_put(a, P('data')), lambda tree: jax.device_put(tree, P()))
  for placement, result in (('pmap', run(pmapped, per_device)), ('jit_explicit', explicit)):
    for part, reference, got in zip(('params', 'batch_stats'), single, result):
      out[f'resnet/{placement}/{part}'] = max(max_abs_difference(a, b) for a, b in zip(
          jax.tree.leaves(reference), jax.tree.leaves(got)))
  out['resnet/stats_moved'] = max_abs_difference(variables['batch_stats']['bn_init']['mean'],
                                                 single[1]['bn_init']['mean'])
  return out


def efficientnet_step_on_explicit_mesh() -> dict[str, float]:
  """Two steps of bw_jax.train.step.train_step (the smoke config's EfficientNet with BW at the stem and the
  head, with dropout and drop-connect) under jax.jit on a mesh of Explicit axes, the batch sharded, against
  one device."""
  import functools

  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, PartitionSpec as P
  import optax

  from bw_jax.train import step as train_step_module
  from configs import smoke

  config = smoke.get_config()
  config.model.dropout_rate, config.model.drop_connect_rate = 0.2, 0.2
  # BW layers of 8 (stem) and 320 (head) channels, BN in the blocks: about 60% of the compile time of the
  # smoke config's BW in every block, and each of the two programs compiles here once.
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = 2, 0, 2
  model = train_step_module.create_model(config, 10)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  state = train_step_module.TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=optax.sgd(0.05), batch_stats=variables['batch_stats'],
      bw_health=variables['bw_health'], ema_params={})
  rng = np.random.default_rng(6)
  batches = [{'image': rng.normal(size=(16, 28, 28, 1)).astype(np.float32), 'label': rng.integers(0, 10, 16),
              'mask': np.ones(16, np.float32)} for _ in range(2)]
  step = functools.partial(train_step_module.train_step, model=model, num_classes=10, label_smoothing=0.1,
                           ema_decay=0.0, learning_rate_fn=optax.constant_schedule(0.05))

  def run(put=lambda tree: tree):
    compiled, current, losses = jax.jit(step), put(state), []
    for batch in batches:
      current, metrics = compiled(current, put(batch), put(jax.random.key(1)))
      losses.append(metrics['loss'])
    return current, losses

  single, single_losses = run()
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    def put(tree):  # batches sharded on their first axis, the state and keys replicated
      if isinstance(tree, dict) and 'image' in tree:
        return jax.device_put(tree, P('data'))
      return jax.device_put(tree, P())
    explicit, explicit_losses = run(put)
  out = {'efficientnet/jit_explicit/loss': max_abs_difference(single_losses, explicit_losses)}
  for part in ('params', 'batch_stats', 'bw_health'):
    out[f'efficientnet/jit_explicit/{part}'] = max(max_abs_difference(a, b) for a, b in zip(
        jax.tree.leaves(getattr(single, part)), jax.tree.leaves(getattr(explicit, part))))
  out['efficientnet/bw_layers'] = float(len(single.bw_health))
  return out


# ----------------------------------------------------------------------------------------------------------
# (a) axis_name and mask under pmap, (b) the ImageNet example's pmean of batch_stats: 8 devices


def device_script(*arguments: str) -> dict[str, float]:
  """This file run as the device script (with `arguments`) on 8 virtual devices: its JSON results."""
  # This repository's bw_jax first on the path (`subprocess_env`), whatever an installed one says.
  env = subprocess_env({'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES}'})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # A session of its own, killed as a group below, and SIGKILLed by the kernel if pytest itself is killed.
  process = start_test_process([sys.executable, os.path.abspath(__file__), *arguments], cwd=root, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    stdout, stderr = process.communicate(timeout=600)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  assert process.returncode == 0, f'device check script failed:\n{stdout}\n{stderr}'
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def device_results() -> dict[str, float]:
  return device_script()


def failures(results: dict[str, float], prefix: str, tolerance: float = TOLERANCE) -> list[str]:
  checks = {k: v for k, v in results.items() if k.startswith(prefix)}
  assert checks, f'the script reported nothing for {prefix}'
  return [f'{k}: max |diff| {v:.3g} > {tolerance:g}' for k, v in checks.items() if not v < tolerance]


@pytest.mark.slow  # 8-device script in a new interpreter: ~50 s on 2 busy cores.
@pytest.mark.parametrize('check', ['axis_name/', 'axis_index_groups/', 'mask_same_count/', 'mask_uneven/'])
def test_axis_name_and_mask_under_pmap_match_batchnorm_and_numpy(device_results, check):
  assert device_results['devices'] == DEVICES
  assert not failures(device_results, check)


@pytest.mark.slow  # 8-device script in a new interpreter: ~50 s on 2 busy cores.
def test_imagenet_example_pmean_of_batch_stats_averages_the_devices_statistics(device_results):
  assert device_results['pmap_sync/devices_differed'] > 1e-3  # per-device statistics were different
  assert device_results['pmap_sync/all_float32'] == 1.0
  assert not failures(device_results, 'pmap_sync/mean') + failures(device_results, 'pmap_sync/cov') + \
      failures(device_results, 'pmap_sync/whitening', 1e-4)


@pytest.mark.slow  # 8-device script in a new interpreter.
def test_flax_example_resnet_trains_with_bw_under_pmap_and_an_explicit_mesh_as_on_one_device(device_results):
  # Initialised as the example does (one image, train=True: a 1×1 last stage), with BatchNorm's collections.
  assert device_results['resnet/init_collections'] == 1.0
  assert device_results['resnet/stats_moved'] > 1e-3  # the steps moved the running statistics
  # Three SGD steps compound float32 round-off of other summation orders through the parameters.
  assert not failures(device_results, 'resnet/pmap/', 1e-4) + failures(device_results, 'resnet/jit_explicit/', 1e-4)


@pytest.mark.slow  # 8-device script compiling two train steps of the smoke model: ~60 s on 2 quiet cores.
def test_efficientnet_train_step_runs_under_an_explicit_mesh_as_on_one_device():
  results = device_script('efficientnet')
  assert results['efficientnet/bw_layers'] > 0  # the smoke model has BW layers (and their counters)
  # Float32 sums in another order through ~20 layers: the logits of one forward pass differ from one
  # device's by up to 4e-5 under an Auto mesh and 8e-5 under the Explicit one (of |logits| ≤ 4), the
  # parameters after two steps by 2e-5 and 7e-5 (of |θ| ≤ 2.7): measured. A wrong statistic moves them by
  # orders of magnitude more.
  assert not failures(results, 'efficientnet/jit_explicit/', 5e-4)


if __name__ == '__main__':
  from bw_jax.train.runtime import skip_final_garbage_collection
  skip_final_garbage_collection()
  print(json.dumps(efficientnet_step_on_explicit_mesh() if sys.argv[1:] == ['efficientnet'] else run_device_checks()))
