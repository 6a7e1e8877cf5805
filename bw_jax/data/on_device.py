"""What happens to a batch after tf.data: copied to the devices ahead of use, normalised inside the step.

Batches leave the host as uint8 pixels (a quarter of float32's bytes to copy) and are cast and normalised
by `normalise_images` inside the jitted step, on the device. `prefetch_to_device` keeps `size` batches
in flight, already sharded over the mesh, so the copy of batch k+1 overlaps step k. It only reads ahead:
the batches and their order are those of the iterator it wraps, so training stays a function of
(seed, step) and a resumed run (a fresh iterator from `start_batch`) repeats the uninterrupted one.
"""

import collections
import itertools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Sharding
import numpy as np

DEFAULT_PREFETCH = 2  # Batches in flight: one being copied while the step uses the other.


def shard_batch(batch: dict[str, np.ndarray], sharding: Sharding) -> dict[str, jax.Array]:
  """This host's NumPy batch -> global jax.Arrays sharded by `sharding` (the copies start asynchronously)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], sharding: Sharding,
                       size: int = DEFAULT_PREFETCH) -> Iterator[dict[str, jax.Array]]:
  """`batches`, in order, as sharded global arrays, with up to `size` of them copied ahead of use.

  The next host batch is read when a batch is taken (after the step that uses the previous one has been
  dispatched), so tf.data's work also overlaps the device's. Ends when `batches` ends.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be at least 1, got {size}.')
  queue: collections.deque = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(shard_batch(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def normalise_images(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (or float) pixels (..., C) -> float32 (images − mean) / std, per channel, in pixel units.

  The same float32 operations, in the same order, as the host-side normalisation of `pipeline.py`.
  """
  images = images.astype(jnp.float32)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
