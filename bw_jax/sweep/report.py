"""What a sweep found: `write_report` writes results.csv, summary.md and PNG plots from the Optuna study that
`python -m bw_jax.sweep run` wrote (`promote.py` turns the winners into configs).

results.csv has one row per trial (surplus trials, which never trained, are left out) and the columns
`number`, `state`, `eval_accuracy`, `eval_loss`, `seconds`, `step`, `bw_fallbacks` (whitening fallbacks
counted by the trial's BW layers), `flags` (why a trial counts as broken, below), one per search-space key
named by its full config key (`model.stem_type`, `model.bw.method`, `learning_rate`, …; the three block types
always), then `retried_from`, `resumed_from_step`, `worker`, `outcome` (of a failed trial: diverged, crashed,
preempted), `error`, `workdir`, `num_classes`.

A trial is flagged as broken, and left out of the rankings, the block-type table and `promote`, when its
eval loss is not finite or above ABSURD_LOSS_FACTOR · ln(num_classes) (a model far worse than guessing), or
when a BW layer fell back from whitening: its accuracy says nothing about its values.
"""

import os
from typing import Any

import matplotlib
matplotlib.use('Agg')  # Files only; no display.
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from bw_jax.train.formatting import format_seconds  # noqa: E402
from bw_jax.sweep.space import BLOCK_KEYS, display_order, flatten_space  # noqa: E402
from bw_jax.sweep.study import is_retry, is_surplus, original_number  # noqa: E402

PLOTS = ('accuracy_by_block_type.png', 'param_importances.png', 'optimization_history.png')
BLOCK_NAMES = {'model.stem_type': 'stem', 'model.mbconv_type': 'MBConv', 'model.head_type': 'head'}
TRIAL_COLUMNS = ('number', 'state', 'eval_accuracy', 'eval_loss', 'seconds', 'step', 'bw_fallbacks')
ATTR_COLUMNS = ('resumed_from_step', 'worker', 'outcome', 'error', 'workdir', 'num_classes')
# Chance-level cross-entropy is ln(num_classes); ten times that is a model that is confidently wrong.
ABSURD_LOSS_FACTOR = 10.0


def space_keys(study: optuna.Study) -> list[str]:
  """The three block types (searched or not), then the other search-space keys."""
  return display_order(list(BLOCK_KEYS) + list(flatten_space(study.user_attrs['sweep']['search_space'])))


def objective_of(study: optuna.Study) -> tuple[str, bool]:
  """('eval_accuracy', True): the objective column and whether it is maximised."""
  return study.user_attrs['sweep']['objective'], study.direction == optuna.study.StudyDirection.MAXIMIZE


def study_num_classes(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
  """The class count the trial trained on: recorded by its worker, else the sweep's model.num_classes, else
  the dataset's published count (studies written before workers recorded it)."""
  if trial.user_attrs.get('num_classes'):
    return int(trial.user_attrs['num_classes'])
  train = study.user_attrs['sweep']['train']
  if train['model'].get('num_classes'):
    return int(train['model']['num_classes'])
  from bw_jax.data import dataset_module
  return dataset_module(train['dataset']['name']).INFO.num_classes


def trial_flags(eval_loss: float | None, bw_fallbacks: int | None, num_classes: int) -> str:
  """Why a trial's result cannot be trusted ('' when nothing is wrong), e.g. 'eval loss 1.1e+07 > 10·ln(10)'."""
  flags = []
  if eval_loss is not None and not np.isfinite(eval_loss):
    flags.append(f'eval loss {eval_loss}')
  elif eval_loss is not None and eval_loss > ABSURD_LOSS_FACTOR * np.log(num_classes):
    flags.append(f'eval loss {eval_loss:.3g} > {ABSURD_LOSS_FACTOR:g}·ln({num_classes})')
  if bw_fallbacks:
    flags.append(f'BW fell back {int(bw_fallbacks)} times')
  return '; '.join(flags)


def is_flagged(results: pd.DataFrame) -> pd.Series:
  """True for the rows of `results_table` flagged as broken (`flags` is '' or missing otherwise)."""
  return results['flags'].map(lambda flags: isinstance(flags, str) and flags != '').astype(bool)


def results_table(study: optuna.Study) -> pd.DataFrame:
  """One row per trial that trained (or waits to), in number order; columns as the module docstring says."""
  keys, rows = space_keys(study), []
  for trial in study.get_trials(deepcopy=False):
    if is_surplus(trial):
      continue
    attrs = trial.user_attrs
    row = {'number': trial.number, 'state': trial.state.name}
    row.update({k: attrs.get(k) for k in TRIAL_COLUMNS[2:]})
    row['flags'] = trial_flags(attrs.get('eval_loss'), attrs.get('bw_fallbacks'), study_num_classes(study, trial))
    row.update({k: trial.params.get(k, attrs.get(k)) for k in keys})
    row['retried_from'] = original_number(trial) if is_retry(trial) else None
    row.update({k: attrs.get(k) for k in ATTR_COLUMNS})
    rows.append(row)
  columns = [*TRIAL_COLUMNS, 'flags', *keys, 'retried_from', *ATTR_COLUMNS]
  return pd.DataFrame(rows, columns=columns)


def ranked(results: pd.DataFrame, objective: str, maximize: bool) -> pd.DataFrame:
  """COMPLETE trials that are not flagged as broken, best first; ties in trial-number order."""
  done = results[(results.state == 'COMPLETE') & ~is_flagged(results)]
  return done.sort_values([objective, 'number'], ascending=[not maximize, True], kind='stable')


def block_type_table(results: pd.DataFrame, objective: str, maximize: bool) -> pd.DataFrame:
  """Per stem × MBConv × head combination of the `ranked` trials (COMPLETE, not flagged): count, mean, best and
  the best trial's number; best combination first."""
  best = ranked(results, objective, maximize)
  if best.empty:
    return pd.DataFrame(columns=[*BLOCK_KEYS, 'count', 'mean', 'best', 'best_trial'])
  grouped = best.groupby(list(BLOCK_KEYS), sort=False)
  table = grouped[objective].agg(['count', 'mean']).join(grouped.head(1).set_index(list(BLOCK_KEYS))[
      [objective, 'number']].rename(columns={objective: 'best', 'number': 'best_trial'}))
  return table.reset_index().sort_values(['best', 'mean'], ascending=not maximize, kind='stable')


def param_importances(study: optuna.Study) -> dict[str, float] | str:
  """fANOVA importances of the search-space keys for the objective, or why they cannot be computed."""
  complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
  if len(complete) < 2 or len({t.value for t in complete}) < 2:
    return 'needs at least two complete trials with different results'
  try:
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
  except (ValueError, RuntimeError) as e:
    return f'not computed: {e}'
  return {k: float(v) for k, v in importances.items()}


def block_label(row: Any) -> str:
  return ' / '.join(f'{BLOCK_NAMES[k]} {row[k]}' for k in BLOCK_KEYS)


def plot_accuracy_by_block_type(results: pd.DataFrame, blocks: pd.DataFrame, objective: str, path: str) -> None:
  """Every COMPLETE trial as a dot on its combination's row (best combination on top), means as bars."""
  done = results[results.state == 'COMPLETE']
  rows = blocks.to_dict('records')
  labels = [block_label(row) for row in rows]
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * max(len(labels), 1)))
  for y, row in enumerate(rows):
    values = done[np.logical_and.reduce([done[k] == row[k] for k in BLOCK_KEYS])][objective]
    ax.barh(y, row['mean'], color='#c6dbef', height=0.6)
    ax.scatter(values, np.full(len(values), y), color='#08519c', s=18, zorder=3)
  ax.set_yticks(range(len(labels)), labels)
  ax.invert_yaxis()
  ax.set_xlabel(f'{objective} (bars: mean; dots: trials)')
  ax.set_title('Result by block-type combination')
  if done.empty:
    ax.text(0.5, 0.5, 'no complete trials yet', transform=ax.transAxes, ha='center')
  _save(fig, path)


def plot_param_importances(importances: dict[str, float] | str, objective: str, path: str) -> None:
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.35 * (len(importances) if isinstance(importances, dict) else 1)))
  if isinstance(importances, dict):
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color='#08519c')
    ax.set_xlabel(f'fANOVA importance for {objective}')
  else:
    ax.text(0.5, 0.5, f'Parameter importances {importances}', transform=ax.transAxes, ha='center', wrap=True)
    ax.set_axis_off()
  ax.set_title('Parameter importances')
  _save(fig, path)


def plot_optimization_history(results: pd.DataFrame, objective: str, maximize: bool, path: str) -> None:
  """Objective per trial number (pruned trials grey, at their last eval) and the best so far."""
  fig, ax = plt.subplots(figsize=(8, 4))
  done = results[results.state == 'COMPLETE'].sort_values('number')
  pruned = results[results.state == 'PRUNED']
  ax.scatter(done.number, done[objective], color='#08519c', s=18, label='complete', zorder=3)
  if not pruned.empty:
    ax.scatter(pruned.number, pruned[objective], color='#bdbdbd', s=18, marker='x', label='pruned')
  if not done.empty:
    best = done[objective].cummax() if maximize else done[objective].cummin()
    ax.step(done.number, best, where='post', color='#e6550d', label='best so far')
  ax.set_xlabel('trial number')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_ylabel(objective)
  ax.set_title('Optimisation history')
  ax.legend(loc='best')
  _save(fig, path)


def _save(fig: Any, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_cell(value: Any) -> str:
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return ''
  if isinstance(value, (float, np.floating)):
    return f'{value:.4g}'
  return str(value)


def markdown_table(table: pd.DataFrame) -> str:
  """A GitHub Markdown table of `table`, floats to 4 significant digits."""
  lines = ['| ' + ' | '.join(map(str, table.columns)) + ' |', '|' + '---|' * len(table.columns)]
  lines += ['| ' + ' | '.join(format_cell(v) for v in row) + ' |' for row in table.itertuples(index=False)]
  return '\n'.join(lines)


def budget_text(record: dict[str, Any]) -> str:
  budget, train = record['trial_budget'], record['train']
  steps = budget.get('num_train_steps', -1)
  length = f'{steps} steps' if steps and steps > 0 else f"{budget.get('num_epochs')} epochs"
  return f"{length} of batch {train['batch_size']} on {train['dataset']['name']}"


def wall_seconds(study: optuna.Study) -> float | None:
  """Seconds from the first trial's start to the last trial's end, over all workers."""
  trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
  if not trials:
    return None
  return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def summary_markdown(study: optuna.Study, results: pd.DataFrame, blocks: pd.DataFrame,
                     importances: dict[str, float] | str, top: int = 10) -> str:
  """summary.md: counts, best trials, the block-type table, importances and the plots."""
  objective, maximize = objective_of(study)
  record = study.user_attrs['sweep']
  counts = results.state.value_counts().to_dict()
  diverged = int((results.outcome == 'diverged').sum())
  flagged = results[is_flagged(results)]
  seconds = results.seconds.dropna()
  best = ranked(results, objective, maximize).head(top)
  keys = [k for k in space_keys(study) if k in results.columns]
  lines = [f"# Sweep `{study.study_name}`", '',
           f"{len(results)} trials: " + ', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items())) +
           (f' ({diverged} diverged)' if diverged else '') +
           (f'; {len(flagged)} flagged as broken' if len(flagged) else '') +
           f". Each trial: {budget_text(record)}. Objective: `{objective}`, "
           f"{'maximised' if maximize else 'minimised'}; sampler `{record['sampler']}`, seed {record['seed']}. "
           f'Training time {format_seconds(seconds.sum())} in all, {format_seconds(seconds.median())} per '
           f'trial (median); {format_seconds(wall_seconds(study))} from the first start to the last finish.', '',
           '## Best trials', '', markdown_table(best[['number', objective, 'eval_loss', 'bw_fallbacks', 'seconds',
                                                       *keys]]), '',
           '## Result by block type (stem × MBConv × head)', '',
           markdown_table(blocks.rename(columns={**BLOCK_NAMES, 'count': 'trials'})), '',
           f'![{objective} by block type](accuracy_by_block_type.png)', '',
           '## Parameter importances (fANOVA)', '']
  if isinstance(importances, dict):
    lines.append(markdown_table(pd.DataFrame(list(importances.items()), columns=['key', 'importance'])))
  else:
    lines.append(f'Parameter importances {importances}.')
  lines += ['', '![parameter importances](param_importances.png)', '', '## Optimisation history', '',
            '![optimisation history](optimization_history.png)', '']
  if not flagged.empty:
    lines += ['## Flagged trials', '', markdown_table(flagged[['number', 'state', objective, 'eval_loss',
                                                               'bw_fallbacks', 'flags']]), '',
              f'Left out of the rankings, the block-type table and `promote`: an eval loss that is not finite or '
              f'above {ABSURD_LOSS_FACTOR:g}·ln(classes), or a BW layer that fell back from whitening, makes the '
              'accuracy meaningless.', '']
  failed = results[results.state == 'FAIL']
  if not failed.empty:
    lines += ['## Failed trials', '', markdown_table(failed[['number', 'retried_from', 'error']].rename(
        columns={'retried_from': 'retry of'})), '',
              'A failure with a later retry (same values, same workdir) was a worker that died or crashed; '
              'the retry holds the result.', '']
  lines += ['Written by `python -m bw_jax.sweep report`; every trial is a row of results.csv.', '']
  return '\n'.join(lines)


def write_report(study: optuna.Study, out: str) -> pd.DataFrame:
  """Writes results.csv, block_types.csv, summary.md and PLOTS into `out`; returns the results table."""
  os.makedirs(out, exist_ok=True)
  objective, maximize = objective_of(study)
  results = results_table(study)
  blocks = block_type_table(results, objective, maximize)
  importances = param_importances(study)
  results.to_csv(os.path.join(out, 'results.csv'), index=False)
  blocks.to_csv(os.path.join(out, 'block_types.csv'), index=False)
  plot_accuracy_by_block_type(results, blocks, objective, os.path.join(out, PLOTS[0]))
  plot_param_importances(importances, objective, os.path.join(out, PLOTS[1]))
  plot_optimization_history(results, objective, maximize, os.path.join(out, PLOTS[2]))
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(summary_markdown(study, results, blocks, importances))
  return results
