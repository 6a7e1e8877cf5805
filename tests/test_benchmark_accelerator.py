"""benchmarks/accelerator.py --quick on the CPU: every section runs, so that the device benchmark cannot rot."""

import json

import numpy as np
import pytest

import accelerator  # benchmarks/accelerator.py (benchmarks/ is on pytest's pythonpath: pyproject.toml)


@pytest.mark.slow
def test_quick_run_fills_every_section(tmp_path, capsys):
  path = tmp_path / 'accelerator.json'
  accelerator.main(['--quick', '--json', str(path)])
  results = json.loads(path.read_text())
  rows = {r['row']: r for r in results['train_step']}
  assert sorted(rows) == sorted(accelerator.QUICK['train_rows'])
  for row in rows.values():
    assert row['batch'] == 8 and row['images_per_sec'] > 0 and row['loss_finite'], row
    assert 0 < row['peak_gib'] < 1  # Tiny model at 32 px.
  layer = results['layer']
  assert [r['method'] for r in layer] == ['batchnorm', 'cholesky', 'zca', 'newton']
  assert all(r['ms'] > 0 for r in layer) and layer[0]['ratio_to_bn'] == 1.0
  assert results['input_pipeline']['dataset'] == 'imagenet2012' and results['input_pipeline']['images_per_sec'] > 0
  # float32 whitening against float64 on O(1) outputs: measured 3e-6 (cholesky) and 5e-6 (zca) on this CPU;
  # 1e-4 leaves room for another device's reduction order, while a wrong formula is off by O(1).
  errors = {r['method']: r['max_abs_error'] for r in results['correctness']}
  assert set(errors) == {'cholesky', 'zca'} and max(errors.values()) < 1e-4, errors
  printed = capsys.readouterr().out
  for header in ('| B0 train step, bf16 |', '| layer shape (N×H×W×C) |', '| dataset |',
                 '| BW on the device vs float64 NumPy |'):
    assert header in printed


def test_float64_reference_whitens():
  # The reference itself: its output has the identity covariance up to the ridge, S Σ Sᵀ = I − ε S Sᵀ.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(256, 2, 2, 16)) @ rng.normal(size=(16, 16))
  for method in ('cholesky', 'zca'):
    y = accelerator.float64_whitening_reference(x, method, 0.0).reshape(-1, 16)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-10)
