"""JAX process settings shared by every entry point (training, sweep workers, tests, benchmarks)."""

import jax
from jax._src import xla_bridge  # Private: the only way to ask whether the CPU client exists yet.


def configure_cpu_dispatch() -> None:
  """Runs CPU computations synchronously: a call returns once its result is computed.

  Why: with jax 0.10.2's asynchronous CPU dispatch, `block_until_ready` intermittently never returned (all
  XLA threads idle) in long training and benchmark runs here (BENCHMARKS.md); synchronous dispatch has
  never hung, costs nothing visible at these step times, and times each call in the calling thread.

  JAX reads the setting once, when it creates its CPU client (the first computation, `jax.devices()`,
  `jax.device_count()`, `jax.default_backend()`, also on GPU/TPU hosts), so this must run before that;
  afterwards it raises rather than silently doing nothing. Calling it again is harmless.
  """
  if not jax.config.read('jax_cpu_enable_async_dispatch'):
    return
  backends_exist = getattr(xla_bridge, 'backends_are_initialized', lambda: False)()
  if backends_exist:
    raise RuntimeError('configure_cpu_dispatch() was called after JAX created its devices, so the CPU '
                       'client stays asynchronous; call it before the first computation or device query.')
  jax.config.update('jax_cpu_enable_async_dispatch', False)
