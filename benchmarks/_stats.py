"""Paired, order-balanced bootstrap intervals shared by ``overhead.py`` and ``import_cost.py``.

Both scripts compare a "treated" measurement (with the plugin) against a "control" one
(without it) on a machine whose speed drifts: a shared 2-vCPU VM runs the same ``generate``
in 75 ms one second and in 130 ms the next. Three choices make the comparison decisive:

* **Pairs measured back to back.** Each contrast (a log-ratio or a difference) comes from a
  treated and a control measurement taken seconds apart, so drift between pairs cancels; a
  ratio of two overall medians would keep it.
* **Alternating order (ABBA).** Pairs alternate which side runs first. Whatever the first
  side of a pair pays (a cold cache, a phase change halfway) lands on the treated side in one
  group and on the control side in the other; the estimate averages the two *groups*, so the
  order effect cancels even when the groups differ in size.
* **A trimmed mean, bootstrapped by pair.** Within each order group the estimate is the 20 %
  trimmed mean of the contrasts. A contrast is the effect plus the difference of two
  exchangeable noise terms, which is symmetric, so every symmetric location estimate targets
  the same centre, the effect; the trimmed mean drops the pairs a burst of load hit on one
  side only (which the plain mean would follow), yet, unlike the median, gives a smooth
  bootstrap distribution.
  The interval is a percentile bootstrap that resamples whole pairs within each order group
  (a stratified bootstrap), never single rounds: rounds within a pair are not independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Fraction trimmed from each end of an order group's contrasts.
TRIM = 0.2
RESAMPLES = 4000
#: Fewer units than this give no verdict: a bootstrap over a handful understates the spread.
MIN_JUDGED = 10


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def map(self, f: np.ufunc) -> Interval:
        """The interval of a monotone increasing transform (log-ratios → ratios)."""
        return Interval(float(f(self.estimate)), float(f(self.low)), float(f(self.high)))


def trimmed_mean(values: np.ndarray, trim: float = TRIM) -> np.ndarray:
    """Trimmed mean along the last axis (rows of a bootstrap matrix at once)."""
    n = values.shape[-1]
    cut = int(trim * n)
    ordered = np.sort(values, axis=-1)
    return ordered[..., cut : n - cut].mean(axis=-1)


def _groups(contrasts: Sequence[float], treated_first: Sequence[bool]) -> list[np.ndarray]:
    if len(contrasts) != len(treated_first):
        raise ValueError("one order flag per contrast")
    x = np.asarray(contrasts, dtype=float)
    first = np.asarray(treated_first, dtype=bool)
    groups = [g for g in (x[first], x[~first]) if g.size]
    if not groups:
        raise ValueError("no contrasts")
    return groups


def paired_interval(
    contrasts: Sequence[float],
    treated_first: Sequence[bool],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Order-balanced estimate of the treated-minus-control contrast with a bootstrap interval.

    ``treated_first[i]`` says whether pair ``i`` ran the treated side first. A fixed seed
    makes a report reproducible from the same measurements.
    """
    groups = _groups(contrasts, treated_first)
    estimate = float(np.mean([trimmed_mean(g) for g in groups]))
    rng = np.random.default_rng(seed)
    boot = np.mean(
        [trimmed_mean(g[rng.integers(0, g.size, size=(resamples, g.size))]) for g in groups],
        axis=0,
    )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def median_interval(
    values: Sequence[float], *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """The median of independent repetitions with a percentile bootstrap interval."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Interval(float(np.median(x)), float(low), float(high))


def goal_verdict(interval: Interval, goal: float, *, n: int) -> str:
    """Judge an at-most goal from the interval only: the point estimate never decides.

    ``n`` is the number of units (blocks, pairs, repetitions) the interval resampled.
    """
    if n < MIN_JUDGED:
        return f"undecided (fewer than {MIN_JUDGED} to judge)"
    if interval.high <= goal:
        return "goal met"
    if interval.low > goal:
        return "goal missed"
    return "undecided"
