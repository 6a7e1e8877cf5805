"""Bad input on the command line: one clean `error: …` line and exit status 2 (`--debug` or BW_JAX_DEBUG=1
shows the traceback), for `python -m bw_jax.main` and `python -m bw_jax.sweep`."""

import errno
import functools
import os
import shutil
import subprocess
import sys

import pytest

from subprocess_runs import REPO, run_process, start_test_process, stop_test_process, subprocess_env

from bw_jax.sweep import __main__ as sweep_cli
from bw_jax.train.cli_errors import one_line


def run_main(tmp_path, *flags, env=None, workdir=None, config='configs/smoke.py', wrap=()):
  """`python -m bw_jax.main --config=CONFIG --workdir=WORKDIR FLAGS` (WORKDIR: tmp_path/run), started through
  the command `wrap` when given."""
  workdir = tmp_path / 'run' if workdir is None else workdir
  process = start_test_process(
      [*wrap, sys.executable, '-m', 'bw_jax.main', f'--config={config}', f'--workdir={workdir}', *flags],
      cwd=REPO, env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = process.communicate(timeout=300)
  finally:
    stop_test_process(process)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize('flag, message', [
    ('--config.learning_rate=inf', 'error: config.learning_rate=inf is out of range; it must lie in (0.0, inf).'),
    ('--config.learning_rat=0.1', 'error: bad --config override: \'learning_rat\' Did you mean "learning_rate" '
                                  'instead of "learning_rat"?'),
])
def test_main_prints_one_clean_line_and_exits_2(tmp_path, flag, message):
  result = run_main(tmp_path, flag)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == message and 'Traceback' not in result.stderr, result.stderr[-3000:]


def test_debug_shows_the_traceback(tmp_path):
  result = run_main(tmp_path, '--config.learning_rate=inf', env={'BW_JAX_DEBUG': '1'})
  assert result.returncode != 0 and 'Traceback' in result.stderr and 'learning_rate=inf' in result.stderr


@pytest.mark.parametrize('content, problem', [(b'', 'is empty (0 bytes)'),
                                              (b'SQLite format 3\x00' + b'\x01' * 100, 'cannot be read')])
def test_a_damaged_study_db_is_named(tmp_path, capsys, content, problem):
  (tmp_path / 'study.db').write_bytes(content)
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(['report', f'--dir={tmp_path}'])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert f'{tmp_path / "study.db"}' in err and problem in err and 'holds studies' not in err
  assert len(err.strip().splitlines()) == 1


def the_error_line(result) -> str:
  """The one `error: …` line of a refused command (status 2), the last line on stderr, with no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert [line for line in lines if line.startswith('error: ')] == lines[-1:], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[-1]


def test_an_os_error_names_its_path_and_reason():
  assert one_line(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), '/data/x.gz')) == (
      '/data/x.gz: No such file or directory')
  assert one_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/summary.json')) == (
      '/w/summary.json: No space left on device (the disk is full)')
  assert one_line(OSError(errno.EROFS, os.strerror(errno.EROFS))) == 'Read-only file system'
  assert one_line(FileNotFoundError('Fashion-MNIST not found in /data')) == 'Fashion-MNIST not found in /data'


def test_a_missing_config_file_is_one_line(tmp_path):
  line = the_error_line(run_main(tmp_path, config='configs/no_such_file.py'))
  assert line == ('error: --config=configs/no_such_file.py: no such file; give a config file such as '
                  'configs/default.py.')


@pytest.mark.parametrize('where, says', [('file', 'is a file; give a directory'),
                                         ('file/run', 'cannot be created: {tmp_path}/file is a file')])
def test_a_workdir_that_is_or_lies_under_a_file_is_one_line(tmp_path, where, says):
  (tmp_path / 'file').write_text('')
  line = the_error_line(run_main(tmp_path, workdir=tmp_path / where))
  assert line.startswith(f'error: workdir {tmp_path / where} ') and says.format(tmp_path=tmp_path) in line


@functools.cache
def private_mounts() -> str:
  """Why this process cannot mount in a private mount namespace ('' when it can): tests that need a read-only
  or a full file system mount one there, and it disappears with the process."""
  if shutil.which('unshare') is None:
    return 'unshare (util-linux) is not installed'
  done = run_process(['unshare', '--mount', '--propagation', 'private', 'mount', '-t', 'tmpfs', 'none', '/mnt'],
                     timeout=60)
  return '' if done.returncode == 0 else f'no private mounts here (needs root): {done.stderr.strip()[:200]}'


def in_private_mount(mount: str) -> tuple[str, ...]:
  """The command prefix that runs a command in a mount namespace of its own after `mount MOUNT` there."""
  return ('unshare', '--mount', '--propagation', 'private', 'sh', '-c', f'mount {mount} && exec "$@"', 'sh')


def test_a_read_only_workdir_is_one_line(tmp_path):
  if private_mounts():
    pytest.skip(private_mounts())
  (tmp_path / 'run').mkdir()
  read_only = in_private_mount(f'-o bind,ro {tmp_path / "run"} {tmp_path / "run"}')
  line = the_error_line(run_main(tmp_path, wrap=read_only))
  assert line == (f'error: workdir {tmp_path / "run"} is not writable (Read-only file system); give a directory '
                  'you can write to.')


def sweep_error(capsys, *args) -> str:
  with pytest.raises(SystemExit) as exit_:
    sweep_cli.main(list(args))
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
  return err.strip()


def test_a_sweep_dir_that_is_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  line = sweep_error(capsys, 'run', '--config=configs/sweeps/smoke.py', f'--dir={tmp_path / "file"}')
  assert line == f'error: --dir {tmp_path / "file"} is a file; give a directory (it is created if missing).'


def test_sweep_run_given_a_compare_file_names_compare_run(tmp_path, capsys):
  line = sweep_error(capsys, 'run', '--config=configs/sweeps/compare_smoke.py', f'--dir={tmp_path}')
  assert line == ('error: configs/sweeps/compare_smoke.py is a compare file (it names arms, not a search space): '
                  'run it with python -m bw_jax.sweep compare run --config=configs/sweeps/compare_smoke.py '
                  f'--dir={tmp_path}')
  line = sweep_error(capsys, 'compare', 'run', '--config=configs/sweeps/smoke.py', f'--dir={tmp_path}')
  assert line == ('error: configs/sweeps/smoke.py is a sweep file (it has a search space, not arms): run it with '
                  f'python -m bw_jax.sweep run --config=configs/sweeps/smoke.py --dir={tmp_path}')
  assert not os.listdir(tmp_path)
