"""Process settings shared by every entry point (training, sweep workers, tests, benchmarks)."""

import atexit
import gc

import jax

ASYNC_DISPATCH_OPTION = 'jax_cpu_enable_async_dispatch'


def backends_exist() -> bool:
  """Whether JAX has created its devices (clients) yet; False where this JAX's private module does not say."""
  try:
    from jax._src import xla_bridge  # Private: the only way to ask whether the CPU client exists yet.
  except ImportError:
    return False
  return getattr(xla_bridge, 'backends_are_initialized', lambda: False)()


def configure_cpu_dispatch() -> None:
  """Runs CPU computations synchronously: a call returns once its result is computed.

  Why: with jax 0.10.2's asynchronous CPU dispatch, `block_until_ready` intermittently never returned (all
  XLA threads idle) in long training and benchmark runs here (BENCHMARKS.md); synchronous dispatch has
  never hung, costs nothing visible at these step times, and times each call in the calling thread.

  JAX reads the setting once, when it creates its CPU client (the first computation, `jax.devices()`,
  `jax.device_count()`, `jax.default_backend()`, also on GPU/TPU hosts), so this must run before that;
  afterwards it raises rather than silently doing nothing. Calling it again is harmless, and so is calling it
  with a JAX that no longer has the option (nothing to turn off).
  """
  try:
    asynchronous = jax.config.read(ASYNC_DISPATCH_OPTION)
  except AttributeError:  # "Unrecognized config option": a JAX without it.
    return
  if not asynchronous:
    return
  if backends_exist():
    raise RuntimeError('configure_cpu_dispatch() was called after JAX created its devices, so the CPU '
                       'client stays asynchronous; call it before the first computation or device query.')
  jax.config.update(ASYNC_DISPATCH_OPTION, False)


def skip_final_garbage_collection() -> None:
  """Has the interpreter's exit skip the garbage collections over everything still alive (gc.freeze, run as
  an exit handler): TensorFlow's and JAX's object graphs make those cost over a CPU-second of every
  process's exit. Objects are still released by
  reference counting at exit; only cyclic garbage left at exit is not finalised, which Python does not
  promise either. Call it in an entry point's `__main__`."""
  atexit.register(gc.freeze)
