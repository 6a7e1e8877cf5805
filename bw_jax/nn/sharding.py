"""What the layer needs to know of explicit sharding (`jax.sharding.AxisType.Explicit`).

Under `jax.jit` with a mesh of explicit axes (`jax.make_mesh(..., axis_types=...)`, `jax.set_mesh`) every array's
type carries its sharding, and an operation whose result sharding is ambiguous must be told it: a product that
sums over the sharded samples (its result is replicated: the sum's all-reduce), a slice of one sample (taken
on every shard, then gathered). Outside explicit sharding (one device, `Auto` meshes, inside `shard_map` or
`pmap`) these are no-ops and XLA places the data as before.
"""

import math

import jax
from jax.sharding import PartitionSpec


def sample_axes(a: jax.Array) -> tuple[str, ...]:
  """The explicit mesh axes that shard axis 0 of `a` (the samples); () when nothing shards it explicitly."""
  spec = jax.typeof(a).sharding.spec
  entry = spec[0] if len(spec) else None
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def shard_count(axes: tuple[str, ...]) -> int:
  """How many shards the mesh axes `axes` cut an axis into (1 for none)."""
  shape = jax.sharding.get_abstract_mesh().shape
  return math.prod(shape[name] for name in axes)


def summed_sharding() -> PartitionSpec | None:
  """`out_sharding` of a product that sums over the samples: replicated under explicit mesh axes (JAX asks
  for it when the contracted axis is sharded); None elsewhere, where XLA chooses."""
  mesh = jax.sharding.get_abstract_mesh()
  return PartitionSpec() if not mesh.empty and mesh.explicit_axes else None


def rows_spec(axes: tuple[str, ...]) -> PartitionSpec:
  """The spec of an (m, ...) array whose rows are sharded over `axes` and whose other axes are whole."""
  return PartitionSpec(axes if len(axes) > 1 else axes[0])


def gathered(a: jax.Array) -> jax.Array:
  """`a` replicated on every device (an all-gather under explicit sharding; `a` itself elsewhere)."""
  if not sample_axes(a):
    return a
  return jax.sharding.reshard(a, PartitionSpec())
