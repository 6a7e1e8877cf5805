"""How the command lines (`bw_jax.main`, `bw_jax.sweep`) end: one `error: …` line on stderr for bad input
(before any long work) and for a run that failed, and an exit status that says which (`EXIT_STATUS`).
`--debug` or the environment variable BW_JAX_DEBUG=1 shows the traceback instead."""

import ast
import errno
import os
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Sequence

from bw_jax.train.config.files import config_path_in_flags

EXIT_FAILURE = 1  # The run failed: it diverged, or a file could not be written (a full disk).
EXIT_USAGE = 2  # As argparse and most Unix tools: the command line or its inputs were wrong.
EXIT_INTERRUPTED = 130  # The shell's status for a process stopped by Ctrl-C (128 + SIGINT).
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a scheduler expects of a job it stopped: saved, rerun to resume.
# A process whose exit is held up by threads that never finish (a checkpoint writer blocked after its save
# failed; Python waits for every non-daemon thread at exit) ends this many seconds after deciding to exit.
EXIT_GRACE_SECONDS = 10.0
DEBUG_ENV = 'BW_JAX_DEBUG'
# What an OS error's reason means for the user, where it is not plain.
REASON_HINTS = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is used up'}


def debugging(argv: Sequence[str]) -> bool:
  return os.environ.get(DEBUG_ENV, '') not in ('', '0') or '--debug' in argv


def os_reason(error: OSError) -> str:
  """'No space left on device (the disk is full)': the OS's words for the errno, with a hint where needed."""
  hint = REASON_HINTS.get(error.errno)
  return f'{error.strerror} ({hint})' if hint else error.strerror


def one_line(error: BaseException) -> str:
  """The error's message on one line, unquoted: KeyError (and config_flags' AttributeError, which wraps one)
  hold the repr of their message; an OS error (its args are the errno and the reason) names its path."""
  if isinstance(error, OSError) and error.strerror:
    return f'{error.filename}: {os_reason(error)}' if error.filename else os_reason(error)
  message = str(error.args[0]) if error.args else str(error)
  while len(message) > 1 and message[0] == message[-1] and message[0] in '\'"':
    try:
      message = str(ast.literal_eval(message))
    except (SyntaxError, ValueError):
      break
  return ' '.join(message.split()) or type(error).__name__


def end_within_grace(status: int) -> None:
  """Ends the process with `status` EXIT_GRACE_SECONDS from now unless it has ended by then (a daemon thread,
  which runs while Python's exit waits for the other threads)."""
  def end() -> None:
    time.sleep(EXIT_GRACE_SECONDS)
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(status)
  threading.Thread(target=end, name='end_within_grace', daemon=True).start()


def exiting_within_grace(main: Callable[[], object]) -> None:
  """Runs a command line's `main` (in its `__main__` block); when it exits with a failing status or raises,
  the process ends within EXIT_GRACE_SECONDS with that status (1 for an exception), even if threads that a
  library left behind never finish."""
  try:
    main()
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
    if status != 0:
      end_within_grace(status)
    raise
  except BaseException:
    end_within_grace(EXIT_FAILURE)
    raise


def exit_with_error(error: BaseException, argv: Sequence[str], prefix: str = '',
                    status: int = EXIT_USAGE) -> NoReturn:
  """Re-raises `error` when debugging; else prints 'error: PREFIXmessage' and exits with `status`."""
  if debugging(argv):
    raise error
  print(f'error: {prefix}{one_line(error)}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_command_line(flag_values: Any, argv: list[str]) -> list[str]:
  """absl's parsing of `argv` into `flag_values` (a command's FLAGS), with a missing --config file and a bad
  `--config.key=value` override (which config_flags raises as tracebacks: an OSError, or a bare
  AttributeError or KeyError, three chained) reported as one line."""
  from absl import flags  # The [train] extra, as every command that parses flags.

  path = config_path_in_flags(argv[1:])
  if path is not None and not os.path.isfile(path):
    exit_with_error(ValueError(f'--config={path}: no such file; give a config file such as configs/default.py.'),
                    argv)
  try:
    return flag_values(argv)
  except flags.Error as e:
    exit_with_error(e, argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    exit_with_error(e, argv, prefix='bad --config override: ')
