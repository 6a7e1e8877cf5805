"""Command line: `python -m bw_jax.convert --config=configs/finetune_fashion_mnist.py --out=DIR
[--config.init_from=SOURCE] [--config.key=value ...]`.

Converts the trained network `config.init_from` (a Keras EfficientNet .h5 file, a folder this command wrote,
or a run's workdir) into `config.model` — BatchNorm placements where the config puts BW are converted, every
other layer of the same shape keeps its weights — calibrates the BN and BW statistics on
`config.init_calibration_batches` batches of the config's train split, and saves the result in DIR
(model.json, variables.msgpack): what a training run with `--config.init_from=DIR` starts from, and what
`bw_jax.models.pretrained.load(DIR)` returns.
"""

from bw_jax.extras import exit_without_extra

exit_without_extra('bw_jax.train')  # Before the imports below need it: one line, no traceback.

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bw_jax.train.cli_errors import exit_with_error, parse_command_line
from bw_jax.train.config.files import add_config_root, config_path_in_flags
from bw_jax.train.init_from import convert_and_calibrate
from bw_jax.train.runtime import configure_cpu_dispatch

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Folder to write model.json and variables.msgpack to.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (configs/*.py): its model, dataset, '
                                'init_from and init_calibration_batches.', lock_config=True)
flags.DEFINE_bool('debug', False, 'Show the traceback of a bad-input error (also: BW_JAX_DEBUG=1).')
flags.mark_flags_as_required(['config', 'out'])
BAD_INPUT = (ValueError, FileNotFoundError)  # One `error:` line, exit status 2 (bw_jax/train/cli_errors.py).


def parse_flags(argv: list[str]) -> list[str]:
  return parse_command_line(FLAGS, argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; settings go in --config.key=value.')
  configure_cpu_dispatch()
  try:
    convert_and_calibrate(FLAGS.config, FLAGS.out)
  except BAD_INPUT as e:
    exit_with_error(e, sys.argv)


if __name__ == '__main__':
  if (config_path := config_path_in_flags(sys.argv[1:])) is not None:
    add_config_root(config_path)
  app.run(main, flags_parser=parse_flags)
