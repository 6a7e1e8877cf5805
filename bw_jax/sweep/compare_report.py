"""The report of a comparison (`python -m bw_jax.sweep compare report`): every number is computed here from
the runs' own results in the study (final eval, periodic evals, images/s) by `compare_stats.py`.

Files: runs.csv (one row per run), arms.csv (per arm: n, mean, std and 95 % CI of the final eval accuracy and
loss, steps and seconds to the target accuracy, images/s), differences.csv (every arm minus the baseline,
paired by seed: mean, 95 % CI, paired t-test p and Holm's adjustment), curves.png (eval accuracy and loss
against step, mean ± std over seeds), differences.png and summary.md with a generated conclusion.
"""

import math
import os
from typing import Any

import matplotlib
matplotlib.use('Agg')  # Files only; no display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
import pandas as pd  # noqa: E402

from bw_jax.train.formatting import format_seconds  # noqa: E402
from bw_jax.sweep.compare import SEED_KEY, arm_of  # noqa: E402
from bw_jax.sweep.compare_stats import (censored_median, holm, paired_difference, steps_to_target,  # noqa: E402
                                        t_interval)
from bw_jax.sweep.report import budget_text, markdown_table, wall_seconds  # noqa: E402
from bw_jax.sweep.study import is_surplus  # noqa: E402

FILES = ('runs.csv', 'arms.csv', 'differences.csv', 'curves.png', 'differences.png')
ALPHA = 0.05
METRICS = {'accuracy': 'eval_accuracy', 'loss': 'eval_loss'}
RUN_COLUMNS = ('arm', 'seed', 'number', 'state', 'outcome', 'eval_accuracy', 'eval_loss', 'step',
               'images_per_sec', 'steps_to_target', 'seconds_to_target', 'seconds', 'evals', 'worker', 'workdir')


def compare_record_of(study: optuna.Study) -> dict[str, Any]:
  if 'compare' not in study.user_attrs:
    raise ValueError(f"Study {study.study_name!r} is a sweep, not a comparison: use `python -m bw_jax.sweep "
                     "report` for it.")
  return study.user_attrs['compare']


def current_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
  """Trials that hold a run's latest attempt: not surplus, not a failure that a retry replaced."""
  trials = study.get_trials(deepcopy=False)
  replaced = {t.system_attrs['failed_trial'] for t in trials if 'failed_trial' in t.system_attrs}
  replaced |= {n for t in trials for n in t.system_attrs.get('retry_history', [])}
  return [t for t in trials if not is_surplus(t) and t.number not in replaced]


def run_table(study: optuna.Study, target: float) -> tuple[pd.DataFrame, dict[tuple[str, int], list]]:
  """One row per run (RUN_COLUMNS) in (arm, seed) order, and each run's [[step, accuracy, loss], …]."""
  record, batch_size = compare_record_of(study), study.user_attrs['sweep']['train']['batch_size']
  rows, histories = [], {}
  for trial in current_trials(study):
    arm, attrs = arm_of(trial.params, record), trial.user_attrs
    if arm is None:  # Not a run of this comparison (e.g. the study was written by hand).
      continue
    history = attrs.get('eval_history') or []
    steps = steps_to_target(history, target) if trial.state == TrialState.COMPLETE else math.nan
    rate = attrs.get('train_images_per_sec')
    rows.append({
        'arm': arm, 'seed': trial.params[SEED_KEY], 'number': trial.number, 'state': trial.state.name,
        'outcome': attrs.get('outcome'), 'eval_accuracy': attrs.get('eval_accuracy'),
        'eval_loss': attrs.get('eval_loss'), 'step': attrs.get('step'), 'images_per_sec': rate,
        'steps_to_target': steps, 'seconds_to_target': steps * batch_size / rate if rate else math.nan,
        'seconds': attrs.get('seconds'), 'evals': len(history), 'worker': attrs.get('worker'),
        'workdir': attrs.get('workdir')})
    histories[(arm, trial.params[SEED_KEY])] = history
  order = {label: i for i, label in enumerate(record['arm_order'])}
  table = pd.DataFrame(rows, columns=RUN_COLUMNS)
  table = table.sort_values(['arm', 'seed', 'number'], key=lambda c: c.map(order) if c.name == 'arm' else c)
  return table.reset_index(drop=True), histories


def complete_runs(runs: pd.DataFrame) -> pd.DataFrame:
  return runs[runs.state == 'COMPLETE'].drop_duplicates(['arm', 'seed'], keep='first')


def values_by_seed(runs: pd.DataFrame, arm: str, column: str) -> dict[int, float]:
  done = complete_runs(runs)
  done = done[done.arm == arm]
  return dict(zip(done.seed.astype(int), done[column].astype(float)))


def overrides_text(values: dict[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in values.items())


def arm_table(runs: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
  """Per arm, in the file's order: n complete, failed runs, each metric's mean, std and 95 % CI, the runs
  that reached the target, the censored medians of steps and seconds to it, and mean images/s."""
  rows = []
  for arm in record['arm_order']:
    done, mine = complete_runs(runs), runs[runs.arm == arm]
    done = done[done.arm == arm]
    row = {'arm': arm, 'overrides': overrides_text(record['arms'][arm]), 'n': len(done),
           'failed': int((mine.state == 'FAIL').sum())}
    for name, column in METRICS.items():
      estimate = t_interval(done[column].astype(float))
      row.update({f'{name}_mean': estimate.mean, f'{name}_std': estimate.std,
                  f'{name}_ci_low': estimate.low, f'{name}_ci_high': estimate.high})
    row['reached_target'] = int(np.isfinite(done.steps_to_target.astype(float)).sum())
    row['median_steps_to_target'] = censored_median(done.steps_to_target.astype(float))
    row['median_seconds_to_target'] = censored_median(done.seconds_to_target.astype(float))
    row['images_per_sec'] = float(done.images_per_sec.astype(float).mean()) if len(done) else math.nan
    rows.append(row)
  return pd.DataFrame(rows)


def difference_table(runs: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
  """Every arm minus the baseline, per metric, over the seeds both completed; Holm over the arms of a metric."""
  baseline, rows = record['baseline'], []
  for name, column in METRICS.items():
    reference = values_by_seed(runs, baseline, column)
    metric_rows = []
    for arm in (a for a in record['arm_order'] if a != baseline):
      result = paired_difference(values_by_seed(runs, arm, column), reference)
      d = result.difference
      metric_rows.append({'arm': arm, 'metric': name, 'pairs': d.n, 'mean_difference': d.mean, 'std': d.std,
                          'ci_low': d.low, 'ci_high': d.high, 'p_value': result.p_value})
    for row, adjusted in zip(metric_rows, holm([r['p_value'] for r in metric_rows])):
      row['p_holm'] = adjusted
    rows += metric_rows
  columns = ['arm', 'metric', 'pairs', 'mean_difference', 'std', 'ci_low', 'ci_high', 'p_value', 'p_holm']
  return pd.DataFrame(rows, columns=columns)


def points(value: float) -> str:
  """An accuracy difference in percentage points: '+0.42 pp'."""
  return f'{100 * value:+.2f} pp'


def difference_sentence(row: Any, alpha: float) -> str:
  """'`bw` is significantly better: +0.42 pp (95 % CI [...], p = 0.01, n = 5)' for a testable row."""
  arm = f'`{row.arm}`'
  estimate = (f'{points(row.mean_difference)} (95 % CI [{points(row.ci_low)}, {points(row.ci_high)}], '
              f'p = {row.p_value:.3g}, n = {row.pairs})')
  if row.p_value < alpha:
    return f"{arm} is significantly {'better' if row.mean_difference > 0 else 'worse'}: {estimate}"
  return f'{arm} is not significantly different: {estimate}'


def conclusion(arms: pd.DataFrame, differences: pd.DataFrame, baseline: str, alpha: float = ALPHA) -> str:
  """One plain-language paragraph from the tables: the baseline's accuracy, every arm's paired difference in
  accuracy and whether it is significant at `alpha`, what survives Holm's correction, and the loss."""
  base = arms.set_index('arm').loc[baseline]
  if not base.n:
    return f'The baseline `{baseline}` has no complete run yet: nothing can be compared.'
  accuracy = differences[differences.metric == 'accuracy']
  text = [f'The baseline `{baseline}` reached a final eval accuracy of {base.accuracy_mean:.4f} '
          f"(mean of {base.n} seed{'s' if base.n > 1 else ''}" +
          (f', 95 % CI [{base.accuracy_ci_low:.4f}, {base.accuracy_ci_high:.4f}]).' if base.n > 1 else ').')]
  if accuracy.empty:
    return text[0]
  tested, untested = accuracy[accuracy.p_value.notna()], accuracy[accuracy.p_value.isna()]
  if not tested.empty:
    text.append('Against it, paired by seed (differences in percentage points of accuracy): ' +
                '; '.join(difference_sentence(row, alpha) for row in tested.itertuples()) + '.')
  if not untested.empty:
    text.append('Not testable (fewer than two paired seeds, or identical differences): ' + ', '.join(
        f'`{r.arm}`' + (f' ({points(r.mean_difference)})' if r.pairs else ' (no pair yet)')
        for r in untested.itertuples()) + '.')
  significant = accuracy[accuracy.p_value < alpha]
  tests = int(accuracy.p_value.notna().sum())
  if significant.empty:
    text.append(f'No arm differs from `{baseline}` at the {alpha} level: with these seeds the data cannot '
                'tell them apart, which is not the same as showing they are equal.')
  elif tests == 1:  # Holm's adjustment of a single p-value is that p-value.
    text.append('One comparison: no correction for multiple comparisons is needed.')
  else:
    survivors = significant[significant.p_holm < alpha]
    names = ', '.join(f'`{a}`' for a in survivors.arm)
    text.append(f"After Holm's correction for {tests} comparisons, " +
                (f'{names} remain{"s" if len(survivors) == 1 else ""} significant.' if names
                 else 'none remains significant.'))
  loss = differences[(differences.metric == 'loss') & (differences.p_value < alpha)]
  text.append('Eval loss: ' + ('; '.join(f"`{r.arm}` significantly {'lower' if r.mean_difference < 0 else 'higher'}"
                                         f' ({r.mean_difference:+.4f}, p = {r.p_value:.3g})'
                                         for r in loss.itertuples()) + '.' if not loss.empty
                               else f'no arm differs from the baseline at the {alpha} level.'))
  failed = arms[arms.failed > 0]
  if not failed.empty:
    text.append('Failed runs (diverged or crashed, left out of the statistics): ' +
                ', '.join(f'`{r.arm}` {r.failed}' for r in failed.itertuples()) + '.')
  return ' '.join(text)


def best_variants(arms: pd.DataFrame) -> pd.DataFrame:
  """For labels `name@variant` (a pilot, e.g. `bn@0.4`): per name, the variant with the highest mean final
  eval accuracy, and every variant's accuracy in label order."""
  named = arms[arms.arm.str.contains('@') & (arms.n > 0)]
  rows = []
  for name, group in named.groupby(named.arm.str.split('@').str[0], sort=False):
    best = group.loc[group.accuracy_mean.idxmax()]
    rows.append({'arm': name, 'best': best.arm.split('@', 1)[1], 'accuracy': best.accuracy_mean,
                 'all variants': ', '.join(f"{r.arm.split('@', 1)[1]}: {r.accuracy_mean:.4f}"
                                           for r in group.itertuples())})
  return pd.DataFrame(rows, columns=['arm', 'best', 'accuracy', 'all variants'])


def mean_std_by_step(histories: list[list], column: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, std over the runs that evaluated at each step) for column 1 (accuracy) or 2 (loss)."""
  by_step: dict[int, list[float]] = {}
  for history in histories:
    for entry in history:
      by_step.setdefault(int(entry[0]), []).append(float(entry[column]))
  steps = np.array(sorted(by_step))
  values = [np.array(by_step[s]) for s in steps]
  return (steps, np.array([v.mean() for v in values]),
          np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]))


def plot_curves(runs: pd.DataFrame, histories: dict, record: dict[str, Any], target: float, path: str) -> None:
  """Eval accuracy and loss against step: per arm the mean over its complete runs, ± one std as a band."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  done = complete_runs(runs)
  for arm in record['arm_order']:
    runs_of_arm = [histories[(arm, seed)] for seed in done[done.arm == arm].seed]
    if not any(runs_of_arm):
      continue
    for ax, column in zip(axes, (1, 2)):
      steps, mean, std = mean_std_by_step(runs_of_arm, column)
      line, = ax.plot(steps, mean, marker='.', label=f'{arm} (n={len(runs_of_arm)})')
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
  axes[0].axhline(target, color='grey', linestyle=':', linewidth=1, label=f'target {target}')
  for ax, name in zip(axes, ('eval accuracy', 'eval loss')):
    ax.set_xlabel('training step')
    ax.set_ylabel(f'{name} (mean ± std over seeds)')
  # Early evals of a run that nearly diverged reach losses of 1e6 while the final ones differ in the second
  # digit: only a log axis shows both.
  axes[1].set_yscale('log')
  handles, labels = axes[0].get_legend_handles_labels()  # Beside the axes: inside, it hid the curves.
  fig.legend(handles, labels, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)
  fig.suptitle('Eval curves per arm')
  _save(fig, path)


def plot_differences(differences: pd.DataFrame, baseline: str, path: str) -> None:
  """Each arm's paired accuracy difference against the baseline with its 95 % CI."""
  accuracy = differences[differences.metric == 'accuracy']
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * max(len(accuracy), 1)))
  y = np.arange(len(accuracy))
  ax.errorbar(100 * accuracy.mean_difference, y, color='#08519c', fmt='o', capsize=4,
              xerr=100 * np.abs(np.array([accuracy.mean_difference - accuracy.ci_low,
                                          accuracy.ci_high - accuracy.mean_difference], dtype=float)))
  ax.axvline(0, color='grey', linewidth=1)
  ax.set_yticks(y, [f'{r.arm} (p={r.p_value:.2g})' for r in accuracy.itertuples()])
  ax.invert_yaxis()
  ax.set_xlabel(f'eval accuracy − {baseline}, percentage points (mean and 95 % CI over paired seeds)')
  ax.set_title(f'Difference from the baseline `{baseline}`')
  _save(fig, path)


def _save(fig: Any, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches='tight')  # 'tight' keeps a legend placed beside the axes.
  plt.close(fig)


def plus_minus(mean: float, std: float, digits: int = 4) -> str:
  return '' if math.isnan(mean) else f'{mean:.{digits}f}' + ('' if math.isnan(std) else f' ± {std:.{digits}f}')


def interval(low: float, high: float, digits: int = 4) -> str:
  return '' if math.isnan(low) else f'[{low:.{digits}f}, {high:.{digits}f}]'


def readable_arm_table(arms: pd.DataFrame) -> pd.DataFrame:
  """arms.csv for people: mean ± std and the CI in one cell each."""
  median = lambda v, f: '' if math.isnan(v) else ('not reached' if math.isinf(v) else f(v))
  return pd.DataFrame({
      'arm': arms.arm, 'runs (failed)': [f'{r.n} ({r.failed})' for r in arms.itertuples()],
      'eval accuracy': [plus_minus(r.accuracy_mean, r.accuracy_std) for r in arms.itertuples()],
      'accuracy 95 % CI': [interval(r.accuracy_ci_low, r.accuracy_ci_high) for r in arms.itertuples()],
      'eval loss': [plus_minus(r.loss_mean, r.loss_std) for r in arms.itertuples()],
      'loss 95 % CI': [interval(r.loss_ci_low, r.loss_ci_high) for r in arms.itertuples()],
      'reached target': [f'{r.reached_target}/{r.n}' for r in arms.itertuples()],
      'steps to target': [median(r.median_steps_to_target, lambda v: f'{v:.0f}') for r in arms.itertuples()],
      'seconds to target': [median(r.median_seconds_to_target, format_seconds) for r in arms.itertuples()],
      'images/s': [f'{r.images_per_sec:.0f}' if r.images_per_sec == r.images_per_sec else ''
                   for r in arms.itertuples()]})


def readable_difference_table(differences: pd.DataFrame) -> pd.DataFrame:
  """differences.csv for people: accuracy in percentage points, loss as is."""
  rows = []
  for r in differences.itertuples():
    scale, unit = (100, ' pp') if r.metric == 'accuracy' else (1, '')
    p = lambda v: '' if math.isnan(v) else f'{v:.3g}'
    rows.append({'arm': r.arm, 'metric': r.metric, 'pairs': r.pairs,
                 'difference': '' if math.isnan(r.mean_difference) else f'{scale * r.mean_difference:+.3f}{unit}',
                 '95 % CI': interval(scale * r.ci_low, scale * r.ci_high, 3), 'p (paired t)': p(r.p_value),
                 'p (Holm)': p(r.p_holm)})
  return pd.DataFrame(rows, columns=['arm', 'metric', 'pairs', 'difference', '95 % CI', 'p (paired t)',
                                     'p (Holm)'])


def summary_markdown(study: optuna.Study, runs: pd.DataFrame, arms: pd.DataFrame, differences: pd.DataFrame,
                     target: float) -> str:
  record, sweep = compare_record_of(study), study.user_attrs['sweep']
  missing = [f'{arm}/{seed}' for arm, seed in record['runs']
             if complete_runs(runs).query('arm == @arm and seed == @seed').empty]
  seconds = runs.seconds.dropna().astype(float)
  machines = '; '.join(f"{name.split(' ', 1)[1]}: {m['cpus']} CPUs, {m['devices']}, {m['platform']}"
                       for name, m in sorted(study.user_attrs.items()) if name.startswith('machine '))
  lines = [f"# Comparison `{study.study_name}`", '',
           f"{len(record['arm_order'])} arms × {len(record['seeds'])} seeds (seeds {record['seeds']}); each run "
           f"{budget_text(sweep)}; baseline `{record['baseline']}`. Training time {format_seconds(seconds.sum())} "
           f"in all; {format_seconds(wall_seconds(study))} from the first start to the last finish. "
           f"Machines: {machines or 'not recorded'}.", '',
           '## Conclusion', '', conclusion(arms, differences, record['baseline']), '',
           '## Arms', '', markdown_table(arms[['arm', 'overrides']]), '']
  variants = best_variants(arms)
  if not variants.empty:
    lines += ['## Best variant per arm', '', markdown_table(variants), '',
              'The variant (after `@` in the label) with the highest mean final eval accuracy of each arm.', '']
  lines += ['## Final eval accuracy and loss per arm', '', markdown_table(readable_arm_table(arms)), '',
            '## Paired differences against the baseline', '',
            markdown_table(readable_difference_table(differences)), '',
            '![paired differences](differences.png)', '', '## Eval curves', '', '![eval curves](curves.png)', '',
            '## How the numbers are computed', '',
            '- mean ± std (sample, ddof 1) and the t-based 95 % CI, mean ± t₀.₉₇₅,ₙ₋₁·std/√n, of the final eval '
            'of each complete run; failed runs (diverged, or crashed more often than retried) are counted, '
            'not averaged.',
            '- Paired difference: arm − baseline for each seed both completed (same seed: same initialisation '
            'seed and data order); 95 % CI as above; p from the paired t-test (`scipy.stats.ttest_rel`); '
            "p (Holm): Holm's step-down adjustment over the arms of one metric.",
            f'- Steps to target: the first periodic eval with accuracy ≥ {target}; median over runs, infinite '
            'when half or more never reached it. Seconds to target: those steps × batch size ÷ the run\'s '
            'steady-state training images/s (compilation and evals excluded; images/s depend on the machine '
            'and its load).', '']
  if missing:
    lines += [f'Runs not complete yet ({len(missing)}): {", ".join(missing)}. Start `compare run` again to '
              'finish them.', '']
  lines += ['Written by `python -m bw_jax.sweep compare report`; every run is a row of runs.csv.', '']
  return '\n'.join(lines)


def write_report(study: optuna.Study, out: str, target_accuracy: float | None = None) -> pd.DataFrame:
  """Writes summary.md and FILES into `out`; returns the run table."""
  record = compare_record_of(study)
  target = record['target_accuracy'] if target_accuracy is None else target_accuracy
  os.makedirs(out, exist_ok=True)
  runs, histories = run_table(study, target)
  arms, differences = arm_table(runs, record), difference_table(runs, record)
  runs.to_csv(os.path.join(out, FILES[0]), index=False)
  arms.to_csv(os.path.join(out, FILES[1]), index=False)
  differences.to_csv(os.path.join(out, FILES[2]), index=False)
  plot_curves(runs, histories, record, target, os.path.join(out, FILES[3]))
  plot_differences(differences, record['baseline'], os.path.join(out, FILES[4]))
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(summary_markdown(study, runs, arms, differences, target))
  return runs
