"""colab/bw_jax_explore.ipynb runs top to bottom headless with FAST on, draws its figures, and prints the
numbers an independent float64 NumPy computation and the published B0 parameter count predict."""

import copy
import os
import re
import sys

import nbformat
from nbformat.v4 import new_code_cell
import numpy as np
import pytest

from bw_jax.data import fashion_mnist
from test_efficientnet import B0_STAGES  # (expand, kernel, repeats, out_channels), written by hand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'colab', 'bw_jax_explore.ipynb')
FIGURE_CELLS = ('heatmaps', 'spectrum', 'clouds', 'running', 'curves')
EPSILON = 1e-5  # The notebook's ridge in section 2.
B0_PUBLISHED = 5_288_548  # torchvision / timm efficientnet_b0, 1000 classes

FAKE_SWEEP = """\
number,state,eval_accuracy,seconds,model.stem_type,model.mbconv_type,model.head_type,model.bw.method,learning_rate
0,COMPLETE,0.81,100,1,0,1,cholesky,0.1
1,COMPLETE,0.84,120,2,2,2,zca,0.2
2,FAIL,,5,1,3,2,pca,0.4
3,COMPLETE,0.83,110,1,2,1,cholesky,0.1
4,COMPLETE,0.79,105,2,1,1,newton,0.05
5,RUNNING,,40,1,0,2,zca,0.1
6,COMPLETE,0.85,115,1,3,2,cholesky,0.2
"""


def tagged(nb, tag: str):
  cells = [cell for cell in nb.cells if tag in cell.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def text_of(cell) -> str:
  return ''.join(out.get('text', '') for out in cell.outputs if out.output_type == 'stream')


def has_png(cell) -> bool:
  return any('image/png' in out.get('data', {}) for out in cell.outputs)


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """The notebook after a headless run with FAST on, plus cells of ours at the end: section 6 again on a
  fake results table, and the kernel's interpreter."""
  if fashion_mnist.find_files(fashion_mnist.SYSTEM_DIRS[0]) is None:
    pytest.skip('Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist')
  from nbclient import NotebookClient  # Only this test needs a kernel.

  tmp = tmp_path_factory.mktemp('colab')
  fake_csv = tmp / 'results.csv'
  fake_csv.write_text(FAKE_SWEEP)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  ours = [new_code_cell(f'SWEEP_CSV = {str(fake_csv)!r}')]
  for tag in ('sweep', 'sweep-plot'):
    ours.append(copy.deepcopy(tagged(nb, tag)))
    ours[-1].metadata['tags'] = [f'{tag}-fake']
  ours.append(new_code_cell('import sys\nprint(sys.executable)', metadata={'tags': ['interpreter']}))
  nb.cells += ours
  with pytest.MonkeyPatch.context() as env:
    env.setenv('BW_JAX_FAST', '1')
    env.setenv('TMPDIR', str(tmp))  # The training runs' working directories go here.
    env.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
    # Raises CellExecutionError, naming the cell, at the first error. The kernelspec's `python` is
    # replaced by sys.executable (jupyter_client), so the kernel runs in this interpreter's environment.
    NotebookClient(nb, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  return nb


def test_notebook_is_committed_with_its_outputs():
  """`make notebook` stores the run: every code cell executed in order, none failed, every figure drawn (the
  figures are what a reader browsing the repository sees)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), 'run `make notebook`'
  assert not [out for cell in code for out in cell.outputs if out.output_type == 'error']
  for tag in FIGURE_CELLS + ('sweep-plot',):
    assert has_png(tagged(nb, tag)), f'the committed notebook has no figure in its {tag!r} cell: run `make notebook`'


@pytest.mark.slow  # Executes the notebook.
def test_every_cell_ran_in_this_interpreter(executed):
  code = [cell for cell in executed.cells if cell.cell_type == 'code']
  assert all(cell.execution_count for cell in code)
  assert not [out for cell in code for out in cell.outputs if out.output_type == 'error']
  interpreter = text_of(tagged(executed, 'interpreter')).strip()
  assert os.path.realpath(interpreter) == os.path.realpath(sys.executable)


@pytest.mark.slow  # Executes the notebook.
@pytest.mark.parametrize('tag', FIGURE_CELLS)
def test_figures_are_drawn(executed, tag):
  assert has_png(tagged(executed, tag))


def reference_deviations() -> dict[str, float]:
  """max |cov(y) − I| for the notebook's batch, computed in float64 from the IDX files: the first 512 test
  images, normalised, cut into 4×4 patches (16 channels); y = S(x − μ) with S of Σ + εI per method."""
  images, _ = fashion_mnist.load_arrays('test', None)
  x = (images[:512].astype(np.float64) - fashion_mnist.INFO.mean[0]) / fashion_mnist.INFO.std[0]
  patches = x.reshape(-1, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 16)
  cov, eye = np.cov(patches, rowvar=False), np.eye(16)
  ridged = cov + EPSILON * eye
  w, u = np.linalg.eigh(ridged)
  y, z = ridged / np.trace(ridged), eye  # IterNorm's Newton–Schulz iteration, coupled form, T = 5
  for _ in range(5):
    t = 0.5 * (3 * eye - z @ y)
    y, z = y @ t, t @ z
  whitenings = {'cholesky': np.linalg.inv(np.linalg.cholesky(ridged)), 'zca': u @ np.diag(w ** -0.5) @ u.T,
                'pca': np.diag(w ** -0.5) @ u.T, 'newton': z / np.sqrt(np.trace(ridged))}
  deviations = {name: np.abs(s @ cov @ s.T - eye).max() for name, s in whitenings.items()}
  return {'input': np.abs(cov - eye).max(), **deviations}


@pytest.mark.slow  # Executes the notebook.
def test_section_2_output_covariance_is_the_identity(executed):
  text = text_of(tagged(executed, 'whitening-numbers'))
  printed = dict(re.findall(r'^(\w+)\s+max \|cov - I\| = (\S+)', text, re.M))
  reference = reference_deviations()
  assert set(printed) == set(reference)
  printed = {name: float(value) for name, value in printed.items()}
  np.testing.assert_allclose(printed['input'], reference['input'], rtol=1e-3)  # the same batch (≈ 0.96)
  for method in ('cholesky', 'zca', 'pca'):
    # Exact methods: only the ridge is left (eigenvalues λ/(λ+ε)): at most ε/λ_min ≈ 6e-4 in float64.
    # float32 statistics and outputs (condition number ~750) moved it by up to 1.5e-4 here: 2x margin.
    assert printed[method] <= 1e-3, (method, printed[method])
    assert abs(printed[method] - reference[method]) <= 3e-4, (method, printed[method], reference[method])
  # Newton's 5 steps leave the small eigenvalues partly unwhitened (≈ 0.61); float32 changes little.
  np.testing.assert_allclose(printed['newton'], reference['newton'], rtol=1e-2)


def b0_parameter_deltas() -> dict[tuple[int, int, int], int]:
  """Parameter change from the original B0 per (stem, mbconv, head), counted from the hand-written block
  table: BW layers have no parameters; a conv after a BW gains a bias, a BN removed loses γ and β."""
  stem_bn, head = 2 * 32, 1280
  # Stem 2: depthwise 3×3 on 3 channels (27) and a 1×1 conv 3→32 with bias (128) replace conv + BN.
  stem = (27 + 3 * 32 + 32) - (3 * 3 * 3 * 32 + stem_bn)
  mbconv = {1: 0, 3: 0}
  c_in = 32
  for expand, _, repeats, c_out in B0_STAGES:
    for _ in range(repeats):
      hidden = c_in * expand
      # Expand BN (2·hidden) → expand-conv bias (hidden); project BN (2·c_out) → project bias (c_out).
      mbconv[1] -= (hidden if expand != 1 else 0) + c_out
      mbconv[3] -= (hidden if expand != 1 else 0) + c_out + 2 * hidden  # and no depthwise BN
      c_in = c_out
  mbconv[2] = mbconv[1]  # the depthwise BN only moves
  head_delta = head - 2 * head  # head BN → head-conv bias
  return {(1, 0, 1): 0, (2, 0, 1): stem, (1, 1, 1): mbconv[1], (1, 2, 1): mbconv[2], (1, 3, 1): mbconv[3],
          (1, 0, 2): head_delta, (2, 2, 2): stem + mbconv[2] + head_delta}


@pytest.mark.slow  # Executes the notebook.
def test_section_4_parameter_counts(executed):
  text = text_of(tagged(executed, 'params'))
  headline = re.search(r'1000 classes: ([\d,]+) parameters', text)
  assert headline and int(headline.group(1).replace(',', '')) == B0_PUBLISHED
  rows = re.findall(r'^\s*([12])\s+([0-3])\s+([12])\s+(\d+)\s+(-?\d+)\s+(\d+)\s+(.+?)\s*$', text, re.M)
  counts = {tuple(map(int, row[:3])): (int(row[3]), int(row[4]), row[6]) for row in rows}
  expected = b0_parameter_deltas()
  assert set(counts) == set(expected)
  for types, delta in expected.items():
    assert counts[types][:2] == (B0_PUBLISHED + delta, delta), (types, counts[types], delta)
  # Where BW sits: 16 blocks, of which 15 expand (block 0 has expand ratio 1).
  assert counts[(1, 0, 1)][2] == '-'
  assert counts[(2, 2, 2)][2] == 'stem, 15 expand, 16 depthwise, head'


@pytest.mark.slow  # Executes the notebook.
def test_section_6_reads_a_sweep(executed):
  if os.path.isfile(os.path.join(ROOT, 'docs', 'sweep_fashion_mnist', 'results.csv')):
    assert has_png(tagged(executed, 'sweep-plot'))
  else:  # No sweep shipped: a message, no figure, no error.
    assert 'No sweep results' in text_of(tagged(executed, 'sweep'))
    assert not has_png(tagged(executed, 'sweep-plot'))
  assert '5 finished trials' in text_of(tagged(executed, 'sweep-fake'))  # FAIL and RUNNING rows left out
  assert has_png(tagged(executed, 'sweep-plot-fake'))
