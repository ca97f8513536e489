"""Pure statistics: judge one measured record against its baseline history.

No pytest, no torch: the plugin calls :func:`judge` when a test ends and prints the
:class:`EntryVerdict`; ``llmperf baselines diff`` calls :func:`compare_metric` per metric.

Why this rule
-------------
Noise on these machines lives *between* runs, not within one. Measured on a tiny BLOOM
(100 new tokens, 14 separate processes x 10 rounds): the within-process CV is 0.75 %, but the
process medians scatter with sigma 1.1 % (range 3.9 %). A test on one run's samples alone
(Mann-Whitney) therefore calls ~20 % of identical-code runs "slower"; a fixed 5 % factor has no
false alarms but catches only ~50 % of real 5 % slowdowns. A rule that knows the between-run
spread does better, so a baseline entry keeps the summaries of its last K runs (K = 5 by
default, ``--llmperf-baseline-runs``) and the rule depends on how many there are.

Baseline entry
--------------
A list of runs, oldest first, newest last; each run is a dict::

    {"date": "2026-11-22T03:00:00Z", "outcome": "ok" | "oom",
     "output_digest": str | None, "output_head": [int, ...] | None, "provenance": {...},
     "metrics": {name: {"unit": "s", "direction": "lower" | "higher",
                        "median": float | None, "samples": [float, ...]}}}

The rule, metric by metric
--------------------------
"Worse" follows the metric's direction (``metrics.metric(name).lower_is_better``):
for latency, time and memory a larger value is worse; for ``tokens_per_s`` and
``roofline_fraction`` a smaller one. Only baseline runs whose outcome is ``ok`` and that have
a median for the metric count (``runs`` in the verdict); every run given counts (the baselines
module keeps the last K).

* **center** = median of those runs' medians; ``ratio`` = current / center.
* **tolerance** = ``GateSettings.tolerance_for(metric)`` (per-metric override or the default 3 %).
* **>= 2 runs**: spread = robust between-run CV of the run medians (1.4826 x MAD / median
  from 3 runs on, sample sd / median for 2), so one run recorded on a busy machine does not
  widen the allowance and switch the gate off until it ages out;
  ``allowed = max(tolerance, spread_multiple x spread)``. *Regressed* when the current median
  is worse than the center by more than ``allowed x |center|``; *improved* when better by more
  than that; otherwise *pass*. The reported p-value is a one-sided prediction test of the
  current median against the run medians (Student t, df = n - 1,
  scale = sd x sqrt(1 + 1/n)), in the direction of the observed change. It is
  **informative only**: the decision is the threshold, because with K = 5 runs the t test's
  own false-alarm rate would be alpha per comparison, far too many for a CI gate over a suite.
* **1 run** (right after an upgrade restarted the history, or a single update): *regressed*
  needs both: worse than the center by more than the tolerance AND a
  one-sided Mann-Whitney U test (scipy) of the current samples against the run's samples,
  alternative "worse", with p < alpha. *Improved* is symmetric (alternative "better").
  When either side has fewer than 2 samples (single readings such as ``peak_memory_bytes``
  or ``load_time_s``), or the sample counts are too small for the test ever to reach alpha
  (``1 / C(n + m, n) >= alpha``), the test cannot speak and the tolerance alone decides;
  the detail says so.
* **abs_slack**: a change whose absolute size is at most ``abs_slack[metric]`` (in the
  metric's unit) is never a regression or an improvement. Default: 16 MiB for
  ``peak_memory_bytes``. On CPU that metric is the RSS *increase* over the rounds; it moves by
  allocator arenas (glibc keeps freed memory up to its trim threshold, a new arena is 64 MiB
  of address space, touched lazily), 4 KiB pages and 2 MiB transparent huge pages, and
  tokenizer or cache buffers that are or are not already resident. For a tiny model the
  increase is a few MiB, so a meaningless 4 MiB wobble is a +100 % "regression". A zero
  center never divides: the ratio is then ``None`` and only the absolute change is reported.
  ``threshold`` = the value beyond which the metric counts as regressed, with both the relative
  allowance and the slack applied.
* **0 runs with the metric** (the metric is new, or the runs are all ``oom``): *no-baseline*.
* **Absolute limits** (``llmperf(max_ms_per_token=50)``, ``min_tokens_per_s=10``, in the
  metric's unit): a current value beyond a limit is *regressed* and always fails (``gated``
  is True, ``limit`` names it), with or without a baseline; an outcome of ``oom`` has no
  metrics, so limits are not checked then. A limit on an unknown metric is a ``ValueError``
  when the settings are built; a limit on a metric this workload did not measure (outcome
  ``ok``) is a ``ValueError`` from :func:`judge`/:func:`compare_metric`: a limit that cannot
  be checked must not pass silently.
* Metrics not in ``GateSettings.gate`` are still compared and reported, with ``gated=False``:
  they never fail the test.

The entry: outcome and output
-----------------------------
``EntryVerdict.metrics[0]`` is always the outcome (metric ``"outcome"``):

* no baseline runs at all: *no-baseline* (the metric comparisons are skipped; limits still
  apply). It never fails here; ``--llmperf-strict`` is the plugin's business
  (``EntryVerdict.worst == Verdict.NO_BASELINE``).
* newest baseline run ``ok``, now ``oom``: *new-oom*, always gated, fails.
* newest baseline run ``oom``, now ``ok``: *fixed-oom*, passes (a note); the metrics are then
  compared with the older ``ok`` runs if there are any, else *no-baseline*.
* both ``oom``: *pass* on the outcome, no metric comparisons.
* current outcome ``error`` is never judged: :func:`judge` raises ``ValueError`` (an error
  fails the test by itself and is never stored).

Output (metric ``"output_digest"``, only when the current record and the newest ``ok``
baseline run with a digest both have one): equal digests *pass*; different digests are
*output-changed*, with the first diverging position of the stored token heads (or "beyond the
first N tokens / in another batch row" when the heads agree). It is gated, and fails, only
with ``GateSettings.check_outputs``: with random weights near-tie logits can flip on a kernel
change.

``MetricVerdict.failed`` = gated and verdict in {regressed, new-oom, output-changed}; the
outcome and limit verdicts are gated by construction, the output verdict is gated exactly when
``check_outputs`` is set.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from .metrics import DEFAULT_GATED, METRICS, metric
from .results import MetricValue, Record
from .units import format_value

__all__ = [
    "EntryVerdict",
    "GateSettings",
    "MetricVerdict",
    "Verdict",
    "between_run_spread",
    "compare_metric",
    "first_divergence",
    "judge",
    "log_spread",
    "minimum_detectable",
    "two_sample_p",
]


class Verdict(str, Enum):
    PASS = "pass"
    REGRESSED = "regressed"
    IMPROVED = "improved"
    NO_BASELINE = "no-baseline"
    NEW_OOM = "new-oom"
    FIXED_OOM = "fixed-oom"
    OUTPUT_CHANGED = "output-changed"
    #: Failed on numbers that were measured on a busy or shared device (set by gate.decide).
    INCONCLUSIVE = "inconclusive"

    def __str__(self) -> str:
        return self.value


_FAILING = frozenset({Verdict.REGRESSED, Verdict.NEW_OOM, Verdict.OUTPUT_CHANGED})

# Names that may appear in a gate list besides the metrics: the outcome is always gated anyway.
_GATE_EXTRA = ("outcome",)


def _check_fraction(source: str, value: Any, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}={value!r}: expected a number")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (upper is not None and v >= upper):
        allowed = f"0 <= value < {upper:g}" if upper is not None else "a finite value >= 0"
        raise ValueError(f"{source}={value!r}: expected {allowed}")
    return v


def _known_metric(source: str, name: str) -> None:
    if name not in METRICS:
        raise ValueError(f"{source}: unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")


def _split_limit(key: str) -> tuple[str, str]:
    """``"max_ms_per_token"`` -> ``("max", "ms_per_token")``; ValueError when malformed."""
    kind, sep, name = key.partition("_")
    if not sep or kind not in ("max", "min"):
        raise ValueError(
            f"limit {key!r}: expected max_<metric> or min_<metric>, "
            f"e.g. max_ms_per_token or min_tokens_per_s"
        )
    _known_metric(f"limit {key!r}", name)
    return kind, name


@dataclass(frozen=True)
class GateSettings:
    """How strictly a record is judged. Built once per test from call > marker > CLI > ini.

    All fractions are relative (0.03 = 3 %). ``limits`` and ``abs_slack`` are in the metric's
    own unit (``max_ms_per_token=50`` is 50 ms; ``abs_slack["peak_memory_bytes"]`` is bytes).
    Invalid values raise ``ValueError`` naming the field and value; the caller adds the source.
    """

    tolerance: float = 0.03
    tolerances: Mapping[str, float] = field(default_factory=dict)
    alpha: float = 0.01
    spread_multiple: float = 2.0
    gate: tuple[str, ...] = DEFAULT_GATED
    limits: Mapping[str, float] = field(default_factory=dict)
    check_outputs: bool = False
    #: The run-wide false-alarm budget of the multi-process rule, and how many gated
    #: comparisons share it (Bonferroni: each is tested at ``process_alpha``).
    family_alpha: float = 0.05
    comparisons: int = 1
    # Why 16 MiB: see the module docstring (allocator arenas, pages, THP on CPU RSS).
    abs_slack: Mapping[str, float] = field(
        default_factory=lambda: {"peak_memory_bytes": 16 * 2**20}
    )

    def __post_init__(self) -> None:
        _check_fraction("tolerance", self.tolerance)
        tolerances = {}
        for name, value in dict(self.tolerances).items():
            _known_metric("tolerances", name)
            tolerances[name] = _check_fraction(f"tolerance for {name}", value)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha={alpha!r}: expected a number with 0 < alpha < 1")
        _check_fraction("spread_multiple", self.spread_multiple)
        fam = self.family_alpha
        if isinstance(fam, bool) or not isinstance(fam, (int, float)) or not 0 < fam < 1:
            raise ValueError(f"family_alpha={fam!r}: expected a number with 0 < alpha < 1")
        if isinstance(self.comparisons, bool) or not isinstance(self.comparisons, int):
            raise ValueError(f"comparisons={self.comparisons!r}: expected a whole number")
        object.__setattr__(self, "family_alpha", float(fam))
        object.__setattr__(self, "comparisons", max(1, self.comparisons))
        if isinstance(self.gate, str):
            raise ValueError(f"gate={self.gate!r}: expected a list of metric names")
        gate = tuple(self.gate)
        for name in gate:
            if name not in _GATE_EXTRA:
                _known_metric("gate", name)
        limits = {}
        for key, value in dict(self.limits).items():
            _split_limit(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"limit {key}={value!r}: expected a number")
            if not math.isfinite(value):
                raise ValueError(f"limit {key}={value!r}: expected a finite number")
            limits[key] = float(value)
        slack = {}
        for name, value in dict(self.abs_slack).items():
            _known_metric("abs_slack", name)
            slack[name] = _check_fraction(f"abs_slack for {name}", value)
        object.__setattr__(self, "tolerance", float(self.tolerance))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "spread_multiple", float(self.spread_multiple))
        object.__setattr__(self, "tolerances", MappingProxyType(tolerances))
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "limits", MappingProxyType(limits))
        object.__setattr__(self, "abs_slack", MappingProxyType(slack))
        object.__setattr__(self, "check_outputs", bool(self.check_outputs))

    @property
    def process_alpha(self) -> float:
        """The level each comparison of the multi-process rule is tested at: ``alpha``, or less
        when the run makes so many gated comparisons that ``family_alpha`` would be exceeded."""
        return min(self.alpha, self.family_alpha / self.comparisons)

    def tolerance_for(self, metric: str) -> float:
        """The allowed worsening for ``metric``: its override, else the default tolerance."""
        return self.tolerances.get(metric, self.tolerance)

    def limits_for(self, metric: str) -> list[tuple[str, float]]:
        """``[("max", 50.0), ...]``: the absolute limits set on ``metric``."""
        return [
            (kind, self.limits[f"{kind}_{metric}"])
            for kind in ("max", "min")
            if f"{kind}_{metric}" in self.limits
        ]


@dataclass
class MetricVerdict:
    """The verdict on one metric (or on the outcome / output) of one entry."""

    metric: str
    verdict: Verdict
    gated: bool
    detail: str  # one human line, with units
    runs: int = 0  # baseline runs that have this metric (ok outcome, a median)
    tolerance: float = 0.0  # the configured tolerance for this metric
    baseline: float | None = None  # center: median of the baseline runs' medians
    current: float | None = None
    ratio: float | None = None  # current / baseline; None when either is missing or 0
    threshold: float | None = None  # the value beyond which it counts as regressed
    p_value: float | None = None  # one-sided, in the direction of the observed change
    spread: float | None = None  # between-run CV of the baseline runs' medians (>= 2 runs)
    allowed: float | None = None  # the effective allowed fraction (tolerance or k x spread)
    limit: str | None = None  # "max_ms_per_token=50" when an absolute limit was violated
    processes: int = 1  # current process medians judged (the multi-process rule from 2 on)
    #: The stored runs behind a verdict that moved, summarized for reports and plots
    #: (report.attach_history); None otherwise, and never part of the decision.
    history: list[dict[str, Any]] | None = None

    @property
    def failed(self) -> bool:
        return self.gated and self.verdict in _FAILING


# For a one-word summary: failures first by severity, then the most notable passing verdict.
_FAILED_RANK = (Verdict.NEW_OOM, Verdict.REGRESSED, Verdict.OUTPUT_CHANGED)
_PASSING_RANK = (
    Verdict.FIXED_OOM,
    Verdict.NO_BASELINE,
    Verdict.REGRESSED,  # not gated: reported, not failing
    Verdict.OUTPUT_CHANGED,  # without check_outputs
    Verdict.IMPROVED,
    Verdict.PASS,
)


@dataclass
class EntryVerdict:
    """All verdicts of one entry (one workload of one test on one backend).

    ``metrics[0]`` is the outcome verdict; then the output verdict (when both sides have a
    digest); then one verdict per measured metric, in the record's order.
    """

    key: str
    metrics: list[MetricVerdict]
    #: The gate did not fail it: the failing numbers were measured on a contended device.
    inconclusive: bool = False

    @property
    def failed(self) -> bool:
        return any(m.failed for m in self.metrics)

    def failures(self) -> list[MetricVerdict]:
        return [m for m in self.metrics if m.failed]

    @property
    def worst(self) -> Verdict:
        """One word for the entry: the most severe failure, else the most notable verdict of
        the outcome, the output and the gated metrics (fixed-oom > no-baseline > ungated
        regressed > unchecked output-changed > improved > pass). A passing entry can thus read
        "regressed" (a gated metric whose limit test did not trip, e.g. within abs_slack is not
        regressed; one that is reported but not gated never shows here): check ``failed`` for
        red/green."""
        if self.inconclusive:
            return Verdict.INCONCLUSIVE
        failed = {m.verdict for m in self.failures()}
        for v in _FAILED_RANK:
            if v in failed:
                return v
        # Ungated metrics (warm-up, load time) move a lot and are only reported; they do not
        # get to call a passing entry "improved" or "regressed".
        present = {
            m.verdict for m in self.metrics if m.gated or m.metric in ("outcome", "output_digest")
        }
        for v in _PASSING_RANK:
            if v in present:
                return v
        return Verdict.PASS

    def get(self, metric: str) -> MetricVerdict | None:
        """The verdict on ``metric`` (or "outcome" / "output_digest"), if there is one."""
        for m in self.metrics:
            if m.metric == metric:
                return m
        return None


# --------------------------------------------------------------------------- formatting


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def _p(p: float) -> str:
    return f"{p:.2g}"


# --------------------------------------------------------------------------- statistics


def between_run_spread(medians: Sequence[float]) -> float | None:
    """Robust coefficient of variation of run medians; None for < 2 runs or a zero center.

    1.4826 × MAD / median (the normal-consistent MAD) from 3 runs on, the sample sd of the
    two for 2 runs. Robust on purpose: one baseline run recorded on a contended machine must
    not widen the allowance (2 × spread) and so switch the gate off until it ages out.
    """
    values = [float(v) for v in medians]
    if len(values) < 2:
        return None
    center = statistics.median(values)
    if center == 0:
        return None
    if len(values) == 2:
        return statistics.stdev(values) / abs(center)
    mad = statistics.median(abs(v - center) for v in values)
    return 1.4826 * mad / abs(center)


def log_spread(medians: Sequence[float]) -> float | None:
    """Sample sd of the logs of run medians: the scatter the multi-process rule's Welch t test
    sees. Not robust, on purpose: one stored run ten times slower widens what the test needs
    by as much, and :func:`minimum_detectable` must say so. None for < 2 values or a value
    that is not positive."""
    values = [float(v) for v in medians]
    if len(values) < 2 or min(values) <= 0:
        return None
    return statistics.stdev(math.log(v) for v in values)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ; when one is a prefix of the
    other, the length of the shorter one; None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def _prediction_p(current: float, medians: Sequence[float], worse_is_greater: bool) -> float | None:
    """One-sided p of ``current`` under a t predictive distribution fitted to ``medians``."""
    n = len(medians)
    sd = statistics.stdev(medians)
    if sd == 0:
        return None
    # scipy costs ~0.4 s to import: only a run that judges pays it (the plugin is loaded by
    # every pytest run in the environment, most of which never judge anything).
    from scipy import stats

    t = (current - statistics.fmean(medians)) / (sd * math.sqrt(1 + 1 / n))
    return float(stats.t.sf(t, n - 1) if worse_is_greater else stats.t.cdf(t, n - 1))


#: Share of each side trimmed at either end by the multi-process test (Yuen's trimmed t). On
#: this project's shared CPU host process medians are heavy-tailed (one process in ten runs
#: 20-70 % slow): untrimmed, such a process inflates Welch's variance and hides a real +10 %
#: (caught 55 % of the time with K = 8, N = 8 there), trimmed 20 % it is caught 74 % at the
#: same false-alarm rate. A side with fewer than MIN_TRIMMED values is not trimmed.
TRIM = 0.2
MIN_TRIMMED = 8


def two_sample_p(current: Sequence[float], base: Sequence[float], greater: bool) -> float:
    """One-sided p that ``current`` lies above (``greater``) or below ``base``: Yuen's trimmed
    Welch t test (``TRIM``) on the logarithms (ratios, not differences, are what is comparable
    across workloads; Welch because the stored runs may come from a quieter or noisier day than
    this run; trimmed because one slow process must neither fake nor hide a change). Values that
    are not all positive are tested as they are. Two constant samples: 0 when they differ in the
    asked direction, else 1 (a deterministic change, e.g. of memory, needs no test)."""
    cur, bas = [float(v) for v in current], [float(v) for v in base]
    if min(cur + bas) > 0:
        cur, bas = [math.log(v) for v in cur], [math.log(v) for v in bas]
    (mc, dc, hc), (mb, db, hb) = _yuen(cur), _yuen(bas)
    se2 = dc + db
    if se2 == 0:  # constant (or all spread in the trimmed tails): no test to make
        diff = mc - mb
        return 0.0 if (diff > 0 if greater else diff < 0) else 1.0
    from scipy import stats

    t = (mc - mb) / math.sqrt(se2)
    df = se2**2 / (dc**2 / (hc - 1) + db**2 / (hb - 1))
    return float(stats.t.sf(t, df) if greater else stats.t.cdf(t, df))


def trim_count(n: int) -> int:
    """Values trimmed at each end of a side of ``n`` process or run medians: ``TRIM`` of them
    from ``MIN_TRIMMED`` values on, none below (a side of 5 trimmed to 3 would estimate its
    variance from 3 values: the test would lose its level and most of its power)."""
    return int(TRIM * n) if n >= MIN_TRIMMED else 0


def _yuen(values: Sequence[float]) -> tuple[float, float, int]:
    """(trimmed mean, squared standard error from the winsorized variance, values kept)."""
    xs = sorted(values)
    n = len(xs)
    g = trim_count(n)
    h = n - 2 * g
    kept = xs[g : n - g]
    wins = [min(max(v, xs[g]), xs[n - g - 1]) for v in xs]
    return statistics.fmean(kept), (n - 1) * statistics.variance(wins) / (h * (h - 1)), h


#: Simulated trials behind :func:`minimum_detectable` (its 90 % quantile is then known to about
#: ±1 % of its value) and their fixed seed: the same inputs always give the same answer.
_MDE_TRIALS = 20_000
_MDE_SEED = 11


def _trimmed(x: Any) -> tuple[Any, Any]:
    """Per row of ``x``: what :func:`_yuen` computes for one side, for many trials at once."""
    import numpy as np

    n = x.shape[1]
    g = trim_count(n)
    h = n - 2 * g
    xs = np.sort(x, axis=1)
    mean = xs[:, g : n - g].mean(axis=1)
    wins = np.clip(xs, xs[:, [g]], xs[:, [n - g - 1]])
    d = (n - 1) * wins.var(axis=1, ddof=1) / (h * (h - 1))
    return mean, d


@functools.lru_cache(maxsize=64)
def _detection_terms(runs_k: int, processes_n: int, alpha: float) -> tuple[Any, Any]:
    """Per simulated trial, in units of sigma: ``(a, b)`` such that the trial is red iff the
    log slowdown ``d`` satisfies ``d > sigma * a`` (the test) and ``d > log1p(allowed) - sigma
    * b`` (the minimum change). Standard normal draws, so one table serves every sigma; the
    test is the rule's own (Yuen's trimmed Welch t, ``TRIM``)."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(_MDE_SEED)
    base = rng.standard_normal((_MDE_TRIALS, runs_k))
    cur = rng.standard_normal((_MDE_TRIALS, processes_n))
    b = np.median(cur, axis=1) - np.median(base, axis=1)
    if processes_n == 1:
        return None, b  # the one-process rule has no test, only the allowance
    mc, vc = _trimmed(cur)
    mb, vb = _trimmed(base)
    hc = processes_n - 2 * trim_count(processes_n)
    hb = runs_k - 2 * trim_count(runs_k)
    se = np.sqrt(vc + vb)
    df = (vc + vb) ** 2 / (vc**2 / (hc - 1) + vb**2 / (hb - 1))
    a = stats.t.ppf(1 - alpha, df) * se - (mc - mb)
    return a, b


def minimum_detectable(
    spread: float | None,
    runs_k: int,
    processes_n: int,
    alpha: float,
    tolerance: float,
    power: float = 0.9,
    spread_multiple: float = 2.0,
) -> float | None:
    """The smallest slowdown (0.061 = +6.1 %) the gate turns red with probability ``power``,
    for ``runs_k`` stored runs and ``processes_n`` current processes whose medians scatter by
    ``spread``: the sd of their logs. For N >= 2 pass :func:`log_spread` of the stored run
    medians, the scatter Welch's t will see; for N = 1 :func:`between_run_spread`, the robust CV
    the one-process rule's allowance is made of (the two agree for normal scatter of a few
    percent; one outlying run makes the log sd, and so what the test needs, much larger). None
    without a spread or with fewer than 2 stored runs (the one-run rule tests the rounds of one
    process, which says nothing about processes).

    ``alpha`` is the level each comparison is tested at (``GateSettings.process_alpha``: the
    family-wise budget shared by the run's gated comparisons); ``tolerance`` the minimum change.

    The model: log process medians are normal with sd ``spread``, stored and current alike, and
    a regression shifts the current ones. The rules are those of :func:`compare_metric`:

    * N >= 2: red iff the rule's one-sided trimmed Welch t test on the logs gives p < alpha
      AND the median of the N process medians is worse than the median of the K run medians
      by more than the tolerance.
    * N = 1: red iff the current median is worse than the center by more than
      ``max(tolerance, spread_multiple x spread)``, with ``spread`` taken as the stored runs'
      (the one the gate will use).

    Why simulated, not the textbook formula: ``(t_{1-alpha,df} + t_{power,df}) x sigma x
    sqrt(1/K + 1/N)`` (df = K + N - 2), floored at the tolerance, reaches only about 80 %
    power (the K stored runs estimate their variance poorly, Welch's df is lower) and 50 % where
    the tolerance floor binds (the median must clear it, and it only does half the time at
    exactly the tolerance). So the rule is applied to ``_MDE_TRIALS`` standard normal trials
    (fixed seed: deterministic); each trial is red from a slowdown on that is linear in sigma,
    and the answer is the ``power`` quantile of those thresholds. For N = 1 it is close to
    ``allowed + z_power x sigma x sqrt(1 + pi/2 / K)``. Not modelled: the confirmation
    re-measurements (N = 1; they can only withdraw a red), the absolute slack, the
    busy-machine policy, and tails heavier than normal (one slow process):
    ``benchmarks/gate_quality.py`` checks the answer on measured runs.
    """
    if spread is None or runs_k < 2:
        return None
    if isinstance(spread, bool) or not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread={spread!r}: expected a finite number >= 0")
    if isinstance(processes_n, bool) or not isinstance(processes_n, int) or processes_n < 1:
        raise ValueError(f"processes_n={processes_n!r}: expected a whole number >= 1")
    if not isinstance(runs_k, int) or isinstance(runs_k, bool):
        raise ValueError(f"runs_k={runs_k!r}: expected a whole number >= 2")
    for label, value in (("alpha", alpha), ("power", power)):
        if not 0 < value < 1:
            raise ValueError(f"{label}={value!r}: expected a number with 0 < {label} < 1")
    _check_fraction("tolerance", tolerance)
    _check_fraction("spread_multiple", spread_multiple)
    import numpy as np

    a, b = _detection_terms(runs_k, processes_n, float(alpha))
    if processes_n == 1:
        needed = math.log1p(max(tolerance, spread_multiple * spread)) - spread * b
    else:
        needed = np.maximum(spread * a, math.log1p(tolerance) - spread * b)
    return math.expm1(float(np.quantile(needed, power)))


def _mwu_p(current: Sequence[float], base: Sequence[float], greater: bool) -> float:
    from scipy import stats

    res = stats.mannwhitneyu(
        list(current), list(base), alternative="greater" if greater else "less"
    )
    return float(res.pvalue)


# --------------------------------------------------------------------------- comparison


def base_values(name: str, runs: Sequence[Mapping[str, Any]]) -> list[tuple[float, list[float]]]:
    """(median, samples) of ``name`` in each ok run that has a median for it, oldest first."""
    out = []
    for run in runs:
        if run.get("outcome") != "ok":
            continue
        m = (run.get("metrics") or {}).get(name)
        if not m or m.get("median") is None:
            continue
        out.append((float(m["median"]), [float(s) for s in m.get("samples") or []]))
    return out


def _apply_limits(mv: MetricVerdict, current: float | None, settings: GateSettings) -> None:
    name = mv.metric
    unit = metric(name).unit
    for kind, lim in settings.limits_for(name):
        key = f"{kind}_{name}={lim:g}"
        if current is None:
            raise ValueError(
                f"limit {key} cannot be checked: this workload has no value for {name}"
            )
        violated = current > lim if kind == "max" else current < lim
        if violated:
            word = "above" if kind == "max" else "below"
            head = f"{name} {format_value(current, unit)} {word} the absolute limit {key}"
            mv.detail = head if mv.verdict is Verdict.NO_BASELINE else f"{head}; {mv.detail}"
            mv.verdict = Verdict.REGRESSED
            mv.gated = True
            mv.limit = key
            if mv.threshold is None:
                mv.threshold = lim
        else:
            mv.detail += f"; within the absolute limit {key}"


def compare_metric(
    name: str,
    current: MetricValue,
    baseline_runs: Sequence[Mapping[str, Any]],
    settings: GateSettings,
) -> MetricVerdict:
    """Judge one metric's current value against the baseline runs (see the module docstring).

    ``baseline_runs`` may hold runs of any outcome; only ``ok`` runs with a median count.
    Absolute limits in ``settings`` for this metric are applied too.
    """
    cur = current.value
    if cur is not None:
        cur = float(cur)
        if math.isnan(cur):
            raise ValueError(f"{name}: the current value is NaN")
    c = _Comparison(name, settings, base_values(name, baseline_runs), current, cur)
    if cur is None:
        mv = c.verdict(Verdict.PASS, f"{name}: no value in this run (not judged)")
    elif not c.base:
        have = sum(1 for r in baseline_runs if r.get("outcome") == "ok")
        mv = c.verdict(
            Verdict.NO_BASELINE,
            f"{name} {format_value(cur, c.unit)}: no baseline for this metric "
            f"({have} ok baseline run{'s' if have != 1 else ''}, none with {name})",
        )
    else:
        mv = c.compare(cur)
    _apply_limits(mv, cur, settings)
    return mv


@dataclass
class _Comparison:
    """One metric of one record against the stored runs' medians (and samples)."""

    name: str
    settings: GateSettings
    base: list[tuple[float, list[float]]]
    current: MetricValue
    cur: float | None

    @property
    def unit(self) -> str:
        return metric(self.name).unit

    @property
    def tol(self) -> float:
        return self.settings.tolerance_for(self.name)

    @property
    def slack(self) -> float:
        return self.settings.abs_slack.get(self.name, 0.0)

    def verdict(self, v: Verdict, detail: str, **kw: Any) -> MetricVerdict:
        gated = self.name in self.settings.gate
        return MetricVerdict(
            self.name,
            v,
            gated,
            detail,
            runs=len(self.base),
            tolerance=self.tol,
            current=self.cur,
            **kw,
        )

    def compare(self, cur: float) -> MetricVerdict:
        lower = metric(self.name).lower_is_better
        medians = [m for m, _ in self.base]
        if len(self.current.processes) >= 2 and len(medians) >= 2:
            return self.compare_processes(cur, medians, lower)
        center = statistics.median(medians)
        spread = between_run_spread(medians) if len(medians) >= 2 else None
        allowed = (
            self.tol if spread is None else max(self.tol, self.settings.spread_multiple * spread)
        )
        margin = max(allowed * abs(center), self.slack)
        # Signed change in the "worse" direction: > 0 means worse.
        worse = ((cur - center) if lower else (center - cur)) > 0
        beyond = abs(cur - center) > margin
        # p-value, one-sided in the direction of the observed change (does the current lie
        # above the center?).
        p, p_text, significant, notes = self.significance(cur, medians, worse == lower, beyond)
        if beyond and significant:
            v = Verdict.REGRESSED if worse else Verdict.IMPROVED
        else:
            v = Verdict.PASS
        notes += self.slack_note(cur, center, allowed)
        detail = self.detail(cur, center, spread, allowed, lower) + p_text
        if notes:
            detail += "; " + "; ".join(notes)
        return self.judged(v, detail, cur, center, margin, lower, p, spread, allowed)

    def compare_processes(self, cur: float, medians: list[float], lower: bool) -> MetricVerdict:
        """The multi-process rule: N current process medians against K stored run medians.

        Regressed when a one-sided trimmed Welch t test (Yuen, ``TRIM``) on the logarithms says
        the current processes are worse (p < ``process_alpha``) AND the median of the process
        medians is worse than the center by more than the tolerance (and the absolute slack):
        the test controls the false alarms, the tolerance is the smallest change worth a red.
        """
        procs = list(self.current.processes)
        center = statistics.median(medians)
        spread = between_run_spread(medians)
        margin = max(self.tol * abs(center), self.slack)
        worse = ((cur - center) if lower else (center - cur)) > 0
        beyond = abs(cur - center) > margin
        p = two_sample_p(procs, medians, greater=worse == lower)
        level = self.settings.process_alpha
        significant = p < level
        v = (
            (Verdict.REGRESSED if worse else Verdict.IMPROVED)
            if beyond and significant
            else Verdict.PASS
        )
        notes = []
        if beyond and not significant:
            notes.append(f"not significant at {_p(level)}")
        notes += self.slack_note(cur, center, self.tol)
        change = self.change(cur, center)
        family = (
            f"alpha {self.settings.family_alpha:g} over {self.settings.comparisons} gated "
            "comparisons"
            if self.settings.process_alpha < self.settings.alpha
            else f"alpha {self.settings.alpha:g}"
        )
        detail = (
            f"{self.name} {format_value(center, self.unit)} → {format_value(cur, self.unit)} "
            f"({change}; median of {len(procs)} processes vs {len(medians)} baseline runs), "
            f"trimmed Welch t on log process medians p={_p(p)} (needs < {_p(level)}: {family}), "
            f"minimum change {'+' if lower else '-'}{_pct(self.tol)}"
        )
        if self.slack:
            detail += f"; changes up to {format_value(self.slack, self.unit)} ignored"
        if notes:
            detail += "; " + "; ".join(notes)
        return self.judged(
            v, detail, cur, center, margin, lower, p, spread, self.tol, processes=len(procs)
        )

    def judged(
        self,
        v: Verdict,
        detail: str,
        cur: float,
        center: float,
        margin: float,
        lower: bool,
        p: float | None,
        spread: float | None,
        allowed: float,
        processes: int = 1,
    ) -> MetricVerdict:
        """The verdict of a comparison with a center, whichever rule made it."""
        return self.verdict(
            v,
            detail,
            baseline=center,
            ratio=cur / center if center != 0 else None,
            threshold=center + margin if lower else center - margin,
            p_value=p,
            spread=spread,
            allowed=allowed,
            processes=processes,
        )

    def change(self, cur: float, center: float) -> str:
        """``×1.102, +10.2%``, or the absolute change when the center is zero."""
        if center != 0:
            ratio = cur / center
            return f"×{ratio:.3f}, {'+' if ratio >= 1 else ''}{_pct(ratio - 1)}"
        delta = cur - center
        return f"{'+' if delta >= 0 else '-'}{format_value(abs(delta), self.unit)} from zero"

    def slack_note(self, cur: float, center: float, allowed: float) -> list[str]:
        """Said when only the absolute slack kept a change beyond the relative allowance."""
        if self.slack and allowed * abs(center) < abs(cur - center) <= self.slack:
            return [f"within the {format_value(self.slack, self.unit)} absolute slack"]
        return []

    def significance(
        self, cur: float, medians: list[float], greater: bool, beyond: bool
    ) -> tuple[float | None, str, bool, list[str]]:
        """(p, its text, whether it lets a change count, notes): a prediction test with two
        or more runs (informative), Mann-Whitney on one run's samples (deciding)."""
        if len(medians) >= 2:
            p = _prediction_p(cur, medians, worse_is_greater=greater)
            return p, (f", p={_p(p)}" if p is not None else ""), True, []
        cur_samples, base_samples = list(self.current.samples), self.base[0][1]
        nc, nb = len(cur_samples), len(base_samples)
        alpha = self.settings.alpha
        if nc < 2 or nb < 2:
            return None, "", True, ["no samples to test, the tolerance decides"] if beyond else []
        if 1 / math.comb(nc + nb, nc) >= alpha:
            note = (
                f"too few samples ({nc} vs {nb}) for Mann-Whitney to reach "
                f"alpha={alpha:g}, the tolerance decides"
            )
            return None, "", True, [note] if beyond else []
        p = _mwu_p(cur_samples, base_samples, greater=greater)
        significant = p < alpha
        notes = [f"not significant at alpha={alpha:g}"] if beyond and not significant else []
        return p, f", Mann-Whitney p={_p(p)}", significant, notes

    def detail(
        self, cur: float, center: float, spread: float | None, allowed: float, lower: bool
    ) -> str:
        """The human line: old → new, the change, what was allowed and why."""
        unit, tol, n = self.unit, self.tol, len(self.base)
        change = self.change(cur, center)
        if n < 2:
            why = "tolerance; 1 baseline run"
        elif spread is not None and self.settings.spread_multiple * spread > tol:
            why = (
                f"{self.settings.spread_multiple:g} × between-run CV {_pct(spread)} over {n} "
                f"runs; tolerance {_pct(tol)}"
            )
        else:
            cv = "n/a" if spread is None else _pct(spread)
            why = f"tolerance; between-run CV {cv} over {n} runs"
        if self.slack:
            why += f"; changes up to {format_value(self.slack, unit)} ignored"
        return (
            f"{self.name} {format_value(center, unit)} → {format_value(cur, unit)} ({change}), "
            f"allowed {'+' if lower else '-'}{_pct(allowed)} ({why})"
        )


def _outcome_verdict(v: Verdict, detail: str, runs: int) -> MetricVerdict:
    return MetricVerdict("outcome", v, True, detail, runs=runs)


def _output_verdict(
    record: Record, runs: Sequence[Mapping[str, Any]], settings: GateSettings
) -> MetricVerdict | None:
    if not record.output_digest:
        return None
    ref = next(
        (r for r in reversed(runs) if r.get("outcome") == "ok" and r.get("output_digest")),
        None,
    )
    if ref is None:
        return None

    def mv(v: Verdict, detail: str) -> MetricVerdict:
        return MetricVerdict("output_digest", v, settings.check_outputs, detail, runs=len(runs))

    if ref["output_digest"] == record.output_digest:
        return mv(Verdict.PASS, "output identical to the baseline (same digest)")
    head_now, head_base = record.output_head, ref.get("output_head")
    suffix = "" if settings.check_outputs else " (not gated: --llmperf-check-outputs is off)"
    if head_now is None or head_base is None:
        where = "no token heads stored to locate the change"
    else:
        pos = first_divergence(head_base, head_now)
        if pos is None:
            where = (
                f"the first {len(head_now)} tokens agree: it differs beyond them "
                f"or in another batch row"
            )
        else:
            b = head_base[pos] if pos < len(head_base) else "end"
            c = head_now[pos] if pos < len(head_now) else "end"
            where = f"first diverging token at position {pos} (baseline {b}, now {c})"
    return mv(Verdict.OUTPUT_CHANGED, f"output changed: {where}{suffix}")


def _outcome_of(outcome: str, runs: list[Mapping[str, Any]]) -> MetricVerdict:
    """The outcome verdict: no baseline, new or fixed OOM, or as in the baseline."""
    n = len(runs)
    if not runs:
        detail = f"no baseline for this entry on this hardware (outcome now {outcome})"
        return _outcome_verdict(Verdict.NO_BASELINE, detail, 0)
    newest = runs[-1]
    base_outcome = newest["outcome"]
    desc = f"newest of {n} baseline run{'s' if n != 1 else ''}, {newest.get('date', '?')}"
    if base_outcome == "ok" and outcome == "oom":
        return _outcome_verdict(
            Verdict.NEW_OOM, f"out of memory now; the baseline was ok ({desc})", n
        )
    if base_outcome == "oom" and outcome == "ok":
        return _outcome_verdict(
            Verdict.FIXED_OOM, f"runs now; the baseline was out of memory ({desc})", n
        )
    if outcome == "oom":
        return _outcome_verdict(Verdict.PASS, f"out of memory, as in the baseline ({desc})", n)
    return _outcome_verdict(Verdict.PASS, f"ok, as in the baseline ({desc})", n)


def judge(
    record: Record,
    baseline_runs: Sequence[Mapping[str, Any]] | None,
    settings: GateSettings,
) -> EntryVerdict:
    """Judge one record against its baseline entry (oldest run first). See the module
    docstring for the rule. Raises ``ValueError`` for an ``error`` outcome (never judged), an
    unknown outcome, or a limit on a metric this ``ok`` record did not measure."""
    outcome = record.outcome
    if outcome == "error":
        raise ValueError(
            f"{record.key}: outcome 'error' is never judged; the error fails the test itself"
        )
    if outcome not in ("ok", "oom"):
        raise ValueError(f"{record.key}: unknown outcome {outcome!r}; expected ok, oom or error")
    runs = list(baseline_runs or [])
    for run in runs:
        if run.get("outcome") not in ("ok", "oom"):
            raise ValueError(
                f"{record.key}: baseline run {run.get('date', '?')} has outcome "
                f"{run.get('outcome')!r}; only ok and oom are stored"
            )
    out = [_outcome_of(outcome, runs)]
    compare = outcome == "ok" and bool(runs)
    if compare:
        ov = _output_verdict(record, runs, settings)
        if ov is not None:
            out.append(ov)

    if outcome == "ok":
        for name, value in record.metrics.items():
            if compare:
                out.append(compare_metric(name, value, runs, settings))
            elif settings.limits_for(name):
                out.append(compare_metric(name, value, [], settings))
        missing = [key for key in settings.limits if _split_limit(key)[1] not in record.metrics]
        if missing:
            raise ValueError(
                f"{record.key}: limit {', '.join(sorted(missing))} cannot be checked: this "
                f"workload measured only {', '.join(record.metrics) or 'nothing'}"
            )
    return EntryVerdict(key=record.key, metrics=out)
