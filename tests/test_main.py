"""`python -m bw_jax.main --distributed=...`: how jax.distributed.initialize is called, without a cluster."""

import re

import pytest

from bw_jax import main

CLUSTER = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2'}


def test_env_mode_passes_the_jax_variables():
  assert main.distributed_initialize_args('env', {**CLUSTER, 'PATH': '/bin'}) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}


def test_env_mode_without_a_coordinator_is_one_process():
  assert main.distributed_initialize_args('env', {'JAX_NUM_PROCESSES': '4'}) is None
  assert main.distributed_initialize_args('env', {'JAX_COORDINATOR_ADDRESS': ''}) is None


def test_auto_mode_lets_jax_detect_the_cluster():
  # No arguments: JAX asks its cluster detectors (Cloud TPU, SLURM, Open MPI, Kubernetes).
  assert main.distributed_initialize_args('auto', {}) == {}
  assert main.distributed_initialize_args('auto', CLUSTER) == {}


def test_off_mode_ignores_the_environment():
  assert main.distributed_initialize_args('off', CLUSTER) is None


def test_a_partial_environment_names_what_is_missing():
  with pytest.raises(ValueError, match=re.escape('JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not')):
    main.distributed_initialize_args('env', {k: v for k, v in CLUSTER.items() if k != 'JAX_PROCESS_ID'})


def test_an_unknown_mode_lists_the_allowed_ones():
  message = "--distributed='mpi' is not supported; choose one of env, auto, off"
  with pytest.raises(ValueError, match=re.escape(message)):
    main.distributed_initialize_args('mpi', {})


def test_the_flag_offers_the_same_modes():
  assert main.FLAGS['distributed'].parser.enum_values == list(main.DISTRIBUTED_MODES)
  assert main.FLAGS['distributed'].default == 'env'
