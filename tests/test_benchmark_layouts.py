"""benchmarks/common.forced_layout: a step compiled inside it keeps the forced layout after it ends (the
benchmark's rows are what their labels say)."""

import jax
import pytest

import bw_layer  # benchmarks/bw_layer.py
from bw_jax.nn import kernels, whitening
from common import XLA_PRODUCTS, forced_layout  # benchmarks/common.py

KERNEL_CALLS = ('BwGroupCross', 'BwGroupTransform', 'BwCholeskyTrials')


def custom_calls(compiled) -> set[str]:
  text = compiled.as_text()
  return {name for name in KERNEL_CALLS if name in text}


@pytest.mark.skipif(not kernels.available(), reason=f'no CPU kernels: {kernels.unavailable_reason()}')
def test_a_step_compiled_under_the_xla_pseudo_layout_runs_without_the_kernels():
  x = jax.random.normal(jax.random.key(0), (16, 2, 2, 32))
  module = whitening.BatchWhitening(group_size=16, use_running_average=False)
  with forced_layout(XLA_PRODUCTS):
    forced, args = bw_layer.compiled_training_step(module, x)
  default, _ = bw_layer.compiled_training_step(module, x)
  assert custom_calls(forced) == set() and custom_calls(default) == set(KERNEL_CALLS)
  forced(*args)  # What the benchmark times: the executable compiled inside, called outside.
  assert custom_calls(forced) == set()
