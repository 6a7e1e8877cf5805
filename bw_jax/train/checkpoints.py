"""A run's checkpoints: Orbax over the train state, the resolved config stored beside them and compared on
resume, and a fallback past a newest checkpoint that does not load (docs/design.md §4).

`workdir/checkpoints/` holds one folder per saved step (Orbax's), `config.json` (the config of the run
that wrote them) and `corrupt-<step>-<time>/` folders: checkpoints that failed to load, moved aside for a
look rather than deleted.
"""

import datetime
import errno
import json
import logging as std_logging
import os
import sys
import traceback
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bw_jax.train.cli_errors import os_reason
from bw_jax.train.config.rules import Resume
from bw_jax.train.config.schema import KEY_TABLE, keys_where
from bw_jax.train.plan import Plan

# Keys a resumed run may change without mixing two runs (the key table's Resume.SAFE): how long it trains and
# how often it logs, evaluates and saves; where the data lives. `config.resume_allow_changes` names more.
SAFE_TO_CHANGE = keys_where(resume=Resume.SAFE)
CONFIG_FILE = 'config.json'


class ConfigMismatchError(ValueError):
  """The checkpoints were written with another config (the message lists the keys that differ)."""


class CheckpointError(RuntimeError):
  """No checkpoint in the directory loads (the message says why for each)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (the message names its step, its folder and the reason)."""


# OS errors a save meets on a full, read-only or failing disk; TensorStore reports them in a ValueError's text.
SAVE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def save_failure_reason(error: BaseException) -> str:
  """Why a save failed, in a few words: the OS's reason when the error or one of its causes holds one, else
  the error's first line."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return os_reason(seen)
    for code in SAVE_ERRNOS:
      if os.strerror(code) in str(seen):
        return os_reason(OSError(code, os.strerror(code)))
    seen = seen.__cause__ or seen.__context__
  lines = str(error).splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def say(message: str) -> None:
  """A warning on the console (process 0) and in the log: these must not scroll by unseen."""
  logging.warning(message)
  if jax.process_index() == 0:
    print(f'WARNING: {message}', flush=True)


def json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json stores it (tuples become lists), so that a stored and a live config compare."""
  return json.loads(json.dumps(config.to_dict()))


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (stored value, current value)} for every key whose value differs (or exists on one side),
  but a key absent from `stored` (added to the schema since) that `current` leaves at its default."""
  missing = object()
  a = flax.traverse_util.flatten_dict(stored, sep='.')
  b = flax.traverse_util.flatten_dict(current, sep='.')
  newer = {k for k in set(b) - set(a) if k in KEY_TABLE and b[k] == KEY_TABLE[k].default}
  return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted((set(a) | set(b)) - newer)
          if a.get(k, missing) != b.get(k, missing)}


def allowed_changes(record: dict[str, Any]) -> set[str]:
  """SAFE_TO_CHANGE and the keys `resume_allow_changes` names (validation refused any Resume.NEVER among them)."""
  extra = record.get('resume_allow_changes') or ''
  return set(SAFE_TO_CHANGE) | {key.strip() for key in extra.split(',') if key.strip()}


def difference_line(key: str, values: tuple[Any, Any]) -> str:
  stored, current = ('(absent)' if not isinstance(v, (type(None), bool, int, float, str, list, dict))
                     else repr(v) for v in values)
  never = ' (it shapes the train state: never resumed with a change)' if is_never(key) else ''
  return f'{key}: the checkpoints were written with {stored}, this run has {current}{never}'


def is_never(key: str) -> bool:
  return key in KEY_TABLE and KEY_TABLE[key].resume is Resume.NEVER


def check_resumed_config(directory: str, stored: dict[str, Any], record: dict[str, Any]) -> None:
  """Raises ConfigMismatchError listing the keys of the run's `record` (`Plan.record`) that differ from the
  `stored` one beyond the allowed ones (`allowed_changes`); says which allowed keys differ."""
  differences = config_differences(stored, record)
  allowed = allowed_changes(record)
  refused = {k: v for k, v in differences.items() if k not in allowed}
  if refused:
    on_purpose = [k for k in refused if not is_never(k)]
    advice = (f', or, to resume on purpose, --config.resume_allow_changes={",".join(on_purpose)} (always '
              f'allowed: {", ".join(SAFE_TO_CHANGE)})' if on_purpose else '')
    raise ConfigMismatchError(
        f'The checkpoints in {directory} were written with another config; resuming would mix two runs '
        '(data order, schedule, shapes). Keys that differ:\n  ' +
        '\n  '.join(difference_line(k, v) for k, v in refused.items()) +
        f'\nUse the same config, another --workdir for a new run{advice}.')
  for key, values in differences.items():
    say(f'Resuming with a changed setting: {difference_line(key, values)}.')


def state_shape_differences(stored: Any, target: Any) -> list[str]:
  """'path: the checkpoint holds (2, 3), this run (3, 3)' for every array whose shape differs between a
  checkpoint's metadata tree and a target state dict, and a line for each array only one of them has."""
  shape = lambda leaf: tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)
  held = {k: shape(v) for k, v in flax.traverse_util.flatten_dict(stored, sep='/').items()}
  wanted = {k: shape(v) for k, v in flax.traverse_util.flatten_dict(target, sep='/').items()}
  lines = []
  for path in sorted(set(held) | set(wanted)):
    if path not in wanted:
      lines.append(f'{path}: in the checkpoint, not in this run\'s state')
    elif path not in held:
      lines.append(f'{path}: in this run\'s state, not in the checkpoint')
    elif held[path] != wanted[path]:
      lines.append(f'{path}: the checkpoint holds {held[path]}, this run {wanted[path]}')
  return lines


def saved_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir/checkpoints`, ascending (Orbax names them by step;
  its temporary folders, config.json and corrupt-* are other names)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(path) if name.isdigit()) if os.path.isdir(path) else []


def latest_checkpoint_step(workdir: str) -> int | None:
  """The step of the newest finished checkpoint in `workdir/checkpoints`, None when there is none."""
  return max(saved_steps(workdir), default=None)


def quiet_abandoned_reads(record: std_logging.LogRecord) -> bool:
  """Drops asyncio's 'Future exception was never retrieved' dumps, which a failed Orbax restore leaves for
  each array it was reading (dozens of screens of TensorStore specs); the failure itself is reported once."""
  return 'exception was never retrieved' not in record.getMessage()


def is_abandoned_read_callback(unraisable: Any) -> bool:
  """A TensorStore read of a failed Orbax restore finishing after Orbax closed its event loop: its callback's
  `loop.call_soon_threadsafe` raises 'Event loop is closed' in a TensorStore thread (`sys.unraisablehook`),
  dozens of tracebacks after the failure was already reported."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return any(frame.name == 'call_soon_threadsafe' for frame in frames)


def quiet_abandoned_read_callbacks() -> None:
  """Makes `sys.unraisablehook` drop `is_abandoned_read_callback` reports (installed once per hook)."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_reads', False):
    return

  def hook(unraisable: Any) -> None:
    if not is_abandoned_read_callback(unraisable):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


class Checkpoints:
  """Orbax CheckpointManager over the train state as a plain nested dict (`flax.serialization`), with the
  run's config in `directory/config.json` (`Plan.record`): a resume with a config that differs beyond
  SAFE_TO_CHANGE and `config.resume_allow_changes` stops here, before anything compiles."""

  def __init__(self, directory: str, plan: Plan):
    # Saved in the background on one process. On several, synchronously: Orbax's background finalisation asks
    # for the preemption sync point with the saved (older) step, which would move process 0's step counter
    # back while JAX's preemption service may be reading it (see train.PreemptionNotice). The state is small
    # (B0: ~60 MB with optimizer and EMA), so the wait is short.
    self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=plan.config.keep_checkpoints, create=True,
        enable_async_checkpointing=jax.process_count() == 1))
    self.directory = directory
    self._saving: int | None = None  # The step of a save that may still run in the background.
    self._record = plan.record()
    self._check_config()

  def _check_config(self) -> None:
    path = os.path.join(self.directory, CONFIG_FILE)
    if self.manager.latest_step() is not None:
      if os.path.exists(path):
        with open(path) as f:
          check_resumed_config(self.directory, json.load(f), self._record)
      else:
        say(f'{self.directory} holds checkpoints but no {CONFIG_FILE} (written before configs were stored); '
            'resuming without comparing configs.')

  def _store_config(self) -> None:
    """Records the config this run trains with, which a later resume compares with: only once the state
    is restored (or there was none), so that a failed resume leaves the record of the run that wrote them."""
    path = os.path.join(self.directory, CONFIG_FILE)
    if jax.process_index() == 0:
      with open(path + '.tmp', 'w') as f:
        json.dump(self._record, f, indent=2)
      os.replace(path + '.tmp', path)

  def save(self, state: Any) -> None:
    """Saves `state` (in the background on one process) unless its step is saved; raises CheckpointSaveError
    for this save or an earlier one that failed in the background."""
    step = int(state.step)
    self._wait_for_saves()
    if self.manager.latest_step() != step:
      try:
        self.manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
      except Exception as e:  # Orbax and TensorStore raise many types for a write that fails.
        raise self._save_error(step, e) from e
      self._saving = step

  def _wait_for_saves(self) -> None:
    """Waits for a save still running in the background; CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._saving, e) from e
    self._saving = None

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    try:
      finished = [int(name) for name in os.listdir(self.directory) if name.isdigit()]
    except OSError:
      finished = []
    kept = (f'the checkpoint of step {max(finished)} is kept' if finished else 'no checkpoint is saved yet')
    return CheckpointSaveError(f'The checkpoint of step {step} could not be saved in {self.directory}: '
                               f'{save_failure_reason(error)}; {kept}.')

  def restore_latest(self, state: Any) -> Any:
    """The newest checkpoint that loads, with `state`'s structure and shardings; `state` itself when there
    is none. Newer ones that fail to load are moved aside (`corrupt-<step>-<time>/`) with a warning; if none
    loads, CheckpointError says why for each and nothing is moved."""
    target = flax.serialization.to_state_dict(state)
    quiet_abandoned_read_callbacks()  # Before the reads: a failing one's threads report while it fails.
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      self._check_shapes(step, target)
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # Orbax and TensorStore raise many types for a damaged folder.
        std_logging.getLogger('asyncio').addFilter(quiet_abandoned_reads)
        failures.append((step, f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'))
        continue
      for bad_step, reason in failures:
        say(f'The checkpoint of step {bad_step} in {self.directory} does not load ({reason}); '
            f'moved it to {self._move_aside(bad_step)}.')
      if failures:
        self.manager.reload()
        say(f'restored the checkpoint of step {step} instead.')
      logging.info('Restored checkpoint of step %d from %s', step, self.directory)
      self._store_config()
      return flax.serialization.from_state_dict(state, restored)
    if failures:
      raise CheckpointError(
          f'No checkpoint in {self.directory} loads:\n  ' +
          '; '.join(f'step {step}: {reason}' for step, reason in failures) +
          f'\nMove the damaged folders out of {self.directory} to start afresh there, or use another --workdir.')
    self._store_config()
    return state

  def _check_shapes(self, step: int, target: dict[str, Any]) -> None:
    """Raises ConfigMismatchError when checkpoint `step` holds arrays of other shapes or another structure
    than `target`: the config differs in a key that shapes the state, and the checkpoint is intact. A
    checkpoint whose metadata does not load is left to the restore, which reports it as damaged."""
    try:
      stored = self.manager.item_metadata(step).tree
    except Exception:  # Damaged: the restore that follows says why.
      return
    differences = state_shape_differences(stored, target)
    if differences:
      shown = differences[:5] + ([f'… and {len(differences) - 5} more'] if len(differences) > 5 else [])
      raise ConfigMismatchError(
          f'The checkpoint of step {step} in {self.directory} holds a train state of other shapes than this '
          'config builds; the checkpoints are intact and nothing was moved:\n  ' + '\n  '.join(shown) +
          f'\nResume with the config that wrote them ({os.path.join(self.directory, CONFIG_FILE)}), or use '
          'another --workdir for this config.')

  def _move_aside(self, step: int) -> str:
    """Renames the folder of `step` to corrupt-<step>-<time> (process 0; the others see the rename)."""
    aside = os.path.join(self.directory, f'corrupt-{step}-{datetime.datetime.now():%Y%m%d-%H%M%S}')
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), aside)
    return aside

  def close(self) -> None:
    """Waits for the last save (CheckpointSaveError if it failed); closes the manager and its threads even
    then: threads left running would keep the process from exiting."""
    try:
      self._wait_for_saves()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # After a failed save: the save's error is the one to report.
        logging.warning('Closing the checkpoint manager of %s failed: %s', self.directory, e)
