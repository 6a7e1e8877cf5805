"""Bad input on the command line: one clean `error: …` line and exit status 2 (`--debug` or BW_JAX_DEBUG=1
shows the traceback), for `python -m bw_jax.main` and `python -m bw_jax.sweep`."""

import subprocess
import sys

import pytest

from subprocess_runs import REPO, start_test_process, stop_test_process, subprocess_env

from bw_jax.sweep import __main__ as sweep_cli


def run_main(tmp_path, *flags, env=None):
  process = start_test_process(
      [sys.executable, '-m', 'bw_jax.main', '--config=configs/smoke.py', f'--workdir={tmp_path / "run"}', *flags],
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
