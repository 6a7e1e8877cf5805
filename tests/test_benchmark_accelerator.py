"""benchmarks/accelerator.py: the --quick run on the CPU fills every section, so that the device benchmark
cannot rot; what it writes as it goes; its float64 reference."""

import json
import os
import sys

import numpy as np
import pytest

import accelerator  # benchmarks/accelerator.py (benchmarks/ is on pytest's pythonpath: pyproject.toml)
from subprocess_runs import REPO, run_process, subprocess_env

MARKDOWN_HEADERS = ('| BW on the device vs float64 NumPy |', '| B0 train step, bf16 |', '| layer shape (N×H×W×C) |')


def check_quick_results(out: str, with_pipeline: bool) -> dict:
  """The --quick run's accelerator.json and accelerator.md in `out`: every device section measured, the
  pipeline measured or (without TensorFlow) skipped in one line, nothing on the device path importing
  TensorFlow, TFDS or clu. Returns the JSON."""
  with open(os.path.join(out, 'accelerator.json')) as f:
    results = json.load(f)
  assert results['errors'] == [] and results['device_path_imported'] == []
  # float32 whitening against float64 on O(1) outputs: 8e-6 with XLA's products and 7e-5 with the CPU kernels
  # here; 1e-4 leaves room for another device's reduction order, while a wrong formula is off by O(1).
  errors = {r['method']: r['max_abs_error'] for r in results['correctness']}
  assert set(errors) == {'cholesky', 'zca'} and max(errors.values()) < 1e-4, errors
  rows = {r['row']: r for r in results['train_step']}
  assert sorted(rows) == sorted(accelerator.QUICK['train_rows'])
  for row in rows.values():
    assert row['batch'] == 8 and row['images_per_sec'] > 0 and row['loss_finite'], row
    assert 0 < row['peak_gib'] < 1  # Tiny model at 32 px.
  layer = results['layer']
  assert [r['method'] for r in layer] == ['batchnorm', 'cholesky', 'zca', 'newton']
  assert all(r['ms'] > 0 for r in layer) and layer[0]['ratio_to_bn'] == 1.0
  pipeline = results['input_pipeline']
  if with_pipeline:
    assert pipeline['dataset'] == 'imagenet2012' and pipeline['images_per_sec'] > 0
  else:
    assert pipeline == {'skipped': accelerator.PIPELINE_NEEDS_TENSORFLOW}
  assert results['devices'] == ['cpu:0'] and results['wall_s'] > 0
  with open(os.path.join(out, 'accelerator.md')) as f:
    markdown = f.read()
  assert markdown == accelerator.markdown(results)
  for header in MARKDOWN_HEADERS + (('| dataset |',) if with_pipeline else ('Input pipeline skipped: ',)):
    assert header in markdown
  return results


@pytest.mark.slow  # Compiles the tiny B0's train step and four layers: ~30 s on 2 quiet cores.
def test_quick_run_fills_every_section_and_imports_no_tensorflow_for_the_device_ones(tmp_path):
  done = run_process([sys.executable, os.path.join('benchmarks', 'accelerator.py'), '--quick', '--out',
                      str(tmp_path)], cwd=REPO, env=subprocess_env())
  assert done.returncode == 0, done.stderr[-3000:]
  results = check_quick_results(str(tmp_path), with_pipeline=True)
  assert results['bw_jax'] == os.path.join(REPO, 'bw_jax')
  assert done.stdout == accelerator.markdown(results) + '\n'


def test_results_are_saved_after_every_row_and_a_failing_row_leaves_the_others(monkeypatch):
  def train_step_row(types, method, depthwise, sizes):
    if method == 'zca':
      raise RuntimeError('planted failure\nsecond line')
    return {'batch': 8, 'images_per_sec': 100.0, 'compile_s': 1.0, 'peak_gib': 0.1, 'loss_finite': True,
            'did_not_fit': []}

  def layer_rows(sizes, deadline):
    yield [{'shape': '4×2×2×32', 'method': 'batchnorm', 'g': '-', 'ms': 1.0, 'ratio_to_bn': 1.0}]
    raise ValueError('layer failure')

  monkeypatch.setattr(accelerator, 'train_step_row', train_step_row)
  monkeypatch.setattr(accelerator, 'layer_rows', layer_rows)
  monkeypatch.setattr(accelerator, 'correctness_rows', lambda: [{'method': 'cholesky', 'max_abs_error': 1e-6,
                                                                 'device': 'cpu:0'}])
  monkeypatch.setattr(accelerator, 'is_installed', lambda module: module != 'tensorflow')
  saved = []
  sizes = dict(accelerator.QUICK, train_rows=['BN', 'BW 1/2/1 cholesky', 'BW 1/2/1 zca', 'BW 2/2/2 newton'])
  results = accelerator.run(sizes, lambda results: saved.append(json.loads(json.dumps(results))))
  # Once at the start, after the correctness check, each train-step row, the one layer shape that ran, and
  # at the end: what a run cut short at any of these points returns.
  assert len(saved) == 1 + 1 + 4 + 1 + 1
  assert 'correctness' not in saved[0] and saved[1]['correctness'][0]['max_abs_error'] == 1e-6
  assert [len(s['train_step']) for s in saved[2:6]] == [1, 2, 3, 4]
  assert [r.get('error') for r in results['train_step']] == [
      None, None, 'train step BW 1/2/1 zca: RuntimeError: planted failure', None]
  assert len(results['layer']) == 1 and results['input_pipeline'] == {
      'skipped': accelerator.PIPELINE_NEEDS_TENSORFLOW}
  assert results['errors'] == ['train step BW 1/2/1 zca: RuntimeError: planted failure',
                               'layer: ValueError: layer failure']
  assert saved[-1] == json.loads(json.dumps(results))
  markdown = accelerator.markdown(results)
  assert '| BW 1/2/1 zca | - | - | - | - | - | train step BW 1/2/1 zca: RuntimeError: planted failure |' in markdown
  assert markdown.endswith('- layer: ValueError: layer failure\n')


def test_train_step_rows_stop_at_their_share_of_the_budget(monkeypatch):
  monkeypatch.setattr(accelerator, 'correctness_rows', lambda: [])
  monkeypatch.setattr(accelerator, 'layer_rows', lambda sizes, deadline: iter([]))
  monkeypatch.setattr(accelerator, 'is_installed', lambda module: False)
  results = accelerator.run(dict(accelerator.QUICK, budget_s=0.0), lambda results: None)
  assert results['train_step'] == [{'row': 'BN', 'skipped': 'time budget spent'}]


def test_float64_reference_whitens():
  # The reference itself: its output has the identity covariance up to the ridge, S Σ Sᵀ = I − ε S Sᵀ.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(256, 2, 2, 16)) @ rng.normal(size=(16, 16))
  for method in ('cholesky', 'zca'):
    y = accelerator.float64_whitening_reference(x, method, 0.0).reshape(-1, 16)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-10)
