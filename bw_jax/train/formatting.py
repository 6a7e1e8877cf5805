"""Text for people: durations in progress lines, reports and summaries."""

import math


def format_seconds(seconds: float | None) -> str:
  """'1:02:03' for 3723 seconds; '?' when unknown (None, inf or NaN)."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'
