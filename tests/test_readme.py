"""Every Python block of README.md runs as written when pasted into a fresh interpreter, in an empty directory,
and prints what the README says it prints."""

import os
import re
import sys

import pytest

from subprocess_runs import REPO, as_a_user_runs_it, run_process, subprocess_env

README = os.path.join(REPO, 'README.md')


def python_blocks(markdown: str) -> list[str]:
  """The ```python fenced blocks of a Markdown text, in order."""
  return re.findall(r'^```python\n(.*?)^```', markdown, flags=re.S | re.M)


BLOCKS = python_blocks(open(README).read())


def test_the_readme_has_its_quickstart_blocks():
  assert len(BLOCKS) >= 2 and any('BatchWhitening' in b for b in BLOCKS) and any('EfficientNet' in b for b in BLOCKS)


def check_output(block: str, stdout: str) -> None:
  """What each kind of block must print: the whitened covariance's distance from I (the identity is the
  reference: training-mode BW makes S Σ Sᵀ = I − ε S Sᵀ), the classifier's logits shape, the NNX layer's
  output and whitening-matrix shapes, the pretrained path's conversion summary and the exported network's
  distance from the unexported one."""
  lines = stdout.strip().splitlines()
  if 'whiten(h' in block:
    deviation = float(lines[-1])
    assert 0 < deviation < 1e-3, stdout
  elif 'from_keras' in block:
    assert lines[0] == '(8, 1000)', stdout  # ImageNet's 1000 classes
    assert re.fullmatch(r'\d+ layers kept, 32 converted from BatchNorm, 32 new BW layers .*', lines[1]), stdout
    assert float(lines[-1]) < 1e-4, stdout  # folded and exported vs the unfolded network, float32 logits
  elif 'from flax import nnx' in block:
    assert lines[-1] == '(8, 4, 4, 32) (2, 16, 16)', stdout  # 2 groups of 16 channels
  elif 'EfficientNet(' in block:
    match = re.fullmatch(r'\((\d+), (\d+)\) (\d+)', lines[-1])  # logits shape, parameter count
    assert match and match.groups()[:2] == ('8', '10') and int(match.group(3)) > 0, stdout
  else:
    raise AssertionError(f'a README block this test does not know how to check:\n{block}')


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_python_block_runs_as_pasted(index, tmp_path):
  block = BLOCKS[index]
  result = run_process([sys.executable, '-c', block], cwd=tmp_path, env=as_a_user_runs_it(subprocess_env()),
                       timeout=300)
  assert result.returncode == 0, f'README block {index} failed:\n{block}\n{result.stderr[-3000:]}'
  check_output(block, result.stdout)


def test_python_blocks_are_found_in_markdown():
  text = 'intro\n```python\nprint(1)\n```\n```sh\nls\n```\n```python\nx = 2\n```\n'
  assert python_blocks(text) == ['print(1)\n', 'x = 2\n']
