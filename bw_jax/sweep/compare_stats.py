"""The statistics of a comparison (`compare_report.py`): t-based confidence intervals, paired t-tests against
the baseline arm, Holm's correction for testing several arms, and steps to a target accuracy.

Every run of an arm is one observation; runs of two arms with the same seed are a pair (same initialisation
seed, same data order), so differences are taken within pairs and tested with the paired t-test.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats


IDENTICAL = 1e-12


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Mean of n observations, their sample standard deviation (ddof 1) and a t-based confidence interval.
  std and the interval are NaN for n < 2; everything is NaN for n = 0."""
  n: int
  mean: float
  std: float
  low: float
  high: float


def t_interval(values: Sequence[float], level: float = 0.95) -> Estimate:
  """mean ± t_{(1+level)/2, n−1} · std / √n."""
  x = np.asarray(values, np.float64)
  n = len(x)
  if n == 0:
    return Estimate(0, math.nan, math.nan, math.nan, math.nan)
  mean = float(x.mean())
  if n < 2:
    return Estimate(1, mean, math.nan, math.nan, math.nan)
  std = float(x.std(ddof=1))
  half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
  return Estimate(n, mean, std, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """arm − baseline over the seeds both completed: the difference's estimate and the paired t-test's p."""
  difference: Estimate
  p_value: float


def paired_difference(arm: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> PairedDifference:
  """{seed: value} of an arm and of the baseline → the paired difference over their common seeds. p is NaN
  with fewer than two pairs, and when all differences are equal (the t statistic is undefined; accuracies and
  losses are O(1), so a spread below IDENTICAL is float round-off)."""
  seeds = sorted(set(arm) & set(baseline))
  a = np.array([arm[s] for s in seeds], np.float64)
  b = np.array([baseline[s] for s in seeds], np.float64)
  estimate = t_interval(a - b, level)
  if len(seeds) < 2 or not estimate.std > IDENTICAL:
    return PairedDifference(estimate, math.nan)
  return PairedDifference(estimate, float(stats.ttest_rel(a, b).pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjustment (family-wise error over all the tests); NaN p-values stay NaN and are not
  counted as tests. The i-th smallest of m p-values becomes max over j ≤ i of min(1, (m − j + 1)·p_(j))."""
  p = np.asarray(p_values, np.float64)
  valid = np.flatnonzero(~np.isnan(p))
  adjusted = np.full(len(p), math.nan)
  running = 0.0
  for rank, index in enumerate(valid[np.argsort(p[valid], kind='stable')]):
    running = max(running, min(1.0, (len(valid) - rank) * p[index]))
    adjusted[index] = running
  return adjusted.tolist()


def steps_to_target(history: Sequence[Sequence[float]], target: float) -> float:
  """The first eval step whose accuracy is ≥ target, from [[step, accuracy, loss], …]; inf when none is."""
  for step, accuracy, *_ in sorted(history):
    if accuracy >= target:
      return float(step)
  return math.inf


def censored_median(values: Sequence[float]) -> float:
  """The median where inf means 'not reached within the run': defined (finite) only while more than half
  the runs reached the target; NaN for no runs."""
  x = np.sort(np.asarray(values, np.float64))
  if len(x) == 0:
    return math.nan
  return float(np.median(x)) if np.isfinite(x[(len(x) - 1) // 2 + (len(x) % 2 == 0)]) else math.inf
