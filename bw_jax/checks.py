"""Argument checks whose errors say what was wrong and what is allowed."""

import numbers
from typing import Any


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not supported; choose one of {", ".join(map(repr, allowed))}.')


def is_positive_int(value: Any) -> bool:
  """True for 1, 2, … including NumPy integers; False for bools, floats and non-positive values."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
