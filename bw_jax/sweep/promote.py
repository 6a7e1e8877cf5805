"""`promote`: one ready-to-run config per winning block-type combination of a sweep, and commands.sh."""

import os
import textwrap
from typing import Any

import optuna

from bw_jax.config_files import config_root, load_config_file
from bw_jax.config_validation import validate_config
from bw_jax.sweep.report import (block_label, block_type_table, budget_text, objective_of, results_table,
                                 space_keys)
from bw_jax.sweep.space import BLOCK_KEYS, with_values



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
  if config_root(path) is not None and os.path.basename(os.path.dirname(path)) == 'configs':
    module = os.path.splitext(os.path.basename(path))[0]
    return f'from configs import {module}', f'{module}.get_config()'
  return 'from bw_jax.config_files import load_config_file', f'load_config_file({path!r})'


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
  paragraphs = [
      f'{objective} {trial.value:.4f} after {budget_text(record)}; {trials_of_combination(count)} of this '
      f'block-type combination (rank {rank}). The searched values are carried over; everything else (data, '
      f"epochs, schedule, batch size) is {os.path.basename(base)}'s."]
  if 'learning_rate' in values:
    lr = values['learning_rate']
    paragraphs.append(
        f"learning_rate is per 256 images (bw_jax/config_schema.py), so the trial's value carries over as is and the peak "
        f"rate scales with the batch: {lr * trial_batch / 256:.4g} at the trial's batch {trial_batch}, "
        f'{lr * batch / 256:.4g} at batch_size {batch}.')
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
