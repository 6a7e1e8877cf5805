"""Training on several devices and hosts, and runs that are killed or stopped, in real processes.

- 8 devices: two train steps of the smoke model (BW at the stem and head, BN in the blocks) on a global batch
  sharded over 8 CPU devices equal the same steps on one device, in this process; statistics taken per device
  would not.
- 2 hosts: `bw_jax.main` in two processes joined by `jax.distributed` (gloo, one CPU device each). SIGTERM
  reaches host 1 only, at step 4: JAX's preemption service has both hosts save the same later step and exit
  with status 143; the rerun on both hosts resumes from it and ends with the state of one process fed the same
  global batches, host 0's half first.
- SIGKILL: an 8-step run of `bw_jax.main` killed at step 7 resumes from checkpoint 6 and ends with the state of
  an uninterrupted run. (SIGTERM on one process: tests/test_train.py.)
The 8-device and two-host jobs start at once and run while this process computes the one-device references;
the killed run starts once those are computed, and reads their programs from the persistent cache.

This file is also the script of the 8-device process:
  python tests/test_train_distributed.py BATCHES.npz OUT.npz   saves the state after each step of BATCHES.
"""

import concurrent.futures
import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bw_jax import data
from bw_jax.train.checkpoints import saved_steps
from bw_jax.train.cli_errors import EXIT_PREEMPTED
from bw_jax.data import fashion_mnist, pipeline
from bw_jax.data.on_device import normalise_images, shard_batch
from bw_jax.train.optim import optimizer_rates
from bw_jax.train.plan import DataCounts, plan_for
from bw_jax.train.programs import programs_for
from bw_jax.train.step import TrainState, create_model, run_dropout_key
from configs import smoke
from subprocess_runs import (REPO, TIMEOUT, MainRun, configure_jax, free_port, progress_steps, start_test_process,
                             stop_test_process, subprocess_env, wait_until)

configure_jax()
pytestmark = pytest.mark.slow  # Every test here trains in several processes or on 8 devices.

DEVICES = 8
HOSTS = 2
SMOKE_STEPS = smoke.get_config().num_train_steps  # Of the two hosts' run: 6, checkpoints every 3.
TERM_STEP = 4  # Host 1 gets SIGTERM as it logs this step; the hosts agree on a later step to save.
PREEMPTION_NOTICE_SECONDS = 3  # Host 1 stays paused after the signal: its notice reaches every host first.
STEPS, KILL_STEP = 8, 7  # Of the killed run: SIGKILL at step 7, after checkpoint 6.
# The smoke model (configs/smoke.py) with three changes, passed to every run as SMOKE_FLAGS:
# - BW at the stem and the head, BN in the MBConv blocks (2/0/2, not the main job's 1/2/2): BW layers in both
#   product layouts (dense for the stem's 8 channels, batched for the head's 320) whose statistics must be
#   taken over the global batch, for about half the compile time of a BW layer in every block (this module
#   compiles the model in six processes);
# - a tenth of its learning rate: at its own, the float32 round-off of sums taken in another order (8 devices
#   or 2 hosts instead of one) grows step after step (a 1e-7 relative change of the initial parameters grew
#   ~8x in 6 steps, measured); at a tenth it stays at ~1e-6;
# - dropout, which configs/default.py turns off: each example's random mask must then land on the same example
#   on 8 devices or 2 hosts as on one, and the order of the hosts' halves in the global batch matters.
LEARNING_RATE = 0.005
DROPOUT_RATE = 0.1
STEM_TYPE, MBCONV_TYPE, HEAD_TYPE = 2, 0, 2
SMOKE_FLAGS = ('--config=configs/smoke.py', f'--config.learning_rate={LEARNING_RATE}',
               f'--config.model.dropout_rate={DROPOUT_RATE}', '--config.log_every_steps=1',
               f'--config.model.stem_type={STEM_TYPE}', f'--config.model.mbconv_type={MBCONV_TYPE}',
               f'--config.model.head_type={HEAD_TYPE}')
EVAL_EXAMPLES = 2000  # configs/smoke.py evaluates on 'test[:2000]'.
SHARDED_TOLERANCE = 1e-5
# A resumed run recomputes the same steps with the same program on the same device.
RESUMED_TOLERANCE = 1e-6


def smoke_config():
  """smoke.py with the flags of SMOKE_FLAGS and num_train_steps=STEPS (its schedule does not depend on it)."""
  config = smoke.get_config()
  config.learning_rate, config.model.dropout_rate = LEARNING_RATE, DROPOUT_RATE
  config.model.stem_type, config.model.mbconv_type, config.model.head_type = STEM_TYPE, MBCONV_TYPE, HEAD_TYPE
  config.num_train_steps = STEPS
  return config


def normalise(info):
  """train_and_evaluate's on-device normalisation of uint8 batches (normalising on the host instead rounds
  differently: ~7e-6 after 8 steps, measured)."""
  return functools.partial(normalise_images, mean=info.mean, std=info.std)


def training(config) -> tuple[TrainState, Any]:
  """`train_and_evaluate`'s initial state and train step (its very programs) on a mesh of all devices:
  step(state, batch) -> state, with batch the global NumPy batch of uint8 images."""
  info = fashion_mnist.INFO
  plan = plan_for(config, DataCounts(info.num_examples['train'], info.num_examples['test'], info.num_classes))
  programs = programs_for(plan)
  dropout_key = run_dropout_key(config.seed, programs.replicated)
  rates = optimizer_rates(plan.peak_learning_rate, config.weight_decay)
  state = programs.init(np.int32(config.seed))
  return state, lambda state, batch: programs.train_step(
      state, shard_batch(batch, programs.data_sharding), dropout_key, rates)[0]


def snapshot(params: Any, batch_stats: Any) -> dict[str, np.ndarray]:
  """{'params/…' | 'batch_stats/…': a NumPy copy} (a copy: the next step donates the state's buffers)."""
  tree = jax.device_get({'params': params, 'batch_stats': batch_stats})
  return {k: np.array(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def restore(workdir: str, step: int) -> dict[str, np.ndarray]:
  """Checkpoint `step` of `workdir` on this process's first device, as `snapshot` lays it out."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    # The devices of the run that saved it may be gone (two hosts): restore onto one of ours.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          manager.item_metadata(step))
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  return snapshot(state['params'], state['batch_stats'])


def max_differences(actual: dict, expected: dict) -> dict[str, float]:
  """{name: max |actual − expected|} over every parameter and statistic; both hold the same names."""
  assert sorted(actual) == sorted(expected)
  return {k: float(np.max(np.abs(np.asarray(actual[k], np.float64) - expected[k]))) for k in expected}


def assert_same_state(actual: dict, expected: dict, tolerance: float, what: str) -> None:
  differences = max_differences(actual, expected)
  worst = sorted(differences.items(), key=lambda kv: -kv[1])[:5]
  assert max(differences.values()) < tolerance, f'{what}: largest |differences| {worst} ≥ {tolerance:g}'


def checkpoint_steps(workdir: str) -> list[str]:
  """The saved steps as folder names, ascending (config.json and other files left out)."""
  return [str(step) for step in saved_steps(workdir)]


def sharded_steps(batches_path: str, out_path: str) -> None:
  """The steps of BATCHES.npz ('<i>/image', '<i>/label', '<i>/mask') on all devices; saves the state after
  each step i as '<i>/<name>' in OUT.npz."""
  assert jax.device_count() == DEVICES, f'expected {DEVICES} devices, got {jax.devices()}'
  stored = np.load(batches_path)
  state, step = training(smoke_config())
  out = {}
  for i in range(1, len(stored.files) // 3 + 1):
    state = step(state, {k: stored[f'{i}/{k}'] for k in ('image', 'label', 'mask')})
    out.update({f'{i}/{k}': v for k, v in snapshot(state.params, state.batch_stats).items()})
  np.savez(out_path, **out)




def train_batches(config) -> Any:
  return data.create_split(config.dataset, config.dataset.train_split, config.batch_size, train=True,
                           seed=config.seed, normalise=False)[0]


def host_batches(config, host: int, hosts: int) -> Any:
  """The training batches host `host` of `hosts` reads (what `data.create_split` yields on that host)."""
  module = data.dataset_module(config.dataset.name)
  return pipeline.batched_dataset(
      module.load(config.dataset.train_split, config.dataset), module.INFO, config.dataset.train_split,
      config.dataset, config.batch_size, train=True, seed=config.seed, process_index=host, process_count=hosts,
      device_count=hosts, train_preprocess=getattr(module, 'train_preprocess', None),
      normalise=False).as_numpy_iterator()


def per_device_statistics(config, variables: dict, batch: dict, devices: int) -> dict[str, np.ndarray]:
  """The running statistics after one step if each of `devices` normalised its own slice of `batch` with
  that slice's moments (and the statistics were then averaged over devices), laid out as `snapshot`'s."""
  model = create_model(config, fashion_mnist.INFO.num_classes)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), 0)  # train_step's at step 0

  def statistics(images):
    _, updates = model.apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key})
    return updates['batch_stats']
  images = normalise(fashion_mnist.INFO)(batch['image']).reshape(devices, -1, *batch['image'].shape[1:])
  stats = jax.device_get(jax.jit(jax.vmap(statistics))(images))
  flat = flax.traverse_util.flatten_dict({'batch_stats': stats}, sep='/')
  return {k: np.mean(v, axis=0) for k, v in flat.items()}


def evaluate_state(state: dict[str, np.ndarray]) -> tuple[float, float]:
  """(loss, accuracy) of `snapshot`-style `state` over the smoke config's eval split (the first
  EVAL_EXAMPLES test images), here on one device: float64 NumPy cross-entropy of the model's logits."""
  config = smoke_config()
  info = fashion_mnist.INFO
  assert config.dataset.eval_split == f'test[:{EVAL_EXAMPLES}]'
  images, labels = (a[:EVAL_EXAMPLES] for a in fashion_mnist.load_arrays('test', None))
  images = (images.astype(np.float32) - np.float32(info.mean[0])) / np.float32(info.std[0])
  model = create_model(config, info.num_classes)
  apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  variables = flax.traverse_util.unflatten_dict(state, sep='/')
  logits = np.asarray(apply(variables, images), np.float64)
  top = logits.max(-1)
  losses = top + np.log(np.sum(np.exp(logits - top[:, None]), -1)) - logits[np.arange(len(labels)), labels]
  return float(np.mean(losses)), float(np.mean(np.argmax(logits, -1) == labels))


@pytest.fixture(scope='module')
def straight_run():
  """STEPS uninterrupted steps on one device from the training batches of `smoke_config()`:
  {'initial': the TrainState before step 1 (NumPy), 'step': step(state, batch) -> state,
   'batches': [batch 1, …], 'states': [None, snapshot after step 1, …]}."""
  config = smoke_config()
  state, step = training(config)  # This process has one device.
  run = {'initial': jax.tree.map(np.array, state), 'step': step, 'batches': [], 'states': [None]}
  batches = train_batches(config)
  for _ in range(STEPS):
    run['batches'].append(next(batches))
    state = step(state, run['batches'][-1])
    run['states'].append(snapshot(state.params, state.batch_stats))
  return run




def gloo_missing() -> str:
  """Why processes on CPU cannot run collectives with each other here; '' when they can."""
  try:
    from jax._src.lib import _jax  # What jax's xla_bridge calls for jax_cpu_collectives_implementation='gloo'.
  except ImportError:  # Another jax layout: let the run itself tell.
    return ''
  if hasattr(_jax, 'make_gloo_tcp_collectives'):
    return ''
  return f'jaxlib {jaxlib.__version__} has no gloo CPU collectives, which two hosts on CPU need'


GLOO_MISSING = gloo_missing()


def start_eight_devices(folder) -> dict[str, Any]:
  """`sharded_steps` on the first 2 training batches, in a process with DEVICES CPU devices."""
  paths = {name: str(folder / name) for name in ('batches.npz', 'out.npz', 'eight_devices.log')}
  batches = train_batches(smoke_config())
  np.savez(paths['batches.npz'], **{f'{i}/{k}': v for i in (1, 2) for k, v in next(batches).items()})
  env = subprocess_env({'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES}'})
  with open(paths['eight_devices.log'], 'w') as log:
    process = start_test_process(
        [sys.executable, os.path.abspath(__file__), paths['batches.npz'], paths['out.npz']],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
  return {'process': process, **paths}


def start_two_hosts(folder, name: str, pause_at: tuple[int, int] = (0, 0)) -> list[MainRun]:
  """The smoke run of `bw_jax.main` on HOSTS processes joined by jax.distributed (gloo), started."""
  workdir, address = str(folder / 'two_hosts'), f'localhost:{free_port()}'
  # Gloo gives a host 30 s to join the first collective, so neither host may wait long for the other's compile:
  # in the first run both compile every program at once (LLVM at -O0 halves that time; XLA's HLO passes, which
  # decide what is computed, still run); process 0 writes them to the persistent cache, and in the rerun both
  # hosts read them from it.
  return [MainRun(str(folder / f'{name}_host{i}.log'), *SMOKE_FLAGS, f'--workdir={workdir}',
                  pause_at=pause_at[i],
                  env={'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': str(HOSTS),
                       'JAX_PROCESS_ID': str(i), 'XLA_FLAGS': '--xla_backend_optimization_level=0'})
          for i in range(HOSTS)]


def run_two_hosts(folder) -> dict[str, Any]:
  """Two hosts stopped by SIGTERM on host 1 at TERM_STEP, then rerun to the end: {'workdir', 'stopped',
  'rerun': [MainRun per host], 'after_stop': checkpoint steps then, 'saved': {step: its snapshot}}."""
  workdir = str(folder / 'two_hosts')
  stopped = start_two_hosts(folder, 'stopped', pause_at=(0, TERM_STEP))
  out = {'workdir': workdir, 'stopped': stopped, 'rerun': [], 'saved': {}}
  try:
    stopped[1].wait_for_pause()
    stopped[1].process.send_signal(signal.SIGTERM)
    # JAX's SIGTERM listener looks once a second; the hosts then agree on one past the latest step either
    # has asked about. Host 0 waits in step 5's collectives meanwhile, so that is step 5.
    time.sleep(PREEMPTION_NOTICE_SECONDS)
    stopped[1].resume()
  finally:
    for run in stopped:
      run.finish()
  out['after_stop'] = checkpoint_steps(workdir)
  if any(run.process.returncode != EXIT_PREEMPTED for run in stopped):
    return out
  # Read now: the rerun's checkpoints may replace them (keep_checkpoints=2).
  out['saved'] = {int(step): restore(workdir, int(step)) for step in out['after_stop']}
  out['rerun'] = start_two_hosts(folder, 'rerun')
  for run in out['rerun']:
    run.finish()
  return out


def run_killed(folder) -> dict[str, Any]:
  """A STEPS-step run of `bw_jax.main` killed with SIGKILL at step KILL_STEP, then rerun:
  {'workdir', 'killed', 'rerun': MainRun, 'after_kill': checkpoint steps then}."""
  workdir = str(folder / 'killed')
  flags = (*SMOKE_FLAGS, f'--workdir={workdir}', f'--config.num_train_steps={STEPS}')
  killed = MainRun(str(folder / 'killed.log'), *flags, pause_at=KILL_STEP)
  try:
    killed.wait_for_pause()
    # Orbax finalises a checkpoint in the background, renaming its temporary folder to the step number.
    wait_until(lambda: '6' in checkpoint_steps(workdir), 'checkpoint 6')
    killed.process.send_signal(signal.SIGKILL)
  finally:
    killed.finish()
  out = {'workdir': workdir, 'killed': killed, 'after_kill': checkpoint_steps(workdir)}
  out['rerun'] = MainRun(str(folder / 'rerun.log'), *flags)
  out['rerun'].finish()
  return out


@pytest.fixture(scope='module')
def background(tmp_path_factory):
  """The jobs whose programs no other process compiles, started at once as soon as a test needs one, so that
  they share the cores while this process computes the references: {'eight_devices': start_eight_devices(…),
  'two_hosts': a Future of run_two_hosts(…) (None without gloo), 'folder': where they run}."""
  folder = tmp_path_factory.mktemp('background')
  threads = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  jobs = {'eight_devices': start_eight_devices(folder),
          'two_hosts': None if GLOO_MISSING else threads.submit(run_two_hosts, folder), 'folder': folder}
  try:
    yield jobs
  finally:
    stop_test_process(jobs['eight_devices']['process'])  # Only left running when a test failed first.
    threads.shutdown()


@pytest.fixture(scope='module')
def eight_devices(background, straight_run):
  """[None, snapshot after step 1, snapshot after step 2] of the 8-device script (which runs while this
  process computes `straight_run`)."""
  job = background['eight_devices']
  job['process'].wait(timeout=TIMEOUT)
  with open(job['eight_devices.log']) as f:
    assert job['process'].returncode == 0, f'the {DEVICES}-device script failed:\n{f.read()[-5000:]}'
  stored = np.load(job['out.npz'])
  return [None] + [{k[len(f'{i}/'):]: stored[k] for k in stored.files if k.startswith(f'{i}/')} for i in (1, 2)]


@pytest.fixture(scope='module')
def two_hosts(background, straight_run):
  """run_two_hosts' result, waited for, with the one-process references: 'reference': [None, snapshot after
  step 1, …] on the same global batches; 'swapped': the last one with the hosts' halves swapped."""
  # jax.make_array_from_process_local_data puts host 0's rows first, as the mesh's devices are in process
  # order; per-example dropout makes the order matter.
  config, references = smoke_config(), {}
  for name, order in (('reference', range(HOSTS)), ('swapped', reversed(range(HOSTS)))):
    hosts = [host_batches(config, h, HOSTS) for h in order]
    state, references[name] = straight_run['initial'], [None]
    for _ in range(SMOKE_STEPS):
      parts = [next(batches) for batches in hosts]
      state = straight_run['step'](state, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
      references[name].append(snapshot(state.params, state.batch_stats))
  references['swapped'] = references['swapped'][-1]
  return {**background['two_hosts'].result(), **references}


@pytest.fixture(scope='module')
def killed(background, straight_run):
  """run_killed(…), started once `straight_run` has compiled the one-device programs it runs (the persistent
  cache then serves them: compiled at the same time, each process would compile them itself)."""
  return run_killed(background['folder'])


def test_eight_devices_match_one_device(eight_devices, straight_run):
  """Params and every BN / BW statistic after steps 1 and 2 on 8 devices equal those on one device, while
  statistics taken per device (2 examples each) would differ from them by far more than the tolerance."""
  sharded = eight_devices
  assert any(k.endswith('_bw/cov') for k in sharded[1]) and any(k.endswith('_bn/var') for k in sharded[1])
  for i in (1, 2):
    assert_same_state(sharded[i], straight_run['states'][i], SHARDED_TOLERANCE, f'step {i} on {DEVICES} devices')
  initial = straight_run['initial']
  local = per_device_statistics(smoke_config(), {'params': initial.params, 'batch_stats': initial.batch_stats},
                                straight_run['batches'][0], DEVICES)
  moments = [k for k in local if k.endswith(('/cov', '/var'))]
  worst = max(max_differences({k: local[k] for k in moments}, {k: sharded[1][k] for k in moments}).values())
  assert worst > 100 * SHARDED_TOLERANCE, f'per-device statistics are only {worst:.3g} away from global ones'


def test_run_killed_with_sigkill_resumes_from_its_last_checkpoint(killed, straight_run):
  """After SIGKILL at step 7 the checkpoints of steps 3 and 6 are there; the rerun restores step 6, trains
  steps 7 and 8, and ends with the uninterrupted run's state and a summary."""
  first, rerun = killed['killed'], killed['rerun']
  assert first.process.returncode == -signal.SIGKILL, first.failure('not killed by SIGKILL')
  assert killed['after_kill'] == ['3', '6']
  assert progress_steps(first.stdout) == list(range(1, KILL_STEP))
  assert rerun.process.returncode == 0, rerun.failure('the rerun failed')
  assert 'Restored checkpoint of step 6' in rerun.stderr
  assert progress_steps(rerun.stdout) == list(range(KILL_STEP, STEPS + 1))
  assert_same_state(restore(killed['workdir'], STEPS), straight_run['states'][STEPS], RESUMED_TOLERANCE,
                    f'step {STEPS} after resuming from step 6')
  with open(os.path.join(killed['workdir'], 'summary.json')) as f:
    assert json.load(f)['step'] == STEPS


@pytest.mark.skipif(bool(GLOO_MISSING), reason=GLOO_MISSING)
def test_sigterm_on_one_host_stops_both_at_the_same_saved_step(two_hosts):
  """SIGTERM on host 1 at step 4: both hosts save step 5 and exit with status 143 (preempted: a scheduler
  requeues the job); host 0 says so; the saved state is the one-process state of that step."""
  stopped = two_hosts['stopped']
  for i, run in enumerate(stopped):
    assert run.process.returncode == EXIT_PREEMPTED, run.failure(f'host {i} did not stop cleanly')
  said = re.findall(r'Stopped by SIGTERM at step (\d+)', stopped[0].stdout)
  assert len(said) == 1, stopped[0].failure('host 0 did not say where it stopped')
  step = int(said[0])
  assert step == TERM_STEP + 1 and two_hosts['after_stop'][-1] == str(step)
  assert progress_steps(stopped[0].stdout)[-1] == step and progress_steps(stopped[1].stdout) == []
  assert_same_state(two_hosts['saved'][step], two_hosts['reference'][step], SHARDED_TOLERANCE,
                    f'{HOSTS} hosts at step {step}')


@pytest.mark.skipif(bool(GLOO_MISSING), reason=GLOO_MISSING)
def test_two_hosts_resume_and_match_one_process(two_hosts):
  """The rerun on both hosts restores the saved step and ends with the parameters and statistics of one
  process fed the same global batches (host 0's half first); their eval covers the test split once and
  gives the loss and accuracy of the saved state evaluated here; only host 0 writes the summary, the
  TensorBoard events and the progress lines."""
  workdir, runs = two_hosts['workdir'], two_hosts['rerun']
  assert runs, 'the stopped run failed: see test_sigterm_on_one_host_stops_both_at_the_same_saved_step'
  for i, run in enumerate(runs):
    assert run.process.returncode == 0, run.failure(f'host {i} failed')
    assert f"Restored checkpoint of step {two_hosts['after_stop'][-1]}" in run.stderr
  final = restore(workdir, SMOKE_STEPS)
  assert_same_state(final, two_hosts['reference'][-1], SHARDED_TOLERANCE,
                    f'{HOSTS} hosts after {SMOKE_STEPS} steps')
  swapped = max(max_differences(final, two_hosts['swapped']).values())
  assert swapped > 10 * SHARDED_TOLERANCE, f"swapping the hosts' halves changes the state by only {swapped:.3g}"
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['step'] == SMOKE_STEPS and summary['eval_examples'] == EVAL_EXAMPLES
  loss, accuracy = evaluate_state(final)
  # Other batch layouts sum in another order: a near-tie could flip one or two of the 2,000 predictions.
  assert summary['eval_loss'] == pytest.approx(loss, rel=1e-5)
  assert summary['eval_accuracy'] == pytest.approx(accuracy, abs=1e-3)
  assert len(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))) == 2  # One per run, by host 0.
  assert progress_steps(runs[0].stdout)[-1] == SMOKE_STEPS and progress_steps(runs[1].stdout) == []


if __name__ == '__main__':
  from bw_jax.train.runtime import skip_final_garbage_collection
  skip_final_garbage_collection()
  sharded_steps(sys.argv[1], sys.argv[2])
