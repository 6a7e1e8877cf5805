"""Command line: `python -m bw_jax.main --config=configs/default.py --workdir=DIR [--config.key=value ...]`.

Trains and evaluates (`bw_jax.train.train_and_evaluate`), resuming from the latest checkpoint in
`DIR/checkpoints`; writes `DIR/summary.json` and TensorBoard event files in `DIR`.

Multi-host: run the same command on every host with these environment variables set, and
`jax.distributed.initialize` connects the processes before anything else touches JAX:
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (e.g. 10.0.0.1:1234);
  JAX_NUM_PROCESSES        number of processes (hosts);
  JAX_PROCESS_ID           this process's index, 0 … JAX_NUM_PROCESSES − 1.
Each host then reads its own shard of every batch; `batch_size` stays the global batch.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bw_jax import train
from bw_jax.config_files import add_config_root, config_path_in_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and summary.json.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (configs/*.py).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def quiet_library_info(record: std_logging.LogRecord) -> bool:
  """Keeps the console for our progress lines: Orbax logs a dozen INFO lines per checkpoint, and JAX says
  at start-up which backends it did not find. Their warnings and errors still show."""
  noisy = ('/orbax/' in record.pathname or record.pathname.endswith('xla_bridge.py'))
  return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; settings go in --config.key=value.')
  logging.get_absl_handler().addFilter(quiet_library_info)
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  if jax.default_backend() == 'cpu':
    # jax 0.10.2's CPU client with asynchronous dispatch hung for good in block_until_ready during long runs
    # here (BENCHMARKS.md); synchronous dispatch costs nothing visible at these step times.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # Creates the workdir once the data is found.
  except FileNotFoundError as e:  # Missing data: the message says how to get it, and nothing was created.
    raise SystemExit(f'error: {e}') from None
  if jax.process_index() == 0:
    if summary.get('preempted'):
      print(f"Stopped by SIGTERM at step {summary['step']}; rerun the same command to resume.")
    else:
      print(f"eval_accuracy {summary['eval_accuracy']:.4f} after {summary['step']} steps\n"
            f"Summary: {os.path.join(FLAGS.workdir, 'summary.json')}\n"
            f'TensorBoard: tensorboard --logdir {FLAGS.workdir}')


if __name__ == '__main__':
  if (config_path := config_path_in_flags(sys.argv[1:])) is not None:
    add_config_root(config_path)  # Before the flags load it: its `from configs import …` works from anywhere.
  app.run(main)
