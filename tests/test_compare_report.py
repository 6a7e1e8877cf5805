"""Tests of the comparison report: the statistics (`compare_stats.py`) against scipy and hand-computed values,
and the report (`compare_report.py`) of made-up studies, one with an arm significantly better than the
baseline and one without, including the generated conclusion."""

import math
import os

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
import pandas as pd
import pytest
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bw_jax.train.config.files import load_config_file  # noqa: E402
from bw_jax.sweep import compare, compare_report, compare_stats  # noqa: E402
from bw_jax.sweep.space import check_sweep_config  # noqa: E402
from bw_jax.sweep.study import experiment_record  # noqa: E402

COMPARE_SMOKE = os.path.join(REPO, 'configs', 'sweeps', 'compare_smoke.py')
T_975_4 = 2.776445  # Student's t, 0.975 quantile, 4 degrees of freedom (printed tables).


# ----------------------------------------------------------------------------------------------------------
# Statistics on made-up tables


def test_t_interval_matches_the_textbook_formula_and_scipy():
  values = [1.0, 2.0, 3.0, 4.0, 5.0]
  estimate = compare_stats.t_interval(values)
  assert estimate.mean == 3.0 and estimate.std == pytest.approx(math.sqrt(2.5))
  half = T_975_4 * math.sqrt(2.5) / math.sqrt(5)  # = 1.963243 by hand.
  assert (estimate.low, estimate.high) == pytest.approx((3 - half, 3 + half), abs=1e-6)
  x = np.array([0.91, 0.905, 0.899, 0.912, 0.903, 0.908])
  low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
  estimate = compare_stats.t_interval(x)
  assert (estimate.low, estimate.high) == pytest.approx((low, high), abs=1e-12)
  assert compare_stats.t_interval([0.9]).n == 1 and math.isnan(compare_stats.t_interval([0.9]).low)
  assert compare_stats.t_interval([]).n == 0


def test_paired_difference_significant_case_against_hand_computation_and_scipy():
  baseline = {0: 0.80, 1: 0.81, 2: 0.79, 3: 0.82, 4: 0.80, 9: 0.5}  # Seed 9 has no pair: left out.
  arm = {s: baseline[s] + d for s, d in zip(range(5), (0.01, 0.02, 0.03, 0.04, 0.05))}
  result = compare_stats.paired_difference(arm, baseline)
  # By hand: d = 1..5 pp, mean 3 pp, sd √2.5 pp, t = 3 / (√2.5 / √5) = 4.2426 on 4 df, two-sided p = 0.01324.
  assert result.difference.n == 5 and result.difference.mean == pytest.approx(0.03)
  assert result.difference.std == pytest.approx(math.sqrt(2.5) / 100)
  half = T_975_4 * math.sqrt(2.5) / 100 / math.sqrt(5)
  assert (result.difference.low, result.difference.high) == pytest.approx((0.03 - half, 0.03 + half), abs=1e-7)
  assert result.p_value == pytest.approx(0.013236, abs=1e-5)
  a, b = [arm[s] for s in range(5)], [baseline[s] for s in range(5)]
  assert result.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
  assert result.p_value == pytest.approx(2 * stats.t.sf(3 / math.sqrt(0.5), 4), rel=1e-6)


def test_paired_difference_without_a_real_difference():
  baseline = {s: v for s, v in enumerate((0.80, 0.81, 0.79, 0.82, 0.80))}
  arm = {s: baseline[s] + d for s, d in enumerate((0.010, -0.020, 0.005, 0.000, -0.010))}
  result = compare_stats.paired_difference(arm, baseline)
  # By hand: mean −0.3 pp, sd = √(580e-6 / 4) = 0.012042, t = −0.5571 on 4 df, p = 0.607.
  assert result.difference.mean == pytest.approx(-0.003) and result.difference.std == pytest.approx(0.0120416)
  assert result.p_value == pytest.approx(0.6072, abs=1e-4)
  assert result.p_value == pytest.approx(stats.ttest_rel(list(arm.values()), list(baseline.values())).pvalue)
  assert result.difference.low < 0 < result.difference.high
  assert math.isnan(compare_stats.paired_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.7}).p_value)  # Equal d.
  assert math.isnan(compare_stats.paired_difference({0: 0.9}, {0: 0.8}).p_value)  # One pair.


def test_holm_adjustment_by_hand():
  # Sorted 0.01, 0.03, 0.04 of m = 3: 3·0.01 = 0.03; 2·0.03 = 0.06; max(0.06, 1·0.04) = 0.06.
  assert compare_stats.holm([0.04, 0.01, float('nan'), 0.03]) == pytest.approx([0.06, 0.03, float('nan'), 0.06],
                                                                              nan_ok=True)
  assert compare_stats.holm([0.6, 0.9]) == [1.0, 1.0]


def test_steps_to_target_and_the_censored_median():
  history = [[300, 0.86, 0.4], [100, 0.7, 0.9], [200, 0.85, 0.5]]
  assert compare_stats.steps_to_target(history, 0.85) == 200
  assert compare_stats.steps_to_target(history, 0.9) == math.inf
  assert compare_stats.censored_median([300, 100, 200]) == 200
  assert compare_stats.censored_median([100, 200, math.inf, math.inf]) == math.inf  # Half reached: unknown.
  assert compare_stats.censored_median([100, 200, 300, math.inf]) == 250
  assert compare_stats.censored_median([100, math.inf, 200]) == 200


# ----------------------------------------------------------------------------------------------------------
# The report of a made-up study

BASE = (0.80, 0.81, 0.79, 0.82, 0.80, 0.81)
BETTER = tuple(b + d for b, d in zip(BASE, (0.01, 0.02, 0.03, 0.04, 0.05)))
SAME = tuple(b + d for b, d in zip(BASE, (0.010, -0.020, 0.005, 0.000, -0.010)))
BASE_LOSS = (0.60, 0.58, 0.62, 0.57, 0.61, 0.59)
BETTER_LOSS = tuple(b - d for b, d in zip(BASE_LOSS, (0.02, 0.03, 0.01, 0.04, 0.02)))
SAME_LOSS = tuple(b + d for b, d in zip(BASE_LOSS, (0.01, -0.01, 0.02, -0.02, 0.0)))
ARMS = ('base: dataset.augment.flip=False', 'better: dataset.augment.flip=True',
        'same: dataset.augment.crop_padding=3')


def made_up_study(arms=ARMS, target=0.805) -> optuna.Study:
  """Seeds 0–5: `better` is 1..5 pp above `base` on seeds 0–4 and diverged on seed 5; `same` differs by
  noise on seeds 0–4 and is still running on seed 5. Two evals per run (steps 100, 200), 1000 images/s."""
  config = load_config_file(COMPARE_SMOKE)
  config.arms, config.seeds, config.target_accuracy = arms, tuple(range(6)), target
  compare.check_compare_config(config)
  sweep = compare.sweep_config(config)
  space, record = check_sweep_config(sweep), compare.compare_record(config)
  study = optuna.create_study(direction='maximize')
  study.set_user_attr('sweep', experiment_record(sweep))
  study.set_user_attr('compare', record)
  distributions = {k: CategoricalDistribution(spec[1]) for k, spec in space.items()}
  table = {'base': (BASE, BASE_LOSS), 'better': (BETTER, BETTER_LOSS), 'same': (SAME, SAME_LOSS)}
  for label, seed in record['runs']:
    params = compare.run_params(record, record['runs'].index([label, seed]))
    accuracy, loss = table[label][0], table[label][1]
    if seed >= len(accuracy):
      state = TrialState.FAIL if label == 'better' else TrialState.RUNNING
      attrs = {'outcome': 'diverged'} if label == 'better' else {}
      study.add_trial(optuna.create_trial(state=state, params=params, distributions=distributions,
                                          user_attrs=attrs))
      continue
    history = [[100, accuracy[seed] - 0.02, loss[seed] + 0.1], [200, accuracy[seed], loss[seed]]]
    study.add_trial(optuna.create_trial(
        value=accuracy[seed], params=params, distributions=distributions,
        user_attrs={'eval_accuracy': accuracy[seed], 'eval_loss': loss[seed], 'step': 200,
                    'train_images_per_sec': 1000.0, 'eval_history': history, 'seconds': 60.0}))
  return study


@pytest.fixture(scope='module')
def made_up_report(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('compare_report'))
  study = made_up_study()
  runs = compare_report.write_report(study, out)
  return study, runs, out


def test_report_tables_match_an_independent_computation(made_up_report):
  _, runs, out = made_up_report
  assert len(runs) == 18 and (runs.state == 'COMPLETE').sum() == 16
  arms = pd.read_csv(os.path.join(out, 'arms.csv')).set_index('arm')
  assert list(arms.index) == ['base', 'better', 'same']
  assert list(arms.n) == [6, 5, 5] and list(arms.failed) == [0, 1, 0]
  for label, (accuracy, loss) in {'base': (BASE, BASE_LOSS), 'better': (BETTER, BETTER_LOSS),
                                  'same': (SAME, SAME_LOSS)}.items():
    for name, values in (('accuracy', accuracy), ('loss', loss)):
      x = np.array(values[:int(arms.n[label])])
      low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
      assert arms.loc[label, [f'{name}_mean', f'{name}_std', f'{name}_ci_low', f'{name}_ci_high']].tolist() == \
          pytest.approx([x.mean(), x.std(ddof=1), low, high], abs=1e-12)
  # Target 0.805: base reaches it at step 200 on seeds 1, 3, 5 only (3 of 6: median unknown); better at
  # step 100 on seeds 1, 3, 4 and 200 on 0, 2 (median 100 steps = 100 · 16 images / 1000 images/s = 1.6 s).
  assert list(arms.reached_target) == [3, 5, 2]  # same: 0.81 (seed 0) and 0.82 (seed 3).
  assert math.isinf(arms.median_steps_to_target['base']) and arms.median_steps_to_target['better'] == 100
  assert arms.median_seconds_to_target['better'] == pytest.approx(1.6)
  assert list(arms.images_per_sec) == [1000.0] * 3


def test_report_differences_match_scipy(made_up_report):
  _, _, out = made_up_report
  differences = pd.read_csv(os.path.join(out, 'differences.csv')).set_index(['arm', 'metric'])
  for label, accuracy, loss in (('better', BETTER, BETTER_LOSS), ('same', SAME, SAME_LOSS)):
    for name, values, base in (('accuracy', accuracy, BASE), ('loss', loss, BASE_LOSS)):
      row = differences.loc[(label, name)]
      test = stats.ttest_rel(values[:5], base[:5])
      assert row.pairs == 5 and row.p_value == pytest.approx(test.pvalue, rel=1e-9)
      assert row.mean_difference == pytest.approx(np.mean(np.subtract(values[:5], base[:5])), abs=1e-12)
  p = differences.xs('accuracy', level='metric').p_value
  assert differences.xs('accuracy', level='metric').p_holm.tolist() == pytest.approx(
      [2 * min(p), max(2 * min(p), max(p))])


def test_conclusion_names_significant_and_non_significant_arms(made_up_report):
  _, _, out = made_up_report
  summary = open(os.path.join(out, 'summary.md')).read()
  conclusion = summary.split('## Conclusion')[1].split('##')[0]
  assert '`better` is significantly better: +3.00 pp (95 % CI [+1.04 pp, +4.96 pp], p = 0.0132, n = 5)' \
      in conclusion
  assert '`same` is not significantly different: -0.30 pp' in conclusion
  assert "After Holm's correction for 2 comparisons, `better` remains significant." in conclusion
  assert '`better` significantly lower' in conclusion  # Eval loss.
  assert 'Failed runs (diverged or crashed, left out of the statistics): `better` 1.' in conclusion
  assert 'Runs not complete yet (2): better/5, same/5.' in summary
  for name in compare_report.FILES:
    assert os.path.getsize(os.path.join(out, name)) > 100, name


def test_conclusion_without_a_significant_difference(tmp_path):
  compare_report.write_report(made_up_study(arms=(ARMS[0], ARMS[2])), str(tmp_path))
  conclusion = open(tmp_path / 'summary.md').read().split('## Conclusion')[1].split('##')[0]
  assert '`same` is not significantly different' in conclusion
  assert 'No arm differs from `base` at the 0.05 level' in conclusion
  assert 'significantly better' not in conclusion and 'Holm' not in conclusion


def test_conclusion_of_a_single_comparison_needs_no_correction(tmp_path):
  """One arm against the baseline (a confirmatory study): Holm's adjustment of one p-value is that p-value."""
  compare_report.write_report(made_up_study(arms=ARMS[:2]), str(tmp_path))
  conclusion = open(tmp_path / 'summary.md').read().split('## Conclusion')[1].split('##')[0]
  assert '`better` is significantly better' in conclusion
  assert 'One comparison: no correction for multiple comparisons is needed.' in conclusion
  assert 'comparisons,' not in conclusion


def test_conclusion_before_the_baseline_has_a_run(tmp_path):
  study = made_up_study()
  record = study.user_attrs['compare']
  runs, _ = compare_report.run_table(study, 0.8)
  runs = runs[runs.arm != 'base']
  arms, differences = compare_report.arm_table(runs, record), compare_report.difference_table(runs, record)
  assert list(differences.pairs) == [0, 0, 0, 0]
  assert compare_report.conclusion(arms, differences, 'base') == \
      'The baseline `base` has no complete run yet: nothing can be compared.'


def test_best_variant_per_arm_of_a_pilot():
  arms = pd.DataFrame({'arm': ['bn@0.1', 'bn@0.2', 'bw@0.1', 'bw@0.2', 'bw@0.4', 'plain'],
                       'n': [1, 1, 1, 0, 1, 1], 'accuracy_mean': [0.85, 0.87, 0.86, math.nan, 0.84, 0.9]})
  best = compare_report.best_variants(arms)
  assert best[['arm', 'best', 'accuracy']].values.tolist() == [['bn', '0.2', 0.87], ['bw', '0.1', 0.86]]
  assert best['all variants'][1] == '0.1: 0.8600, 0.4: 0.8400'  # The run that has not finished is left out.


def test_report_refuses_a_sweep_study():
  study = optuna.create_study()
  study.set_user_attr('sweep', {})
  with pytest.raises(ValueError, match='is a sweep, not a comparison'):
    compare_report.compare_record_of(study)
