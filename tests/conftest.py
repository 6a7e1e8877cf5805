"""Test-session settings."""

from bw_jax.runtime import configure_cpu_dispatch

configure_cpu_dispatch()  # Before any test creates the devices; why: bw_jax/runtime.py.
