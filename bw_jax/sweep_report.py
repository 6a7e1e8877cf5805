"""What a sweep found: `write_report` (results.csv, summary.md, PNG plots) and `promote` (one ready-to-run
config per winning block-type combination). Both read the Optuna study that `bw_jax.sweep run` wrote.

results.csv has one row per trial (surplus trials, which never trained, are left out) and the columns
`number`, `state`, `eval_accuracy`, `eval_loss`, `seconds`, `step`, one per search-space key named by its
full config key (`model.stem_type`, `model.bw.method`, `learning_rate`, …; the three block types always),
then `retried_from`, `resumed_from_step`, `worker`, `outcome` (of a failed trial: diverged, crashed,
preempted), `error`, `workdir`.
"""

import os
import textwrap
from typing import Any

import matplotlib
matplotlib.use('Agg')  # Files only; no display.
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from bw_jax.config_validation import validate_config  # noqa: E402
from bw_jax.sweep import format_seconds  # noqa: E402
from bw_jax.sweep_config import (BLOCK_KEYS, REPO, display_order, flatten_space, load_config_file,  # noqa: E402
                                 with_values)
from bw_jax.sweep_study import is_retry, is_surplus, original_number  # noqa: E402

PLOTS = ('accuracy_by_block_type.png', 'param_importances.png', 'optimization_history.png')
BLOCK_NAMES = {'model.stem_type': 'stem', 'model.mbconv_type': 'MBConv', 'model.head_type': 'head'}
TRIAL_COLUMNS = ('number', 'state', 'eval_accuracy', 'eval_loss', 'seconds', 'step')
ATTR_COLUMNS = ('resumed_from_step', 'worker', 'outcome', 'error', 'workdir')


def space_keys(study: optuna.Study) -> list[str]:
  """The three block types (searched or not), then the other search-space keys."""
  return display_order(list(BLOCK_KEYS) + list(flatten_space(study.user_attrs['sweep']['search_space'])))


def objective_of(study: optuna.Study) -> tuple[str, bool]:
  """('eval_accuracy', True): the objective column and whether it is maximised."""
  return study.user_attrs['sweep']['objective'], study.direction == optuna.study.StudyDirection.MAXIMIZE


def results_table(study: optuna.Study) -> pd.DataFrame:
  """One row per trial that trained (or waits to), in number order; columns as the module docstring says."""
  keys, rows = space_keys(study), []
  for trial in study.get_trials(deepcopy=False):
    if is_surplus(trial):
      continue
    attrs = trial.user_attrs
    row = {'number': trial.number, 'state': trial.state.name}
    row.update({k: attrs.get(k) for k in TRIAL_COLUMNS[2:]})
    row.update({k: trial.params.get(k, attrs.get(k)) for k in keys})
    row['retried_from'] = original_number(trial) if is_retry(trial) else None
    row.update({k: attrs.get(k) for k in ATTR_COLUMNS})
    rows.append(row)
  columns = [*TRIAL_COLUMNS, *keys, 'retried_from', *ATTR_COLUMNS]
  return pd.DataFrame(rows, columns=columns)


def ranked(results: pd.DataFrame, objective: str, maximize: bool) -> pd.DataFrame:
  """COMPLETE trials, best first; ties in trial-number order."""
  done = results[results.state == 'COMPLETE']
  return done.sort_values([objective, 'number'], ascending=[not maximize, True], kind='stable')


def block_type_table(results: pd.DataFrame, objective: str, maximize: bool) -> pd.DataFrame:
  """Per stem × MBConv × head combination of COMPLETE trials: count, mean, best and the best trial's number;
  best combination first."""
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
  seconds = results.seconds.dropna()
  best = ranked(results, objective, maximize).head(top)
  keys = [k for k in space_keys(study) if k in results.columns]
  lines = [f"# Sweep `{study.study_name}`", '',
           f"{len(results)} trials: " + ', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items())) +
           (f' ({diverged} diverged)' if diverged else '') +
           f". Each trial: {budget_text(record)}. Objective: `{objective}`, "
           f"{'maximised' if maximize else 'minimised'}; sampler `{record['sampler']}`, seed {record['seed']}. "
           f'Training time {format_seconds(seconds.sum())} in all, {format_seconds(seconds.median())} per '
           f'trial (median); {format_seconds(wall_seconds(study))} from the first start to the last finish.', '',
           '## Best trials', '', markdown_table(best[['number', objective, 'seconds', *keys]]), '',
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


# ----------------------------------------------------------------------------------------------------------
# Promotion


def carried_values(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
  """The trial's values that a promoted config takes: every search-space key and the block types, except
  `dataset.*` (the promoted run reads other data) and the trial budget (never a search-space key)."""
  return {k: trial.params.get(k, trial.user_attrs.get(k)) for k in space_keys(study)
          if not k.startswith('dataset.')}


def base_import(base: str) -> tuple[str, str]:
  """(import line, expression) that give the base config inside a promoted file: `from configs import X`
  for a file of this repository's configs/ (run from the repository root, as bw_jax.main is), else a load
  by absolute path."""
  path = os.path.abspath(base)
  if os.path.dirname(path) == os.path.join(REPO, 'configs'):
    module = os.path.splitext(os.path.basename(path))[0]
    return f'from configs import {module}', f'{module}.get_config()'
  return 'from bw_jax.sweep_config import load_config_file', f'load_config_file({path!r})'


def trials_of_combination(count: int) -> str:
  return 'the only complete trial' if count == 1 else f'the best of {count} complete trials'


def promoted_source(study: optuna.Study, trial: optuna.trial.FrozenTrial, base: str, rank: int, count: int,
                    command: str) -> str:
  """The Python text of one promoted config."""
  objective, _ = objective_of(study)
  record, base_config = study.user_attrs['sweep'], load_config_file(base)
  values = carried_values(study, trial)
  blocks = ', '.join(f'{k.split(".")[1]} {values[k]}' for k in BLOCK_KEYS)
  import_line, expression = base_import(base)
  trial_batch, batch = record['train']['batch_size'], base_config.batch_size
  per_device = base_config.get('batch_size_per_device')
  paragraphs = [
      f'{objective} {trial.value:.4f} after {budget_text(record)}; {trials_of_combination(count)} of this '
      f'block-type combination (rank {rank}). The searched values are carried over; everything else (data, '
      f"epochs, schedule, batch size) is {os.path.basename(base)}'s."]
  if 'learning_rate' in values:
    lr = values['learning_rate']
    paragraphs.append(
        f"learning_rate is per 256 images (configs/base.py), so the trial's value carries over as is and the peak "
        f"rate scales with the batch: {lr * trial_batch / 256:.4g} at the trial's batch {trial_batch}, "
        + (f'{lr * per_device / 256:.4g} × the device count at {per_device} images per device.' if per_device
           else f'{lr * batch / 256:.4g} at batch_size {batch}.'))
    optimizer = record['train']['optimizer']
    if 'optimizer' not in values and optimizer != base_config.optimizer:
      paragraphs.append(f'Caution: the trial trained with optimizer {optimizer!r}, this config uses '
                        f'{base_config.optimizer!r}; its learning rate may not transfer.')
  lines = [f'"""Promoted from sweep `{study.study_name}`, trial {trial.number}: {blocks}.']
  for paragraph in paragraphs:
    lines += ['', *textwrap.wrap(paragraph, 110)]
  lines += ['', 'Written by `python -m bw_jax.sweep promote`. Run from the repository root:', f'  {command}',
            '"""', '', 'import ml_collections', '', import_line, '', '',
            'def get_config() -> ml_collections.ConfigDict:', f'  config = {expression}']
  lines += [f'  config.{key} = {value!r}' for key, value in values.items()]
  lines += ['  return config', '']
  return '\n'.join(lines)


def promote(study: optuna.Study, top_k: int, base: str, out: str, workdir_root: str) -> list[str]:
  """Writes OUT/stem{s}_mbconv{m}_head{h}.py for the best trial of each of the `top_k` best block-type
  combinations, and OUT/commands.sh; returns the lines to print."""
  if top_k < 1:
    raise ValueError(f'--top-k must be at least 1, got {top_k}.')
  objective, maximize = objective_of(study)
  blocks = block_type_table(results_table(study), objective, maximize).head(top_k)
  if blocks.empty:
    raise ValueError(f"Study '{study.study_name}' has no complete trial to promote yet.")
  base_config = load_config_file(base)
  os.makedirs(out, exist_ok=True)
  commands, lines = [], []
  for rank, row in enumerate(blocks.to_dict('records'), 1):
    trial = study.get_trials(deepcopy=False)[int(row['best_trial'])]
    name = 'stem{}_mbconv{}_head{}'.format(*(row[k] for k in BLOCK_KEYS))
    validate_config(with_values(base_config, carried_values(study, trial)))  # Fails here, not at launch.
    path = os.path.join(out, f'{name}.py')
    command = f'python -m bw_jax.main --config={path} --workdir={os.path.join(workdir_root, name)}'
    with open(path, 'w') as f:
      f.write(promoted_source(study, trial, base, rank, int(row['count']), command))
    commands.append(command)
    lines.append(f"{rank}. {path}: trial {trial.number}, {objective} {trial.value:.4f} "
                 f"({trials_of_combination(int(row['count']))} with {block_label(row)})")
  with open(os.path.join(out, 'commands.sh'), 'w') as f:
    f.write('#!/bin/sh\n# Written by `python -m bw_jax.sweep promote`; run from the repository root.\nset -e\n' +
            '\n'.join(commands) + '\n')
  return lines + ['Launch them from the repository root:', *commands]
