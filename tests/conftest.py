"""Test-session settings."""

import jax

# jax 0.10.2 on CPU: with asynchronous dispatch, block_until_ready intermittently never returned (all XLA
# threads idle) in long benchmark runs; synchronous dispatch has never hung here, and a hung CI run would
# only show up as a time-out.
jax.config.update('jax_cpu_enable_async_dispatch', False)
