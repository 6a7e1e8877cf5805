"""The one dtype rule shared by the layers: sums and statistics are never taken in 16-bit floats."""

from typing import Any

import jax.numpy as jnp


def accumulation_dtype(dtype: Any) -> Any:
  """float32 for 16- and 32-bit inputs (bf16/fp16 activations are summed in float32); float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)
