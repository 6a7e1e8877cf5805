"""What a config key declares (`Key`): its default and doc, the values it allows, whether a resumed run may
change it, and whether it is a constant of the compiled programs. `schema.KEYS` is the table of them."""

import dataclasses
import enum
import numbers
from typing import Any

from bw_jax.checks import check_choice, is_positive_int


class Resume(enum.Enum):
  """May a run resume checkpoints written with another value of the key?"""
  # Yes: how long it trains, how often it logs, evaluates and saves, where the data lives, where a fresh run
  # would have started from.
  SAFE = 'safe'
  ON_PURPOSE = 'on purpose'  # Only when named in config.resume_allow_changes: it would mix two runs.
  NEVER = 'never'  # No: it changes the shapes or structure of the train state, which then cannot load.


class InPrograms(enum.Enum):
  """How the key reaches the compiled programs (init, train and eval steps)."""
  CONSTANT = 'constant'  # Its value is built into them: part of their cache key.
  DERIVED = 'derived'  # Only through the plan's global batch or schedule, which the cache key holds.
  OUTSIDE = 'outside'  # Not at all: host-side (data reading, intervals), or an argument (seed, rates).


def interval_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
  return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values`."""
  values: tuple[Any, ...]

  def check(self, name: str, value: Any) -> None:
    check_choice(f'config.{name}', value, self.values)


@dataclasses.dataclass(frozen=True)
class Range:
  """A number in an interval; `integer`: an int as well."""
  low: float
  high: float
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def check(self, name: str, value: Any) -> None:
    if self.integer and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
      raise ValueError(f'config.{name}={value!r} must be an integer in '
                       f'{interval_text(self.low, self.high, self.low_open, self.high_open)}.')
    below = value <= self.low if self.low_open else value < self.low
    above = value >= self.high if self.high_open else value > self.high
    if below or above or value != value:  # NaN compares false with everything.
      raise ValueError(f'config.{name}={value!r} is out of range; it must lie in '
                       f'{interval_text(self.low, self.high, self.low_open, self.high_open)}.')


@dataclasses.dataclass(frozen=True)
class PositiveInt:
  """1, 2, …"""

  def check(self, name: str, value: Any) -> None:
    if not is_positive_int(value):
      raise ValueError(f'config.{name}={value!r} must be a positive integer.')


@dataclasses.dataclass(frozen=True)
class Text:
  """Any string; what it must name is checked where it is used (`checked_by`)."""
  checked_by: str = ''

  def check(self, name: str, value: Any) -> None:
    if not isinstance(value, str):
      raise ValueError(f'config.{name}={value!r} must be a string.')


Rule = Choice | Range | PositiveInt | Text
BOOL = Choice((False, True))
FRACTION = Range(0.0, 1.0, high_open=True)  # Rates and probabilities below 1.


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key, declared once.

  `name`: dotted ('model.bw.group_size'). `default`: its value in `schema.get_config()` (FROM_DATASET: the
  dataset module's, `bw_jax.data.default_dataset_config`). `rule`: the values it allows. `off`: a value
  outside the rule that means 'not used' (-1: train for num_epochs, …), said in the error. `nullable`: None
  is allowed (it then has the type `kind`, which `--config.key=value` parses). `ignored_when`: another key
  that, when set (not None), makes this one ignored: setting both is refused.
  """
  name: str
  default: Any
  doc: str
  rule: Rule
  resume: Resume
  programs: InPrograms
  kind: type | None = None
  nullable: bool = False
  off: tuple[Any, str] | None = None
  ignored_when: str | None = None

  def check(self, value: Any) -> None:
    """Raises a ValueError saying what `value` should be."""
    if value is None and self.nullable:
      return
    if self.off is not None and value == self.off[0]:
      return
    try:
      self.rule.check(self.name, value)
    except ValueError as e:
      if self.off is None:
        raise
      raise ValueError(f'{str(e)[:-1]}, or {self.off[0]!r} {self.off[1]}.') from None


FROM_DATASET = object()  # A default that depends on the dataset (image size, splits, augmentation).
