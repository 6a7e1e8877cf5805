"""`python -m bw_jax.main` in other processes, for tests that kill, signal or join them (test_train_distributed).

This file is also the script those processes run, with the JAX settings of the test session:
  python tests/subprocess_runs.py PAUSE_STEP FLAGS...   `bw_jax.main FLAGS...`; when PAUSE_STEP > 0 the run
      prints PAUSED and waits for a line on stdin when it is about to log the training metrics of that step
      (on every host), so that a signal arrives at a known step.
"""

import glob
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

from bw_jax.train.runtime import configure_cpu_dispatch, skip_final_garbage_collection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEC_DYING_WITH_PARENT = os.path.join(REPO, 'tests', 'exec_dying_with_parent.py')
# The suite's persistent compilation cache: the runs here compile the same programs, so each compiles once.
COMPILATION_CACHE_DIR = os.path.join(REPO, '.pytest_cache', 'jax_compilation')
# The same settings for a child process, through JAX's environment variables.
COMPILATION_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': COMPILATION_CACHE_DIR,
                         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
# XLA's CPU compiler flags of the whole suite: tests/conftest.py puts them in the test session's XLA_FLAGS
# (`use_suite_xla_flags`), whose children inherit them, and `subprocess_env` keeps them. They select XLA's older
# CPU emitters instead of its MLIR fusion emitters, the default: the suite spends most of its CPU in XLA's
# compiler, and these compile a train step in well under the CPU time, for a somewhat slower program (figures:
# BENCHMARKS.md, "XLA CPU emitters"). They round some elementwise functions differently, so every process of the
# suite uses them, and results compared across processes agree as before. `as_a_user_runs_it` takes them out:
# the README's blocks (whose threefry inits are the older emitters' slow case) and test_package.py's installed
# wheel run with XLA's defaults. BW_JAX_TEST_XLA_DEFAULTS=1 runs the whole suite with the defaults, what users'
# processes compile with (a few minutes longer).
SUITE_XLA_FLAGS = (() if os.environ.get('BW_JAX_TEST_XLA_DEFAULTS') == '1' else
                   ('--xla_cpu_use_fusion_emitters=false',))
PAUSED = 'PAUSED'
TIMEOUT = 600  # Seconds; only a hung process gets near it.


def configure_jax(compilation_cache: bool = True) -> None:
  """The settings of tests/conftest.py and tests/test_train.py, for this process and the ones it starts."""
  configure_cpu_dispatch()
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Used once jax.distributed is initialised.
  if compilation_cache:
    jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE_DIR)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def dying_with_this_process(command: list[str]) -> list[str]:
  """`command` run through exec_dying_with_parent.py: the kernel SIGKILLs it if the thread that starts it dies,
  pytest killed included (start it from a thread that outlives it). Needs nothing installed (no setpriv)."""
  return [sys.executable, EXEC_DYING_WITH_PARENT, str(os.getpid()), *command]


def start_test_process(command: list[str], **popen_kwargs) -> subprocess.Popen:
  """`subprocess.Popen(command)` in a session of its own (`stop_test_process` kills its whole group) that dies
  with this process (`dying_with_this_process`)."""
  return subprocess.Popen(dying_with_this_process(command), start_new_session=True, **popen_kwargs)


def stop_test_process(process: subprocess.Popen) -> None:
  """Kills the process's group (it and anything it started) unless it has exited; reaps it."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  process.wait()


def with_suite_xla_flags(xla_flags: str = '') -> str:
  """`xla_flags` (an XLA_FLAGS value) with SUITE_XLA_FLAGS added where it lacks them."""
  flags = xla_flags.split()
  return ' '.join([*flags, *(flag for flag in SUITE_XLA_FLAGS if flag not in flags)])


def use_suite_xla_flags() -> None:
  """Adds SUITE_XLA_FLAGS to this process's XLA_FLAGS, which XLA reads when JAX creates its devices."""
  os.environ['XLA_FLAGS'] = with_suite_xla_flags(os.environ.get('XLA_FLAGS', ''))


def as_a_user_runs_it(env: dict[str, str]) -> dict[str, str]:
  """`env` without SUITE_XLA_FLAGS: XLA's defaults."""
  env = dict(env)
  flags = [flag for flag in env.pop('XLA_FLAGS', '').split() if flag not in SUITE_XLA_FLAGS]
  return {**env, 'XLA_FLAGS': ' '.join(flags)} if flags else env


def subprocess_env(extra: dict | None = None) -> dict[str, str]:
  """This environment for a child Python process, without the multi-host and device-count settings; the
  repository first on its PYTHONPATH, so that it imports the bw_jax and `configs` this test session does; the
  suite's compilation cache (COMPILATION_CACHE_ENV) unless `extra` sets BW_JAX_TEST_NO_CACHE; the suite's XLA
  flags (SUITE_XLA_FLAGS) added to any XLA_FLAGS of `extra`."""
  extra = dict(extra or {})
  extra['XLA_FLAGS'] = with_suite_xla_flags(extra.get('XLA_FLAGS', ''))
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                      'BW_JAX_TEST_NO_CACHE', *COMPILATION_CACHE_ENV)}
  python_path = os.pathsep.join([REPO, *filter(None, [env.get('PYTHONPATH')])])
  cache = {} if extra.get('BW_JAX_TEST_NO_CACHE') else COMPILATION_CACHE_ENV
  return {**env, **cache, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONPATH': python_path,
          **extra}


class MainRun:
  """`python -m bw_jax.main FLAGS` through this file, its stdout read as it comes; stderr (absl and Orbax
  logs, 'Restored checkpoint of step N') goes to the file `log`."""

  def __init__(self, log: str, *flags: str, pause_at: int = 0, env: dict | None = None):
    self.log = log
    with open(log, 'w') as stderr:
      self.process = start_test_process(
          [sys.executable, os.path.abspath(__file__), str(pause_at), *flags], cwd=REPO,
          env=subprocess_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    self.lines: queue.Queue = queue.Queue()
    self.stdout_lines: list[str] = []
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self) -> None:
    for line in self.process.stdout:
      self.stdout_lines.append(line)
      self.lines.put(line)
    self.lines.put(None)

  @property
  def stdout(self) -> str:
    return ''.join(self.stdout_lines)

  @property
  def stderr(self) -> str:
    with open(self.log) as f:
      return f.read()

  def failure(self, message: str) -> str:
    return f'{message}\n--- stdout:\n{self.stdout}\n--- stderr (last lines):\n' + ''.join(
        self.stderr.splitlines(keepends=True)[-40:])

  def wait_for_pause(self) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
      try:
        line = self.lines.get(timeout=max(1.0, deadline - time.monotonic()))
      except queue.Empty:
        raise AssertionError(self.failure(f'no {PAUSED} line after {TIMEOUT} s')) from None
      if line is None:
        self.process.wait()
        raise AssertionError(self.failure(f'exited with status {self.process.returncode} before pausing'))
      if line.startswith(PAUSED):
        return

  def resume(self) -> None:
    try:
      self.process.stdin.write('\n')
      self.process.stdin.flush()
    except BrokenPipeError:  # It is gone already; its exit status tells why.
      pass

  def finish(self) -> int:
    """Waits for the exit (killing the process after TIMEOUT seconds); returns the exit status."""
    try:
      self.process.wait(timeout=TIMEOUT)
    finally:
      stop_test_process(self.process)
      self.reader.join(timeout=60)
    return self.process.returncode


def run_process(args: list[str], *, timeout: float = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(args, capture_output=True, text=True)` in a new session that dies with this process;
  on time-out its whole process group is killed and TimeoutExpired raised."""
  # Not preexec_fn: Python code between fork and exec may deadlock in a process with threads (JAX has some).
  with subprocess.Popen(dying_with_this_process(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True, **kwargs) as process:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def progress_steps(stdout: str) -> list[int]:
  """The steps of the progress lines ('step 7/12  epoch …') in a run's output."""
  return [int(line.split()[1].split('/')[0]) for line in stdout.splitlines() if line.startswith('step ')]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def wait_until(condition, what: str) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f'timed out after {TIMEOUT} s waiting for {what}')
    time.sleep(0.1)


def wait_for_a_started_trial(directory: str, worker: subprocess.Popen) -> None:
  """Waits until a worker of the sweep (or comparison) in `directory` has taken a trial (its folder under
  `trials/` exists), or `worker` has exited (its exit status is the caller's to check).

  A second worker started now asks for its first trial while the first worker is still tracing and compiling
  its own (seconds), so both run trials however fast the later ones are (started after the first trial's
  compile, a second worker once found all 4 trials finished by the first); and by the time the second
  compiles, the first has mostly written the programs to the persistent cache, which the second then reads.
  """
  def started() -> bool:
    return worker.poll() is not None or bool(glob.glob(os.path.join(directory, 'trials', '*', 'train.log')))
  wait_until(started, f'a first trial in {directory}/trials')


def main_with_pause(pause_at: int, flags: list[str]) -> None:
  """Runs bw_jax.main with `flags`; when `pause_at` > 0, pauses before logging that step's train metrics."""
  import runpy

  from bw_jax.train import reporting

  if pause_at > 0:  # Before bw_jax.train.loop imports it.
    create_metric_writer = reporting.create_metric_writer

    def pausing_metric_writer(logdir):
      writer = create_metric_writer(logdir)
      write_scalars = writer.write_scalars

      def pause_then_write(step, scalars):
        if step == pause_at and any(name.startswith('train/') for name in scalars):
          print(f'{PAUSED} at step {step}', flush=True)
          sys.stdin.readline()
        return write_scalars(step, scalars)
      writer.write_scalars = pause_then_write
      return writer
    reporting.create_metric_writer = pausing_metric_writer
  sys.argv = ['bw_jax.main', *flags]
  runpy.run_module('bw_jax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  skip_final_garbage_collection()
  configure_jax(compilation_cache=not os.environ.get('BW_JAX_TEST_NO_CACHE'))
  main_with_pause(int(sys.argv[1]), sys.argv[2:])
