"""bw_jax.nnx.BatchWhitening: the Linen module's numbers in NNX, a drop-in for `flax.nnx.BatchNorm`.

References: the Linen module (same inputs and settings: the same outputs and running statistics, since both
hand a step to the same pure functions), flax's `nnx.BatchNorm` (group size 1, up to the 1/(m−1) variance:
tests/test_whitening_batchnorm.py's rescaling) and float64 NumPy running averages.
"""

import inspect

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bw_jax.nn import whitening as bw
from bw_jax.nnx import BatchWhitening, BWHealth
from test_whitening_batchnorm import EPSILON, MOMENTUM, TOLERANCE, batchnorm_scale, inputs


@pytest.mark.parametrize('fields', [dict(group_size=2), dict(group_size=4, method='zca', center_with='running',
                                                             whiten_with='running'),
                                    dict(group_size=2, axis=1, use_bias=False)])
def test_outputs_and_running_statistics_are_the_linen_module_s(fields):
  batches = [inputs(30 + k, (6, 4, 3, 3) if fields.get('axis') == 1 else (6, 3, 3, 4)) for k in range(3)]
  mask = (np.arange(6) != 2)[:, None, None, None]
  linen_layer = bw.BatchWhitening(momentum=MOMENTUM, epsilon=EPSILON, **fields)
  variables = linen_layer.init(jax.random.key(0), batches[0], use_running_average=False)
  nnx_layer = BatchWhitening(4, momentum=MOMENTUM, epsilon=EPSILON, rngs=nnx.Rngs(0), **fields)
  for k, x in enumerate(batches):
    step_mask = mask if k == 1 else None  # one step counts only some samples
    y_linen, updates = linen_layer.apply(variables, x, use_running_average=False, mask=step_mask,
                                         mutable=['batch_stats'])
    variables = {**variables, **updates}
    y_nnx = nnx_layer(x, mask=step_mask)
    np.testing.assert_array_equal(y_nnx, y_linen)
    for name in ('mean', 'cov', 'whitening'):
      np.testing.assert_array_equal(getattr(nnx_layer, name)[...], variables['batch_stats'][name], err_msg=name)
  x_eval = batches[0] + 1.0
  np.testing.assert_array_equal(nnx_layer(x_eval, use_running_average=True),
                                linen_layer.apply(variables, x_eval, use_running_average=True))
  nnx_layer.eval()
  np.testing.assert_array_equal(nnx_layer(x_eval), linen_layer.apply(variables, x_eval, use_running_average=True))


def test_group_size_one_is_nnx_batchnorm_with_the_unbiased_variance():
  x = inputs(40, (8, 3, 3, 4))
  m = 72
  layer_bw = BatchWhitening(4, group_size=1, momentum=MOMENTUM, epsilon=EPSILON, rngs=nnx.Rngs(0))
  layer_bn = nnx.BatchNorm(4, momentum=MOMENTUM, epsilon=EPSILON * (m - 1) / m, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer_bw(x), batchnorm_scale(m) * np.asarray(layer_bn(x)), atol=TOLERANCE)
  np.testing.assert_allclose(layer_bw.mean[...], layer_bn.mean[...], atol=1e-6)
  # BatchNorm's var is the 1/m variance, BW's cov the 1/(m−1) one: the same average of the batch's.
  np.testing.assert_allclose((layer_bw.cov[...][:, 0, 0] - MOMENTUM) * (m - 1) / m,
                             layer_bn.var[...] - MOMENTUM, atol=1e-6)
  # The state has BatchNorm's kinds of variables only; the counters when asked for.
  kinds = lambda module: {type(v) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
  assert kinds(layer_bw) == kinds(layer_bn) == {nnx.Param, nnx.BatchStat}
  assert set(nnx.state(layer_bw, nnx.BatchStat)) == {'mean', 'cov', 'whitening'}
  tracked = BatchWhitening(4, group_size=2, track_health=True, rngs=nnx.Rngs(0))
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  tracked(bad)
  assert (float(tracked.fallbacks[...]), float(tracked.skipped_updates[...])) == (0.0, 1.0)
  assert BWHealth in kinds(tracked)


def test_bad_settings_and_inputs_say_what_is_allowed():
  with pytest.raises(ValueError, match="method='svd' is not supported"):
    BatchWhitening(4, method='svd', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='group_size=3 does not divide the 4 input channels'):
    BatchWhitening(4, group_size=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='built for num_features=4, but the input has 6 features'):
    BatchWhitening(4, rngs=nnx.Rngs(0))(jnp.ones((8, 6)))
  with pytest.raises(ValueError, match='No use_running_average'):
    BatchWhitening(4, use_running_average=None, rngs=nnx.Rngs(0))(jnp.ones((8, 4)))


class Classifier(nnx.Module):
  """Linear → BW (groups of 4) → relu → Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.whiten = BatchWhitening(8, group_size=4, momentum=MOMENTUM, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.whiten(self.hidden(x))))


def test_a_small_nnx_model_trains_with_it():
  # Three separable classes; nnx.jit training steps with nnx.Optimizer. The layer's running mean must be the
  # float64 average of the batch means of the hidden activations it saw, and eval must apply the stored S.
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 6)) * 3.0
  labels = rng.integers(0, 3, size=(10, 32))
  images = (centres[labels] + rng.normal(size=(10, 32, 6))).astype(np.float32)
  model = Classifier(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    hidden = model.hidden(x)  # what the BW layer is about to see

    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, hidden

  losses, mean = [], np.zeros(8)
  for x, y in zip(images, labels):
    loss, hidden = train_step(model, optimizer, x, y)
    losses.append(float(loss))
    mean = MOMENTUM * mean + (1 - MOMENTUM) * np.asarray(hidden, np.float64).mean(0)
  assert losses[-1] < 0.5 * losses[0], losses
  np.testing.assert_allclose(model.whiten.mean[...], mean, atol=1e-5)
  model.eval()
  h = np.asarray(model.hidden(images[0]), np.float64)
  s = np.asarray(model.whiten.whitening[...], np.float64)
  expected = np.einsum('mgj,gij->mgi', (h - np.asarray(model.whiten.mean[...])).reshape(32, 2, 4), s)
  expected = expected.reshape(32, 8) * np.asarray(model.whiten.scale[...]) + np.asarray(model.whiten.bias[...])
  np.testing.assert_allclose(model.whiten(jnp.asarray(h, jnp.float32)), expected, atol=1e-4)
  accuracy = np.mean(np.argmax(np.asarray(model(images[0])), -1) == labels[0])
  assert accuracy > 0.9, accuracy


def test_linen_and_nnx_modules_are_built_from_one_field_list():
  # The NNX constructor takes the Linen module's fields (less Linen's parent/name and
  # force_float32_reductions, plus NNX's num_features and rngs): one layer, two front ends.
  linen_fields = {f for f in bw.BatchWhitening.__dataclass_fields__} - {'parent', 'name', 'force_float32_reductions'}
  nnx_arguments = set(inspect.signature(BatchWhitening.__init__).parameters) - {'self', 'num_features', 'rngs'}
  assert nnx_arguments == linen_fields
  # And every argument of nnx.BatchNorm but its dtype-promotion and metadata hooks, in its order.
  batchnorm = [name for name in inspect.signature(nnx.BatchNorm.__init__).parameters
               if name not in ('promote_dtype', 'bias_metadata', 'scale_metadata')]
  ours = list(inspect.signature(BatchWhitening.__init__).parameters)
  assert ours[:len(batchnorm)] == batchnorm
