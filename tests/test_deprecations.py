"""Nothing bw_jax runs is marked deprecated by the pinned JAX or Flax (a newer JAX, such as the GPU image's,
removes what an older one deprecated): in a fresh interpreter where DeprecationWarnings and FutureWarnings are
errors (`python -W error::...`, also at import), the layer, the model (in the train and eval steps, lowered)
and the NNX layer are built, traced and differentiated."""

import importlib.util
import sys
import textwrap

import pytest

from subprocess_runs import REPO, run_process, subprocess_env

WARNINGS_AS_ERRORS = ['-W', 'error::DeprecationWarning', '-W', 'error::FutureWarning']

LAYER = """
import jax, jax.numpy as jnp, numpy as np
from bw_jax import BatchWhitening

x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2, 2, 8)), jnp.float32)
for method in ('cholesky', 'zca', 'pca', 'newton'):
  layer = BatchWhitening(group_size=4, method=method)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  def loss(params, x):
    y, _ = layer.apply({**variables, 'params': params}, x, use_running_average=False, mutable=['batch_stats'])
    return jnp.sum(y ** 2)
  jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  layer.apply(variables, x, use_running_average=True)
print('layer')
"""

# The step as bw_jax.train.loop and benchmarks/accelerator.py compile it (rates and dropout key as arguments,
# uint8 images normalised on the device), for a BW model in bf16, then its eval step: the model in both modes.
# Both are traced, differentiated and lowered, which is where JAX and Flax warn, but not compiled: XLA's compile
# (~30 s of CPU for these two) runs no Python that could; the init above goes through jax's compile path.
TRAIN_STEP = """
import functools
import jax, jax.numpy as jnp, numpy as np
from bw_jax.data.on_device import normalise_images
from bw_jax.train import optim, step
from bw_jax.train.config.validation import base_config
from bw_jax.train.programs import compiled_init

config = base_config()
config.model.stem_type, config.model.mbconv_type, config.model.head_type = 2, 2, 2
config.model.width_multiplier, config.model.depth_multiplier, config.model.bw.group_size = 0.25, 0.1, 4
config.dataset.image_size, config.half_precision, config.ema_decay = 16, True, 0.9
model = step.create_model(config, 10)
schedule = optim.Schedule('cosine', warmup_steps=10, decay_steps=90)
tx = optim.create_optimizer(config, optim.learning_rate_fn(schedule, 1.0), config.weight_decay)
replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
state = compiled_init(config, model, tx, (16, 16, 1), replicated)(np.int32(config.seed))
normalise = functools.partial(normalise_images, mean=(0.5,), std=(0.25,))
train_step = jax.jit(functools.partial(
    step.train_step, model=model, num_classes=10, label_smoothing=0.1, ema_decay=config.ema_decay,
    optimizer_from_rates=functools.partial(optim.optimizer_from_rates, config, schedule), normalise=normalise))
batch = {'image': jnp.zeros((8, 16, 16, 1), jnp.uint8), 'label': jnp.arange(8) % 10, 'mask': jnp.ones((8,))}
rates = optim.optimizer_rates(0.1, config.weight_decay)
train_step.lower(state, batch, step.run_dropout_key(0, replicated), rates)
jax.jit(functools.partial(step.eval_step, model=model, num_classes=10, use_ema=True, normalise=normalise)).lower(
    state, batch)
print('train step')
"""

NNX_LAYER = """
import jax.numpy as jnp, numpy as np
from flax import nnx
from bw_jax.nn.nnx import BatchWhitening

x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
layer = BatchWhitening(8, group_size=4, rngs=nnx.Rngs(0))
nnx.grad(lambda layer: jnp.sum(layer(x, use_running_average=False) ** 2))(layer)
layer(x, use_running_average=True)
print('nnx layer')
"""


def run_with_warnings_as_errors(code: str) -> str:
  done = run_process([sys.executable, *WARNINGS_AS_ERRORS, '-c', textwrap.dedent(code)], cwd=REPO,
                     env=subprocess_env(), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.slow  # Compiles the layer's four methods and a tiny B0's init, lowers its train and eval steps: ~25 s.
def test_layer_model_and_train_step_use_nothing_deprecated():
  assert run_with_warnings_as_errors(LAYER + TRAIN_STEP).split('\n')[:2] == ['layer', 'train step']


def test_nnx_layer_uses_nothing_deprecated():
  if importlib.util.find_spec('bw_jax.nn.nnx') is None:
    pytest.skip('bw_jax.nn.nnx (the NNX layer) is not in this checkout')
  assert run_with_warnings_as_errors(NNX_LAYER).split('\n')[0] == 'nnx layer'


def test_a_deprecated_jax_name_fails_here():
  # What the tests above rely on: the pinned JAX warns, and the flags turn its warning into an error.
  done = run_process([sys.executable, *WARNINGS_AS_ERRORS, '-c', 'import jax.core\njax.core.DropVar'],
                     cwd=REPO, env=subprocess_env(), timeout=120)
  assert done.returncode == 1 and 'DeprecationWarning: jax.core.DropVar is deprecated' in done.stderr
