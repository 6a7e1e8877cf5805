"""How the command lines (`bw_jax.main`, `bw_jax.sweep`) report bad input: one `error: …` line on stderr and
exit status 2, before any long work. `--debug` or the environment variable BW_JAX_DEBUG=1 shows the
traceback instead."""

import ast
import os
import sys
from typing import NoReturn, Sequence

EXIT_USAGE = 2  # As argparse and most Unix tools: the command line or its inputs were wrong.
DEBUG_ENV = 'BW_JAX_DEBUG'


def debugging(argv: Sequence[str]) -> bool:
  return os.environ.get(DEBUG_ENV, '') not in ('', '0') or '--debug' in argv


def one_line(error: BaseException) -> str:
  """The error's message on one line, unquoted: KeyError (and config_flags' AttributeError, which wraps one)
  hold the repr of their message."""
  message = str(error.args[0]) if error.args else str(error)
  while len(message) > 1 and message[0] == message[-1] and message[0] in '\'"':
    try:
      message = str(ast.literal_eval(message))
    except (SyntaxError, ValueError):
      break
  return ' '.join(message.split()) or type(error).__name__


def exit_with_error(error: BaseException, argv: Sequence[str], prefix: str = '') -> NoReturn:
  """Re-raises `error` when debugging; else prints 'error: PREFIXmessage' and exits with EXIT_USAGE."""
  if debugging(argv):
    raise error
  print(f'error: {prefix}{one_line(error)}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)
