"""A one-minute tour of Batch Whitening: `python -m bw_jax.demo` (the layer alone; `make train` trains the model).

1. Whitens correlated activations with each method and prints how far the output covariance is from I.
2. Runs training steps of the `BatchWhitening` module and shows the eval-mode output (running statistics)
   converging to the training-mode output (batch statistics).
3. Whitens real data: 4×4 pixel patches of a Fashion-MNIST batch from the input pipeline, whose 16
   neighbouring pixels are strongly correlated.
"""

import time

import jax
import jax.numpy as jnp
from bw_jax.nn import whitening as bw


def correlated_activations(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(N, H, W, C) activations with a random dense channel covariance and a non-zero mean."""
  mix_key, data_key = jax.random.split(key)
  channels = shape[-1]
  mixing = jax.random.normal(mix_key, (channels, channels)) + 2.0 * jnp.eye(channels)
  return jax.random.normal(data_key, shape) @ mixing + 0.5


def max_deviation_from_identity(y: jax.Array, group_size: int) -> float:
  _, cov = bw.batch_moments(y, group_size)
  return float(jnp.max(jnp.abs(cov - jnp.eye(group_size))))


def compare_methods(x: jax.Array, group_size: int) -> None:
  print(f'Whitening a batch of shape {x.shape} in groups of {group_size} channels')
  print(f'  {"input":12s} max |cov − I| = {max_deviation_from_identity(x, group_size):8.3f}')
  for method in bw.METHODS:
    fn = jax.jit(lambda x, method=method: bw.whiten(x, group_size, method))
    fn(x).block_until_ready()
    start = time.perf_counter()
    y = fn(x).block_until_ready()
    ms = 1e3 * (time.perf_counter() - start)
    label = f'{method} (T=5)' if method == 'newton' else method
    print(f'  {label:12s} max |cov − I| = {max_deviation_from_identity(y, group_size):8.5f}   ({ms:.1f} ms)')


def running_statistics_converge(x_shape: tuple[int, ...], group_size: int, steps: int = 30) -> None:
  module = bw.BatchWhitening(group_size=group_size, momentum=0.8, use_scale=False, use_bias=False,
                             track_health=True)
  key = jax.random.key(1)
  variables = module.init(key, jnp.zeros(x_shape), use_running_average=False)

  @jax.jit
  def step(variables, x):
    y, updates = module.apply(variables, x, use_running_average=False, mutable=['batch_stats', 'bw_health'])
    y_eval = module.apply({**variables, **updates}, x, use_running_average=True)
    return {**variables, **updates}, jnp.max(jnp.abs(y - y_eval))

  print('\nRunning statistics (momentum 0.8): |train-mode output − eval-mode output|')
  for i in range(steps):
    # The same distribution every step: one fixed mixing key, a new sample key.
    x = correlated_activations(jax.random.key(0), x_shape) + 0.1 * jax.random.normal(
        jax.random.fold_in(key, i), x_shape)
    variables, gap = step(variables, x)
    if i % 5 == 0 or i == steps - 1:
      print(f'  step {i:3d}: {float(gap):.4f}')
  health = variables['bw_health']
  print(f'  fallbacks: {int(health["fallbacks"])}, skipped updates: {int(health["skipped_updates"])}')


def whiten_fashion_mnist_patches(batch_size: int = 256) -> None:
  from bw_jax import data  # TensorFlow is slow to import: only here

  config = data.default_dataset_config('fashion_mnist')
  try:
    batches, _ = data.create_split(config, 'test', batch_size, train=False)
  except FileNotFoundError as error:
    print(f'\nSkipping the Fashion-MNIST part: {error}')
    return
  images = jnp.asarray(next(batches)['image'])  # (N, 28, 28, 1), normalised
  patches = images.reshape(-1, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 7, 7, 16)
  print(f'\nFashion-MNIST: 4×4 pixel patches of {batch_size} test images as 16 channels')
  for name, x in (('pixels', patches), ('cholesky', bw.whiten(patches, None, 'cholesky'))):
    _, cov = bw.batch_moments(x, None)
    std = jnp.sqrt(jnp.diag(cov[0]))
    correlation = cov[0] / jnp.outer(std, std)
    off_diagonal = jnp.abs(correlation - jnp.diag(jnp.diag(correlation)))
    print(f'  {name:9s} mean |correlation| between neighbouring pixels = {float(off_diagonal.mean()):.3f}')


def main() -> None:
  print(f'JAX {jax.__version__} on {jax.default_backend()}: {jax.devices()}\n')
  x = correlated_activations(jax.random.key(0), (128, 16, 16, 32))
  compare_methods(x, group_size=16)
  running_statistics_converge((64, 8, 8, 16), group_size=8)
  whiten_fashion_mnist_patches()


if __name__ == '__main__':
  main()
