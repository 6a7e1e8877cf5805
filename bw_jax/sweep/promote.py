"""`promote`: one ready-to-run config per winning block-type combination of a sweep, and commands.sh.

What a promoted config is (each file's docstring says it again, with its values):
  - The base recipe (`--base`, e.g. configs/imagenet.py) gives everything that belongs to the target run: the
    data, the model's size and stem stride, the batch size, the run's length, precision, eval and checkpoint
    periods.
  - The trial gives its searched values (every `search_space` key except `dataset.*`, which belong to the
    sweep's data; never the trial budget) and its three block types.
  - The rest of the optimization recipe (RECIPE_KEYS: optimizer, momentum, learning rate, weight decay,
    schedule shape, EMA; a searched one is the trial's, above) is the base's when the trial's optimizer is of
    the base's family (OPTIMIZER_FAMILIES): the base's schedule was tuned for that family. Otherwise it is
    the trial's, its warm-up carried as the same share of the run (`warmup_fraction`) and, when the base
    counts its length in epochs, its staircase period as the same share too (`decay_epochs`): an SGD learning
    rate never runs under RMSProp's schedule and EMA.
  - `learning_rate` is per 256 images either way: the peak scales linearly with the batch
    (learning_rate · batch_size / 256), and the docstring gives it at the trial's batch and the target's.
Only the best trial that the report does not flag as broken is promoted per combination, and only when its
eval accuracy reaches the quality floor 1/num_classes + margin (`--chance-margin`); combinations below it
are listed with the reason, and nothing below it is ever written. A peak rate above KNOWN_GOOD_PEAK_LR for
its family, linear scaling stretched over more than MAX_BATCH_RATIO, or a large-batch SGD run warming up for
under an epoch is a warning, printed and written into the file.

A written file is self-contained (bw_jax's config schema plus the values above): it loads from any directory
and does not change when the base file changes later.
"""

import os
import sys
import textwrap
from typing import Any

import ml_collections
import optuna

from bw_jax.train.config import schema as config_schema
from bw_jax.train.config.files import load_config_file
from bw_jax.train.config.validation import validate_config
from bw_jax.data import default_dataset_config
from bw_jax.sweep.report import (block_label, block_type_table, budget_text, is_flagged, objective_of,
                                 results_table, space_keys, study_num_classes)
from bw_jax.sweep.space import BLOCK_KEYS, flatten_space, with_values
from bw_jax.train.config.validation import config_value

OPTIMIZER_FAMILIES = {'sgd': 'SGD', 'nesterov': 'SGD', 'rmsprop_tf': 'RMSProp', 'adamw': 'Adam'}
RECIPE_KEYS = ('optimizer', 'momentum', 'learning_rate', 'weight_decay', 'lr_schedule', 'warmup_fraction',
               'decay_rate', 'decay_epochs', 'ema_decay')
# Peak rates (at the run's batch) beyond which training commonly diverges or degrades: large-batch SGD on
# ImageNet trains at up to ~2 with a warm-up (Goyal et al. 2017: 0.1 per 256 images); EfficientNet's RMSProp at
# 0.128–0.256 (batch 2048–4096); AdamW rarely above 1e-2.
KNOWN_GOOD_PEAK_LR = {'SGD': 2.0, 'RMSProp': 0.5, 'Adam': 1e-2}
# A per-device recipe (configs/imagenet.py) is judged at the scale it is published for: 16 × 128 = 2048.
REFERENCE_DEVICES = 16
MAX_BATCH_RATIO = 64  # Linear scaling over a larger factor is an extrapolation.
DEFAULT_CHANCE_MARGIN = 0.05


def carried_values(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
  """The trial's values that a promoted config takes: every search-space key and the block types, except
  `dataset.*` (the promoted run reads other data) and the trial budget (never a search-space key)."""
  return {k: trial.params.get(k, trial.user_attrs.get(k)) for k in space_keys(study)
          if not k.startswith('dataset.')}


def trial_training_config(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> ml_collections.ConfigDict:
  """The training config the trial ran: the sweep's `train`, its budget, then its values."""
  record = study.user_attrs['sweep']
  values = {k: trial.params.get(k, trial.user_attrs.get(k)) for k in space_keys(study)}
  # On the schema, so that keys added since the study was written have their defaults.
  train = config_schema.get_config()
  train.dataset = default_dataset_config(record['train']['dataset']['name'])
  # The record's batch_size is the global batch the trial trained with, also when set per device.
  return with_values(train, {**flatten_space(record['train']), **record['trial_budget'], **values,
                             'batch_size_per_device': None})


def trial_plan(trial: optuna.trial.FrozenTrial, config: ml_collections.ConfigDict) -> Any:
  """The plan the trial ran (`bw_jax.train.plan.Plan`): its config on the data sizes its worker recorded (the
  dataset's published sizes for trials recorded before workers kept them)."""
  from bw_jax.data import dataset_module
  from bw_jax.train.plan import DataCounts, plan_for
  info = dataset_module(config.dataset.name).INFO
  published = lambda split: info.num_examples[split.split('[')[0]]
  counts = DataCounts(trial.user_attrs.get('train_examples') or published(config.dataset.train_split),
                      trial.user_attrs.get('eval_examples') or published(config.dataset.eval_split),
                      trial.user_attrs.get('num_classes') or info.num_classes)
  return plan_for(config, counts)


def trial_schedule_shape(trial: optuna.trial.FrozenTrial, config: ml_collections.ConfigDict
                         ) -> tuple[float, float]:
  """(warm-up steps, staircase decay period) as fractions of the trial's steps."""
  plan = trial_plan(trial, config)
  return plan.warmup_steps / plan.num_train_steps, plan.staircase_steps / plan.num_train_steps


def promoted_config(study: optuna.Study, trial: optuna.trial.FrozenTrial, base: ml_collections.ConfigDict
                    ) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(the promoted config, the trial's carried values, the trial's recipe values: empty when the base's
  optimizer family is the trial's)."""
  trial_config = trial_training_config(study, trial)
  carried = carried_values(study, trial)
  recipe = {}
  if OPTIMIZER_FAMILIES[trial_config.optimizer] != OPTIMIZER_FAMILIES[base.optimizer]:
    recipe = {k: config_value(trial_config, k) for k in RECIPE_KEYS if k not in carried}
    # The schedule's shape: warm-up and decay period as the same shares of the run as in the trial.
    warmup, decay = trial_schedule_shape(trial, trial_config)
    recipe['warmup_fraction'] = warmup
    if base.num_train_steps == -1:
      recipe['decay_epochs'] = decay * base.num_epochs
  return with_values(base, {**recipe, **carried}), carried, recipe


def target_batch(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(the global batch the promoted run trains with, how it is counted): `batch_size`, or for a per-device
  recipe its batch on REFERENCE_DEVICES accelerators (the scale these recipes are published at)."""
  if config.get('batch_size_per_device'):
    batch = config.batch_size_per_device * REFERENCE_DEVICES
    return batch, f'{batch} ({REFERENCE_DEVICES} devices × batch_size_per_device {config.batch_size_per_device})'
  return config.batch_size, f'{config.batch_size}'


def promotion_warnings(config: ml_collections.ConfigDict, trial_batch: int) -> list[str]:
  """What in a promoted config lies outside the known-good ranges of this module's docstring."""
  warnings = []
  family = OPTIMIZER_FAMILIES[config.optimizer]
  batch, _ = target_batch(config)
  peak = config.learning_rate * batch / 256
  if peak > KNOWN_GOOD_PEAK_LR[family]:
    warnings.append(f'the peak learning rate {peak:.3g} at batch {batch} is above the known-good '
                    f'~{KNOWN_GOOD_PEAK_LR[family]:g} for {family}; lower learning_rate (now '
                    f'{config.learning_rate:.4g} per 256 images) or batch_size.')
  if batch > MAX_BATCH_RATIO * trial_batch:
    warnings.append(f'linear scaling stretches the trial\'s batch {trial_batch} to {batch} '
                    f'({batch / trial_batch:.0f}×, beyond {MAX_BATCH_RATIO}×): an extrapolation.')
  if family == 'SGD' and batch >= 1024 and config.num_train_steps == -1:
    epochs = (config.warmup_fraction * config.num_epochs if config.warmup_fraction is not None
              else config.warmup_epochs)
    if epochs < 1:
      warnings.append(f'large-batch SGD (batch {batch}) warms up for {epochs:.2g} epochs; a few '
                      'epochs are usual (Goyal et al. 2017).')
  return warnings


def assignment_lines(values: dict[str, Any]) -> list[str]:
  return [f'  config.{key} = {value!r}' for key, value in values.items()]


def base_lines(config: ml_collections.ConfigDict, skip: set[str]) -> list[str]:
  """Lines that rebuild `config` from the schema, leaving out the keys in `skip`: its dataset, then every
  other key whose value differs from the schema's default."""
  default = flatten_space(config_schema.get_config())
  dataset_default = flatten_space(default_dataset_config(config.dataset.name))
  lines = [f'  config.dataset = default_dataset_config({config.dataset.name!r})']
  values = {f'dataset.{k}': v for k, v in flatten_space(config.dataset).items() if v != dataset_default[k]}
  values.update({k: v for k, v in flatten_space(config).items()
                 if not k.startswith('dataset.') and v != default.get(k)})
  return lines + assignment_lines({k: v for k, v in values.items() if k not in skip})


def quality_floor(num_classes: int, margin: float) -> float:
  """The accuracy a promoted trial must reach: chance (1 / num_classes) plus `margin`."""
  return 1.0 / num_classes + margin


def below_floor(study: optuna.Study, trial: optuna.trial.FrozenTrial, margin: float) -> str | None:
  """Why the trial is below the quality floor, or None when it is not."""
  num_classes = study_num_classes(study, trial)
  floor = quality_floor(num_classes, margin)
  accuracy = trial.user_attrs.get('eval_accuracy')
  if accuracy is not None and accuracy >= floor:
    return None
  return (f'eval_accuracy {accuracy:.4f} is below the quality floor {floor:.4f} (chance 1/{num_classes} + '
          f'margin {margin:g}; --chance-margin sets it)')


def docstring_paragraphs(study: optuna.Study, trial: optuna.trial.FrozenTrial, base_path: str,
                         base_optimizer: str, config: ml_collections.ConfigDict, recipe: dict[str, Any],
                         count: int, rank: int, warnings: list[str]) -> list[str]:
  """The promoted file's docstring after its first line: result, where each value comes from, warnings."""
  objective, _ = objective_of(study)
  record = study.user_attrs['sweep']
  trial_batch, trial_optimizer = record['train']['batch_size'], trial_training_config(study, trial).optimizer
  base_name = os.path.basename(base_path)
  paragraphs = [
      f'{objective} {trial.value:.4f} after {budget_text(record)} (chance {1 / study_num_classes(study, trial):.4f})'
      f'; {trials_of_combination(count)} of this block-type combination (rank {rank}).',
      f'From the base recipe {base_name}: the data, the model size, batch size, length, precision and periods.'
      ' From the trial: its searched values and block types (not dataset.*, which were the sweep\'s data).']
  if recipe:
    paragraphs.append(
        f"The optimization recipe is the trial's ({', '.join(recipe)}): it trained with {trial_optimizer!r} "
        f"({OPTIMIZER_FAMILIES[trial_optimizer]} family), and {base_name}'s schedule was tuned for "
        f'{base_optimizer!r} ({OPTIMIZER_FAMILIES[base_optimizer]} family). The schedule keeps the trial\'s shape:'
        f" warm-up and decay period are the same shares of the run (warmup_fraction {recipe['warmup_fraction']:.4g}).")
  else:
    paragraphs.append(f"The optimization schedule (warm-up, decay, EMA) is {base_name}'s: the trial's optimizer "
                      f'{trial_optimizer!r} is of its family ({OPTIMIZER_FAMILIES[trial_optimizer]}).')
  batch, batch_text = target_batch(config)
  paragraphs.append(
      f'learning_rate {config.learning_rate:.4g} is per 256 images: peak {config.learning_rate * trial_batch / 256:.4g} '
      f"at the trial's batch {trial_batch}, {config.learning_rate * batch / 256:.4g} at batch_size {batch_text}.")
  paragraphs += [f'Warning: {w}' for w in warnings]
  return paragraphs


def trials_of_combination(count: int) -> str:
  return 'the only complete trial' if count == 1 else f'the best of {count} complete trials'


def promoted_source(study: optuna.Study, trial: optuna.trial.FrozenTrial, base_path: str, rank: int, count: int,
                    command: str) -> tuple[str, list[str]]:
  """(the Python text of one promoted config, its warnings)."""
  base = load_config_file(base_path)
  config, carried, recipe = promoted_config(study, trial, base)
  validate_config(config)  # Fails here, not at launch.
  warnings = promotion_warnings(config, study.user_attrs['sweep']['train']['batch_size'])
  blocks = ', '.join(f'{k.split(".")[1]} {carried[k]}' for k in BLOCK_KEYS)
  lines = [f'"""Promoted from sweep `{study.study_name}`, trial {trial.number}: {blocks}.']
  for paragraph in docstring_paragraphs(study, trial, base_path, base.optimizer, config, recipe, count, rank,
                                        warnings):
    lines += ['', *textwrap.wrap(paragraph, 110)]
  lines += ['', 'Written by `python -m bw_jax.sweep promote` (bw_jax/sweep/promote.py defines what it carries).',
            'Run it from any directory:', f'  {command}', '"""', '', 'import ml_collections', '',
            'from bw_jax.train.config import schema as config_schema', 'from bw_jax.data import default_dataset_config', '', '',
            'def get_config() -> ml_collections.ConfigDict:', '  config = config_schema.get_config()',
            f'  # From the base recipe {os.path.abspath(base_path)}.']
  lines += base_lines(config, set(carried) | set(recipe))
  lines += [f'  # From trial {trial.number}: its searched values and block types.', *assignment_lines(carried)]
  if recipe:
    lines += ["  # The trial's optimization recipe (its optimizer family is not the base's).",
              *assignment_lines(recipe)]
  lines += ['  return config', '']
  return '\n'.join(lines), warnings


def promote(study: optuna.Study, top_k: int, base: str, out: str, workdir_root: str,
            chance_margin: float | None = None) -> list[str]:
  """Writes OUT/stem{s}_mbconv{m}_head{h}.py for the best unflagged trial of each of the `top_k` best block-type
  combinations that reach the quality floor (`chance_margin` None: DEFAULT_CHANCE_MARGIN), and OUT/commands.sh;
  returns the lines to print."""
  chance_margin = DEFAULT_CHANCE_MARGIN if chance_margin is None else chance_margin
  if top_k < 1:
    raise ValueError(f'--top-k must be at least 1, got {top_k}.')
  objective, maximize = objective_of(study)
  results = results_table(study)
  blocks = block_type_table(results, objective, maximize)
  if blocks.empty:
    raise ValueError(f"Study '{study.study_name}' has no complete, unflagged trial to promote yet.")
  load_config_file(base)  # A bad base fails before anything is written.
  trials = {t.number: t for t in study.get_trials(deepcopy=False)}
  commands, lines, skipped = [], [], []
  for row in blocks.to_dict('records'):
    if len(commands) == top_k:
      break
    trial = trials[int(row['best_trial'])]
    reason = below_floor(study, trial, chance_margin)
    if reason:
      skipped.append(f'Not promoted: {block_label(row)} (trial {trial.number}): {reason}.')
      continue
    os.makedirs(out, exist_ok=True)
    name = 'stem{}_mbconv{}_head{}'.format(*(row[k] for k in BLOCK_KEYS))
    path = os.path.abspath(os.path.join(out, f'{name}.py'))
    command = (f'{sys.executable} -m bw_jax.main --config={path} '
               f'--workdir={os.path.join(workdir_root, name)}')
    source, warnings = promoted_source(study, trial, base, len(commands) + 1, int(row['count']), command)
    with open(path, 'w') as f:
      f.write(source)
    commands.append(command)
    lines.append(f"{len(commands)}. {path}: trial {trial.number}, {objective} {trial.value:.4f} "
                 f"({trials_of_combination(int(row['count']))} with {block_label(row)})")
    lines += [f'   Warning: {w}' for w in warnings]
  flagged = int(is_flagged(results).sum())
  notes = skipped + ([f'{flagged} trials flagged as broken were left out (see the report).'] if flagged else [])
  if not commands:
    raise ValueError('Nothing promoted: no combination reaches the quality floor.\n  ' + '\n  '.join(notes))
  with open(os.path.join(out, 'commands.sh'), 'w') as f:
    f.write('#!/bin/sh\n# Written by `python -m bw_jax.sweep promote`; the interpreter that ran it.\nset -e\n' +
            '\n'.join(commands) + '\n')
  return lines + notes + ['Launch them (from any directory):', *commands]
