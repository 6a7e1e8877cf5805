"""Where the test suite's time goes: CPU seconds per test module, the pytest workers' own and their
subprocesses', from one run of `make test`'s pytest command (tests/conftest.py's BW_JAX_CPU_PROFILE lines).

  .venv/bin/python benchmarks/suite_cpu.py                   # runs the suite (~20 min here), then the tables
  .venv/bin/python benchmarks/suite_cpu.py --lines FILE      # the tables of an earlier run's lines

The suite is CPU-bound: its wall time is about its total CPU seconds over the cores, so these seconds, not the
durations pytest prints (which grow with whatever else runs at the time), say what a change to a test saves.
The compilation cache (.pytest_cache/jax_compilation) is emptied first, as a fresh clone has it, unless
--keep-cache. A subprocess counts once it has been waited for (as every test's are); what a worker does
outside any test (starting, collecting: importing the test modules) counts nowhere.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = [sys.executable, '-m', 'pytest', '-q', '-n', '2', '--dist', 'loadfile']  # The Makefile's `test`.


def run_suite(lines_path: str, keep_cache: bool, pytest_args: list[str]) -> float:
  """Runs the suite with BW_JAX_CPU_PROFILE=lines_path; its wall seconds."""
  if not keep_cache:
    shutil.rmtree(os.path.join(REPO, '.pytest_cache', 'jax_compilation'), ignore_errors=True)
  start = time.monotonic()
  done = subprocess.run([*PYTEST, *pytest_args], cwd=REPO, env={**os.environ, 'BW_JAX_CPU_PROFILE': lines_path})
  if done.returncode != 0:
    print(f'pytest exited with status {done.returncode}: the tables below miss what failed.', file=sys.stderr)
  return time.monotonic() - start


def read_lines(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def module_table(lines: list[dict], top: int) -> str:
  """Markdown: the `top` modules by CPU seconds (own + subprocesses), then the total."""
  modules = collections.defaultdict(lambda: collections.Counter())
  for line in lines:
    row = modules[line['test'].split('::')[0]]
    row.update(own=line['own_cpu'], children=line['children_cpu'], wall=line['wall'], tests=1)
  total = sum((row for row in modules.values()), collections.Counter())
  cpu = lambda row: row['own'] + row['children']
  out = ['| module | tests | CPU s | of which subprocesses | share | wall s (in the suite) |', '|---|---|---|---|---|---|']
  for name, row in sorted(modules.items(), key=lambda kv: -cpu(kv[1]))[:top]:
    out.append(f"| {name} | {row['tests']} | {cpu(row):.0f} | {row['children']:.0f} | "
               f"{cpu(row) / cpu(total):.1%} | {row['wall']:.0f} |")
  out.append(f"| all {len(modules)} modules | {total['tests']} | {cpu(total):.0f} | {total['children']:.0f} | "
             f"100% | {total['wall']:.0f} |")
  return '\n'.join(out)


def test_table(lines: list[dict], top: int) -> str:
  out = ['| test (with the module fixtures it set up) | CPU s | of which subprocesses |', '|---|---|---|']
  for line in sorted(lines, key=lambda l: -(l['own_cpu'] + l['children_cpu']))[:top]:
    out.append(f"| {line['test']} | {line['own_cpu'] + line['children_cpu']:.0f} | {line['children_cpu']:.0f} |")
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lines', help='tabulate this file of an earlier run instead of running the suite')
  parser.add_argument('--keep-cache', action='store_true', help='keep the compilation cache of earlier runs')
  parser.add_argument('--top', type=int, default=25, help='rows of each table')
  args, pytest_args = parser.parse_known_args()
  wall = None
  if args.lines:
    path = args.lines
  else:
    path = os.path.join(tempfile.mkdtemp(prefix='suite_cpu_'), 'lines.jsonl')
    wall = run_suite(path, args.keep_cache, pytest_args)
  lines = read_lines(path)
  cores = os.cpu_count()
  total = sum(l['own_cpu'] + l['children_cpu'] for l in lines)
  print(f'{len(lines)} tests, {total:.0f} CPU seconds' + (
      f' in {wall:.0f} s on {cores} CPUs ({total / wall:.2f} busy on average); lines: {path}' if wall else ''))
  print()
  print(module_table(lines, args.top))
  print()
  print(test_table(lines, args.top))


if __name__ == '__main__':
  main()
