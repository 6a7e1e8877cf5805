"""Command line: `python -m bw_jax.main --config=configs/default.py --workdir=DIR [--config.key=value ...]`.

Trains and evaluates (`bw_jax.train.loop.train_and_evaluate`), resuming from the latest checkpoint in
`DIR/checkpoints`; writes `DIR/summary.json` and TensorBoard event files in `DIR`.

Multi-host: run the same command on every host; `jax.distributed.initialize` connects the processes
before anything else touches JAX. `--distributed` says how it learns the cluster:
  env (default)  from these environment variables, when JAX_COORDINATOR_ADDRESS is set (else one process):
    JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (e.g. 10.0.0.1:1234);
    JAX_NUM_PROCESSES        number of processes (hosts);
    JAX_PROCESS_ID           this process's index, 0 … JAX_NUM_PROCESSES − 1.
  auto           JAX detects the cluster itself: Cloud TPU pods, SLURM, Open MPI, Kubernetes jobs.
  off            one process, whatever the environment says.
Each host then reads its own shard of every batch; `batch_size` stays the global batch.
"""

import logging as std_logging
import os
import sys
from typing import Any, Mapping

from bw_jax.extras import exit_without_extra

exit_without_extra('bw_jax.train')  # Before the imports below need it: one line, no traceback.

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bw_jax.nn.kernels import KernelBuildError
from bw_jax.train import loop as train
from bw_jax.train.checkpoints import CheckpointError, CheckpointSaveError, latest_checkpoint_step
from bw_jax.train.cli_errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, debugging, exit_with_error,
                                     exiting_within_grace, parse_command_line)
from bw_jax.train.config.files import add_config_root, config_path_in_flags
from bw_jax.train.health import BWHealthError
from bw_jax.train.runtime import configure_cpu_dispatch, skip_final_garbage_collection

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and summary.json.')
DISTRIBUTED_MODES = ('env', 'auto', 'off')
flags.DEFINE_enum('distributed', 'env', DISTRIBUTED_MODES,
                  'How jax.distributed learns the cluster: env (JAX_* variables, if set), auto (Cloud TPU, '
                  'SLURM, ... detected by JAX) or off (one process).')
ENV_KEYS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_bool('debug', False, 'Show the traceback of a bad-input error (also: BW_JAX_DEBUG=1).')
flags.mark_flags_as_required(['config', 'workdir'])
# Each one line on stderr (bw_jax/train/cli_errors.py). Bad input, exit status 2: invalid or changed configs
# (ValueError), missing or damaged data (DataNotFoundError is a FileNotFoundError), no loadable checkpoint, a
# workdir that is a file, not writable or in use by another run (WorkdirError is a ValueError).
BAD_INPUT = (ValueError, FileNotFoundError, CheckpointError)
# A run that failed, exit status 1: it diverged (its values' result: rerunning does not help), a file could
# not be written (a full disk, a checkpoint that could not be saved), the machine's C++ compiler fails.
RUN_FAILURES = (train.NonFiniteLossError, BWHealthError, CheckpointSaveError, OSError, KernelBuildError)


def quiet_library_info(record: std_logging.LogRecord) -> bool:
  """Keeps the console for our progress lines: Orbax logs a dozen INFO lines per checkpoint, and JAX says
  at start-up which backends it did not find. Their warnings and errors still show."""
  noisy = ('/orbax/' in record.pathname or record.pathname.endswith('xla_bridge.py'))
  return record.levelno >= std_logging.WARNING or not noisy


def one_line_library_errors(record: std_logging.LogRecord) -> bool:
  """Cuts Orbax's error records to their first line, without the tracebacks of its threads (a failed save
  logs ~330 lines): the failure reaches the main thread, which reports it in one `error:` line. --debug
  keeps them whole."""
  if '/orbax/' in record.pathname and record.levelno >= std_logging.ERROR:
    record.msg, record.args = (record.getMessage().splitlines() or [''])[0][:300], ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def distributed_initialize_args(mode: str, environ: Mapping[str, str]) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize` (an empty dict: JAX detects the cluster), or None
  for a single process without it."""
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r} is not supported; choose one of {", ".join(DISTRIBUTED_MODES)}.')
  if mode == 'auto':
    return {}
  if mode == 'off' or not environ.get('JAX_COORDINATOR_ADDRESS'):
    return None
  missing = [key for key in ENV_KEYS if not environ.get(key)]
  if missing:
    raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {", ".join(missing)} is not: set all of '
                     f'{", ".join(ENV_KEYS)}, or pass --distributed=auto to let JAX detect the cluster.')
  return {'coordinator_address': environ['JAX_COORDINATOR_ADDRESS'],
          'num_processes': int(environ['JAX_NUM_PROCESSES']), 'process_id': int(environ['JAX_PROCESS_ID'])}


def parse_flags(argv: list[str]) -> list[str]:
  return parse_command_line(FLAGS, argv)


def stop_message(summary: dict[str, Any]) -> str:
  """What a run stopped by a signal says; the checkpoint of its step is saved."""
  if summary['signal'] == 'SIGINT':
    return (f"Stopped by Ctrl-C (SIGINT) at step {summary['step']}; its checkpoint is saved: rerun the same "
            'command to resume.')
  return (f"Stopped by SIGTERM at step {summary['step']}; its checkpoint is saved: rerun the same command to "
          f'resume (exit status {EXIT_PREEMPTED}).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; settings go in --config.key=value.')
  logging.get_absl_handler().addFilter(quiet_library_info)
  if not debugging(sys.argv):
    logging.get_absl_handler().addFilter(one_line_library_errors)
  configure_cpu_dispatch()  # Before anything creates the devices.
  initialize_args = distributed_initialize_args(FLAGS.distributed, os.environ)
  if initialize_args is not None:
    jax.distributed.initialize(**initialize_args)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # Creates the workdir once the data is found.
  except BAD_INPUT as e:
    exit_with_error(e, sys.argv)
  except RUN_FAILURES as e:
    exit_with_error(e, sys.argv, status=EXIT_FAILURE)
  except KeyboardInterrupt:  # A second Ctrl-C (the first one saves and stops).
    step = latest_checkpoint_step(FLAGS.workdir)
    kept = f'the checkpoint of step {step} is kept' if step is not None else 'no checkpoint was written'
    print(f'Ctrl-C again: stopped at once without saving; {kept}.', flush=True)
    sys.exit(EXIT_INTERRUPTED)
  if summary.get('preempted'):  # Every host: a scheduler requeues a job whose processes fail.
    if jax.process_index() == 0:
      print(stop_message(summary), flush=True)
    if jax.process_count() > 1:  # Wait for every host here: process 0's exit ends the coordination service,
      jax.distributed.shutdown()  # and a host still saving would then abort instead of exiting 143.
    sys.exit(EXIT_INTERRUPTED if summary['signal'] == 'SIGINT' else EXIT_PREEMPTED)
  if jax.process_index() == 0:
    print(f"eval_accuracy {summary['eval_accuracy']:.4f} after {summary['step']} steps\n"
          f"Summary: {os.path.join(FLAGS.workdir, 'summary.json')}\n"
          f'TensorBoard: tensorboard --logdir {FLAGS.workdir}')


if __name__ == '__main__':
  skip_final_garbage_collection()
  if (config_path := config_path_in_flags(sys.argv[1:])) is not None:
    add_config_root(config_path)  # Before the flags load it: its `from configs import …` works from anywhere.
  exiting_within_grace(lambda: app.run(main, flags_parser=parse_flags))
