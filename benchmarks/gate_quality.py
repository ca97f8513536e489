"""How often does the regression gate cry wolf, and how often does it catch a real slowdown?

Why this script exists
----------------------
The verdict rule (``pytest_llmperf.verdict``) is built on one observation: on shared machines
the noise lives *between* runs (processes), not within one. A tiny BLOOM measured in 14
separate processes showed a within-process CV of 0.75 % but process medians scattered with
sigma 1.1 %. A rule tuned on samples from one process would look perfect here and fail in CI.
So this benchmark measures a pool of runs, **each in its own fresh pytest process**, through
the plugin's own measuring path (``pytest suites -m cpu --llmperf-report DIR``), and then
resamples that pool to estimate, with 95 % confidence intervals:

* the false-alarm rate per comparison (goal <= 1 %) on A/A comparisons (same code, new run),
* the chance that a whole-suite A/A run shows any red (goal <= 5 %),
* the detection rate of +5 % and +10 % slowdowns (goals >= 90 % and >= 99 %).

Slowdowns are *simulated*: the current run's samples are multiplied by 1.05 or 1.10 (a real
run, really measured, made slower on paper). Each trial draws K + 1 distinct runs from the pool:
K baseline runs (the stored history, oldest first) and one current run. The baseline runs are
built exactly like the baseline store builds them (``baselines.record_to_run``), and the
default rule is ``verdict.compare_metric`` with default ``GateSettings()``. For comparison the
same draws are judged by

* a fixed 5 % factor (optimum-habana's TIME_PERF_FACTOR style): regressed when the current
  median is worse than 1.05 x the newest baseline run's median;
* Mann-Whitney alone: a one-sided U test of the current samples against the newest baseline
  run's samples, regressed when p < alpha (GateSettings().alpha);
* the default rule with shorter histories (``--short-history``, default 1,2,3): a history
  starts at ``llmperf baselines record --runs 3`` runs and restarts at 1 run whenever the
  versions change, so those regimes are what CI actually meets after an upgrade.

The multi-process rule (``--llmperf-processes=N``, second table)
--------------------------------------------------------------
Each trial then draws K + N distinct runs: K stored runs and N current processes, for every K
in ``--histories`` (5, 8) and N in ``--processes`` (1, 4, 8, 16; a K, N the pool is too small
for is skipped and said). The N processes are combined as ``ProcessPool.combine`` does
(``MetricValue.processes`` = their medians, ``value`` = the median of those; a slowdown scales
each process) and judged by ``compare_metric`` with ``GateSettings(tolerance=T,
comparisons=m)``: T from ``--process-tolerance`` (0.03, 0.05), m the gated comparisons of one
process of the suite (``--comparisons``, default 2 x the pool's workloads). N = 1 rows are
today's rule, alone and with the confirmation, at ``--one-process-tolerance`` (8 %, the CPU
default, and 3 %). The suite's wall time for N processes is N x one process's, estimated from
the pool's wall times with the rounds beyond the plugin's 10 taken off. Two checks follow: the
minimum detectable slowdown ``llmperf baselines show`` prints (``verdict.minimum_detectable``),
tested against the detection the resampling finds at exactly that slowdown (``--mde-check``),
and the "day drift": the pool's level against the repository's stored baselines of the same
entries, recorded at other times, which the tolerance has to absorb.
``--also-mann-whitney`` adds the rows of the same rule with a one-sided Mann-Whitney test on
the process medians in place of Welch's t (rank-based: one process slowed 10x by a neighbour
weighs like any other slow one). ``--drop-runs`` leaves runs out (numbers as measured), to see
how much a few contaminated runs weigh.

Confidence
----------
The confidence intervals are Wilson intervals over the resampled comparisons. They say how
precisely *this pool* was resampled, not how well the pool stands for the machine: trials reuse
the same N runs, so the pool itself is the larger uncertainty. The report therefore also gives a
jackknife standard error over the pool's runs and names the current runs behind every false
alarm (one slow process can make all of them). A pool of N runs cannot show a false-alarm rate
much below 1/N per run drawn as current; measure more runs for a README figure.

Usage
-----
    python benchmarks/gate_quality.py --runs 20 --pool gate_pool.json --json gate_quality.json
    python benchmarks/gate_quality.py --reuse --pool gate_pool.json --trials 20000   # analysis
    python benchmarks/gate_quality.py --runs 30 --reuse --pool gate_pool.json  # add 10 runs
    python benchmarks/gate_quality.py --reuse --pool gate_pool.json --processes 8 --histories 5

Run it on a quiet machine: every other process on it is part of what gets measured. It always
exits 0 once it has figures (a measurement, not a test); a figure that misses its goal is
marked GOAL MISSED.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats

from pytest_llmperf import baselines
from pytest_llmperf.baselines import record_to_run
from pytest_llmperf.gate import GatePolicy, decide
from pytest_llmperf.metrics import METRICS
from pytest_llmperf.metrics import metric as metric_info
from pytest_llmperf.noise import scatter
from pytest_llmperf.report import load_results
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.units import format_value
from pytest_llmperf.verdict import (
    GateSettings,
    Verdict,
    base_values,
    between_run_spread,
    compare_metric,
    judge,
    log_spread,
    minimum_detectable,
)

REPO = Path(__file__).resolve().parent.parent
POOL_SCHEMA = "llmperf-gate-quality-pool/1"
DEFAULT_RUNS = 20
#: Rounds of one measurement (the plugin's default --llmperf-rounds).
ROUNDS = 10
# Metrics with per-round samples (Mann-Whitney needs them); the others are single readings.
SAMPLED = ("e2e_latency_s", "ms_per_token", "tokens_per_s", "tpot_s", "ttft_s")
SCENARIOS = (("aa", 1.0), ("s5", 1.05), ("s10", 1.10))
#: Trials per workload of the minimum-detectable check (its 90 % is then known to +-1.3 %).
MDE_TRIALS = 2000
# figure -> (label, comparison, goal)
FIGURES: dict[str, tuple[str, str, float]] = {
    "aa": ("false alarms / comparison", "<=", 0.01),
    "suite": ("suite A/A any red", "<=", 0.05),
    "s5": ("+5% caught", ">=", 0.90),
    "s10": ("+10% caught", ">=", 0.99),
}


# ----------------------------------------------------------------------------- the pool


def pytest_command(select: str | None, extra: Sequence[str]) -> list[str]:
    """The pytest arguments of one pool run, without the per-run report/baselines folders."""
    cmd = [
        "suites",
        "-m",
        "cpu",
        "--llmperf-backend",
        "cpu",
        "--llmperf-models",
        "tiny",
        "--llmperf-no-gate",
        "-p",
        "no:cacheprovider",
        "-q",
    ]
    if select:
        cmd += ["-k", select]
    return cmd + list(extra)


def measure_run(pytest_args: list[str]) -> tuple[list[dict[str, Any]], float]:
    """One fresh pytest process; returns its records (as results.json holds them) and wall s.

    The baselines folder is an empty temporary one: the repository's baselines are neither read
    nor written. Raises RuntimeError with the output's tail when pytest fails.
    """
    with tempfile.TemporaryDirectory(prefix="llmperf-gq-") as tmp:
        report, base = Path(tmp) / "report", Path(tmp) / "baselines"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *pytest_args,
            f"--llmperf-report={report}",
            f"--llmperf-baselines={base}",
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"pytest exited with {proc.returncode}:\n{tail}")
        rows = load_results(report / "results.json")
    records = [row["record"] for row in rows]
    if not records:
        raise RuntimeError("pytest measured nothing: check --select and the suite")
    return records, wall


def load_pool(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("schema") != POOL_SCHEMA:
        raise SystemExit(f"{path}: not a gate-quality pool (schema {data.get('schema')!r})")
    return data


def save_pool(path: Path, pool: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(pool, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_pool(args: argparse.Namespace) -> dict[str, Any]:
    """Load the pool (``--reuse``) and measure runs until it holds ``--runs`` of them."""
    extra = list(args.pytest_arg)
    if args.attempts > 1 and not any(a.startswith("--llmperf-rounds") for a in extra):
        extra.append(f"--llmperf-rounds={ROUNDS * args.attempts}")
    pytest_args = pytest_command(args.select, extra)
    path = Path(args.pool)
    if args.reuse and path.exists():
        pool = load_pool(path)
        if pool["pytest_args"] != pytest_args and (args.select or args.pytest_arg):
            print("note: --select/--pytest-arg ignored: the pool keeps its own arguments")
        pytest_args = pool["pytest_args"]
        print(f"pool: {len(pool['runs'])} runs loaded from {path}", flush=True)
        target = len(pool["runs"]) if args.runs is None else args.runs
    else:
        if args.reuse:
            print(f"pool: {path} does not exist yet; measuring", flush=True)
        elif path.exists():
            old = path.with_name(path.name + ".old")
            os.replace(path, old)
            print(f"note: {path} existed (no --reuse); moved to {old}", flush=True)
        pool = {"schema": POOL_SCHEMA, "pytest_args": pytest_args, "runs": []}
        target = DEFAULT_RUNS if args.runs is None else args.runs
    missing = target - len(pool["runs"])
    if missing > 0:
        print(
            f"measuring {missing} run(s), each a fresh process: "
            f"python -m pytest {shlex.join(pytest_args)}",
            flush=True,
        )
    for _ in range(max(0, missing)):
        n = len(pool["runs"]) + 1
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            records, wall = measure_run(pytest_args)
        except RuntimeError as exc:
            print(f"run {n} failed; the {n - 1} runs measured are kept in {path}\n{exc}")
            break
        pool["runs"].append({"started": started, "wall_s": round(wall, 2), "records": records})
        save_pool(path, pool)
        meds = ", ".join(
            f"{_short(r['workload'])} {_median_ms(r, 'e2e_latency_s')}"
            for r in records
            if r["outcome"] == "ok"
        )
        print(f"run {n}: {len(records)} workloads in {wall:.0f} s: {meds}", flush=True)
    return pool


def drop_runs(pool: dict[str, Any], drop: Sequence[int]) -> dict[str, Any]:
    """The pool without runs ``drop`` (1-based); ``numbers`` keeps the others' numbers."""
    n = len(pool["runs"])
    bad = [i for i in drop if i > n]
    if bad:
        raise SystemExit(f"--drop-runs {','.join(map(str, bad))}: the pool has {n} runs")
    keep = [i for i in range(1, n + 1) if i not in set(drop)]
    print(f"pool: runs {', '.join(map(str, sorted(set(drop))))} left out (--drop-runs)")
    return {**pool, "runs": [pool["runs"][i - 1] for i in keep], "numbers": keep}


def _short(workload: dict[str, Any]) -> str:
    return "/".join(str(workload.get(k)) for k in ("model", "dtype") if k in workload)


def _median_ms(record: dict[str, Any], name: str) -> str:
    m = record.get("metrics", {}).get(name) or {}
    return "-" if m.get("median") is None else f"{m['median'] * 1000:.1f} ms"


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Workload:
    """One workload's runs in the pool: stored runs (as baselines) and each run's measurements.

    ``attempts[i]`` are run ``i``'s consecutive measurements of ROUNDS rounds: the first stands
    for the run (a stored baseline run, or one current process), the later ones are what the
    confirmation's re-measurements in that process would have seen.
    """

    key: str
    label: str
    suite: str
    records: list[Record]
    attempts: list[list[MetricValue]]
    stored: list[dict[str, Any]] = field(default_factory=list)
    gated: list[Record] = field(default_factory=list)  # records with only the gated metrics
    _slowed: dict[tuple[int, int, float], MetricValue] = field(default_factory=dict, repr=False)

    def medians(self) -> list[float]:
        """Each run's median: its first measurement's, what it stands for."""
        return [_value(parts[0]) for parts in self.attempts]

    def measurement(self, run: int, factor: float, attempt: int = 0) -> MetricValue:
        """Run ``run``'s measurement ``attempt`` as if the code were ``factor`` times slower."""
        key = (run, attempt, factor)
        value = self._slowed.get(key)
        if value is None:
            value = self._slowed[key] = slowed(self.attempts[run][attempt], factor)
        return value


def _value(m: MetricValue) -> float:
    if m.value is None:  # workloads_from_pool drops workloads without values
        raise ValueError(f"{m.name}: no value")
    return float(m.value)


def slowed(value: MetricValue, factor: float) -> MetricValue:
    """The metric as if the code were ``factor`` times slower (samples scaled, median redone)."""
    if factor == 1.0:
        return value
    scale = factor if metric_info(value.name).lower_is_better else 1 / factor
    if value.samples:
        return MetricValue.from_samples(value.name, [s * scale for s in value.samples])
    return MetricValue(value.name, None if value.value is None else value.value * scale)


def split_attempts(record: Record, name: str, attempts: int) -> list[MetricValue]:
    """A run's samples as ``attempts`` consecutive measurements of ROUNDS rounds each.

    The first one stands for the run (what a baseline stores, what the gate first judges); the
    later ones are what a re-measurement in the same process right after would have seen.
    """
    samples = record.metrics[name].samples
    if attempts <= 1 or len(samples) < attempts * ROUNDS:
        return [record.metrics[name]]
    return [
        MetricValue.from_samples(name, samples[i * ROUNDS : (i + 1) * ROUNDS])
        for i in range(attempts)
    ]


def workloads_from_pool(pool: dict[str, Any], name: str, attempts: int = 1) -> list[Workload]:
    """Workloads measured ``ok`` with ``name`` in every run of the pool (others are dropped)."""
    per_run = [
        {r["key"]: Record.from_json(r) for r in run["records"] if r["outcome"] == "ok"}
        for run in pool["runs"]
    ]
    keys = [k for k in per_run[0] if all(k in run for run in per_run)] if per_run else []
    dropped = {k for run in per_run for k in run} - set(keys)
    for key in sorted(dropped):
        print(f"note: {key} is not ok in every run; left out", flush=True)
    gate = GateSettings().gate
    out = []
    for key in keys:
        records = [run[key] for run in per_run]
        if any(r.metrics.get(name) is None or r.value(name) is None for r in records):
            print(f"note: {key} has no {name} in some run; left out", flush=True)
            continue
        split = [split_attempts(r, name, attempts) for r in records]
        records = [
            dataclasses.replace(r, metrics={**r.metrics, name: parts[0]})
            for r, parts in zip(records, split)
        ]
        wl = Workload(
            key=key,
            label=_short(records[0].workload) or key,
            suite=records[0].suite,
            records=records,
            attempts=split,
        )
        wl.stored = [record_to_run(r) for r in records]
        wl.gated = [
            dataclasses.replace(r, metrics={m: v for m, v in r.metrics.items() if m in gate})
            for r in records
        ]
        out.append(wl)
    return out


class Current:
    """What one trial judges for one workload: the current run (N = 1) or the N processes'
    medians combined as ``ProcessPool.combine`` combines them (``value`` = their median,
    ``processes`` = the medians, ``samples`` = all rounds), all ``factor`` times slower."""

    def __init__(self, wl: Workload, name: str, runs: Sequence[int], factor: float) -> None:
        self.wl, self.name, self.runs, self.factor = wl, name, list(runs), factor

    @functools.cached_property
    def value(self) -> MetricValue:
        parts = [self.wl.measurement(i, self.factor) for i in self.runs]
        if len(parts) == 1:
            return parts[0]
        medians = [float(p.value) for p in parts if p.value is not None]
        samples = [s for p in parts for s in p.samples]
        return MetricValue(self.name, statistics.median(medians), samples, processes=medians)

    @property
    def attempts(self) -> list[MetricValue]:
        """The single current run's consecutive measurements (the confirmation's view)."""
        (run,) = self.runs
        return [self.wl.measurement(run, self.factor, a) for a in range(len(self.wl.attempts[run]))]


@dataclass(frozen=True)
class Rule:
    """A regression rule: ``red(metric, current, runs)`` sees only the newest ``depth`` baseline
    runs (None: all K). A rule that sees few runs is judged once per distinct draw (cached)."""

    red: Callable[[str, Current, list[dict[str, Any]]], bool]
    depth: int | None = None


def rule_default(settings: GateSettings, depth: int | None = None) -> Rule:
    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        return compare_metric(name, cur.value, runs, settings).verdict is Verdict.REGRESSED

    return Rule(red, depth)


def rule_processes(settings: GateSettings) -> Rule:
    """The multi-process rule (``--llmperf-processes=N``): ``compare_metric`` on the N process
    medians against the K stored run medians, with ``settings.process_alpha``.

    The rule is never red unless the median of the process medians is worse than the center by
    more than the tolerance, so such trials skip the Welch test (scipy's call costs ~0.5 ms, the
    bulk of the analysis): the same verdicts, in a third of the time.
    """

    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        lower = metric_info(name).lower_is_better
        now = _value(cur.value)
        center = statistics.median(float(r["metrics"][name]["median"]) for r in runs)
        worse = (now - center) if lower else (center - now)
        margin = max(settings.tolerance_for(name) * abs(center), settings.abs_slack.get(name, 0))
        if worse <= 0 or abs(now - center) <= margin:
            return False
        return compare_metric(name, cur.value, runs, settings).verdict is Verdict.REGRESSED

    return Rule(red)


def rule_processes_mwu(settings: GateSettings) -> Rule:
    """The multi-process rule with a one-sided Mann-Whitney U test on the process medians in
    place of Welch's t (not what the plugin does: a comparison for ``--also-mann-whitney``)."""

    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        lower = metric_info(name).lower_is_better
        now = _value(cur.value)
        medians = [float(r["metrics"][name]["median"]) for r in runs]
        center = statistics.median(medians)
        worse = (now - center) if lower else (center - now)
        margin = max(settings.tolerance_for(name) * abs(center), settings.abs_slack.get(name, 0))
        if worse <= 0 or abs(now - center) <= margin:
            return False
        alt = "greater" if lower else "less"
        p = stats.mannwhitneyu(cur.value.processes, medians, alternative=alt).pvalue
        return bool(p < settings.process_alpha)

    return Rule(red)


def rule_confirm(settings: GateSettings) -> Rule:
    """The plugin's one-process gate: the default rule, then ``--llmperf-confirm``'s
    re-measurements in the same process (``gate.decide``)."""

    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        return policy_red(name, cur.attempts, runs, settings)

    return Rule(red)


def rule_fixed(factor: float) -> Rule:
    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        base = runs[-1]["metrics"][name]["median"]
        if metric_info(name).lower_is_better:
            return _value(cur.value) > factor * base
        return _value(cur.value) * factor < base

    return Rule(red, 1)


def rule_mwu(alpha: float) -> Rule:
    def red(name: str, cur: Current, runs: list[dict[str, Any]]) -> bool:
        base = runs[-1]["metrics"][name]["samples"]
        alt = "greater" if metric_info(name).lower_is_better else "less"
        return bool(stats.mannwhitneyu(cur.value.samples, base, alternative=alt).pvalue < alpha)

    return Rule(red, 1)


def policy_red(
    name: str, attempts: list[MetricValue], runs: list[dict[str, Any]], settings: GateSettings
) -> bool:
    """Red under the plugin's own gate policy (``gate.decide``): the run's first measurement
    is judged, its later ones are what the confirmation's re-measurements would have seen, and
    a regression on scattered rounds or disagreeing confirmations is inconclusive, not red."""
    records = [
        Record(
            key=name,
            suite="gate-quality",
            backend="cpu",
            device_key="pool",
            outcome="ok",
            metrics={name: m},
            scatter=scatter(m.samples),
        )
        for m in attempts
    ]
    later = iter(records[1:])
    policy = GatePolicy(gating=True, confirm=len(records) - 1)
    return decide(records[0], runs, settings, policy, lambda: next(later)).failed


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def jackknife_se(reds: np.ndarray, counts: np.ndarray, members: np.ndarray) -> float | None:
    """Leave-one-pool-run-out standard error of sum(reds) / sum(counts).

    ``members[t, i]`` is True when trial ``t`` used pool run ``i``; zero events give 0; None
    when fewer than two runs can be left out (every trial uses every run).
    """
    r_all, c_all = reds.sum(), counts.sum()
    m = members.astype(float)
    r_i, c_i = m.T @ reds, m.T @ counts
    left = c_all - c_i
    ok = left > 0
    theta = (r_all - r_i[ok]) / left[ok]
    n = len(theta)
    if n < 2:
        return None
    return float(math.sqrt((n - 1) / n * ((theta - theta.mean()) ** 2).sum()))


def figure(reds: np.ndarray, counts: np.ndarray, members: np.ndarray, key: str) -> dict[str, Any]:
    k, n = int(reds.sum()), int(counts.sum())
    low, high = wilson(k, n)
    rate = k / n
    _, op, goal = FIGURES[key]
    met = rate <= goal if op == "<=" else rate >= goal
    shown = high <= goal if op == "<=" else low >= goal
    return {
        "events": k,
        "n": n,
        "rate": rate,
        "ci95": [low, high],
        "pool_se": jackknife_se(reds, counts, members),
        "goal": f"{op} {goal:g}",
        "met": met,
        "shown_at_95": shown,
    }


def pool_facts(workloads: list[Workload], name: str) -> dict[str, Any]:
    rows = {}
    for wl in workloads:
        meds = wl.medians()
        cvs = [
            statistics.stdev(r.metrics[name].samples) / statistics.fmean(r.metrics[name].samples)
            for r in wl.records
            if len(r.metrics[name].samples) >= 2
        ]
        center = statistics.median(meds)
        rows[wl.key] = {
            "label": wl.label,
            "median": center,
            "within_run_cv_median": statistics.median(cvs) if cvs else None,
            "between_run_cv": statistics.stdev(meds) / statistics.fmean(meds),
            "range": (max(meds) - min(meds)) / center,
            "rounds": len(wl.records[0].metrics[name].samples),
        }
    return rows


@dataclass
class Resampled:
    """The verdicts of one design (K stored runs, N current processes per trial)."""

    draws: np.ndarray  # trials x (K + N) pool run indices: K stored (oldest first), N current
    members: np.ndarray  # trials x pool runs: which runs a trial used (for the jackknife)
    red: dict[str, dict[str, np.ndarray]]  # rule -> scenario -> trials x workloads
    suite_red: np.ndarray | None  # judge() on the whole record (N = 1 only, when asked)


def resample(
    workloads: list[Workload],
    name: str,
    rules: dict[str, Rule],
    k: int,
    n: int,
    trials: int,
    seed: int,
    scenarios: Sequence[tuple[str, float]] = SCENARIOS,
    judge_with: GateSettings | None = None,
) -> Resampled:
    """Judge ``trials`` draws of K + N distinct pool runs with every rule and scenario.

    Every workload of a trial sees the same runs (one suite run is one set of processes), and
    every rule the same draws, so rows differ by their rule only. The seed alone fixes the
    draws: the K=5, N=1 rows repeat the first table's numbers.
    """
    rng = np.random.default_rng(seed)
    n_runs, n_wl = len(workloads[0].records), len(workloads)
    draws = np.array([rng.choice(n_runs, k + n, replace=False) for _ in range(trials)])
    members = np.zeros((trials, n_runs), dtype=bool)
    members[np.arange(trials)[:, None], draws] = True
    red = {r: {s: np.zeros((trials, n_wl), dtype=bool) for s, _ in scenarios} for r in rules}
    suite_red = np.zeros(trials, dtype=bool) if judge_with is not None and n == 1 else None
    cache: dict[tuple[Any, ...], bool] = {}
    start = shown = time.perf_counter()
    for t in range(trials):
        base_idx, cur_idx = [int(i) for i in draws[t, :k]], [int(i) for i in draws[t, k:]]
        for w, wl in enumerate(workloads):
            runs = [wl.stored[i] for i in base_idx]
            for scen, factor in scenarios:
                cur = Current(wl, name, cur_idx, factor)
                for rname, rule in rules.items():
                    depth = k if rule.depth is None else rule.depth
                    if depth >= k:
                        red[rname][scen][t, w] = rule.red(name, cur, runs)
                        continue
                    ckey = (rname, w, scen, *cur_idx, *base_idx[-depth:])
                    hit = cache.get(ckey)
                    if hit is None:
                        hit = cache[ckey] = rule.red(name, cur, runs[-depth:])
                    red[rname][scen][t, w] = hit
            if suite_red is not None and judge_with is not None and not suite_red[t]:
                suite_red[t] = judge(wl.gated[cur_idx[0]], runs, judge_with).failed
        if time.perf_counter() - shown > 60 or t + 1 == trials:
            shown = time.perf_counter()
            print(f"  K={k}, N={n}: {t + 1}/{trials} trials, {shown - start:.0f} s", flush=True)
    return Resampled(draws, members, red, suite_red)


def figures_of(res: Resampled, rule: str) -> dict[str, dict[str, Any]]:
    """The four figures of one rule: per comparison, per suite run, per slowdown."""
    red = res.red[rule]
    trials, n_wl = red["aa"].shape
    per_wl, per_trial = np.full(trials, n_wl, dtype=float), np.ones(trials, dtype=float)
    return {
        "aa": figure(red["aa"].sum(axis=1).astype(float), per_wl, res.members, "aa"),
        "suite": figure(red["aa"].any(axis=1).astype(float), per_trial, res.members, "suite"),
        "s5": figure(red["s5"].sum(axis=1).astype(float), per_wl, res.members, "s5"),
        "s10": figure(red["s10"].sum(axis=1).astype(float), per_wl, res.members, "s10"),
    }


def analyse(
    pool: dict[str, Any], args: argparse.Namespace, workloads: list[Workload]
) -> dict[str, Any]:
    """The one-process rules, K = --history stored runs and 1 current run per trial."""
    name, k_hist = args.metric, args.history
    if not workloads:
        raise SystemExit("no workload was measured ok with that metric in every run")
    n_attempts = min(len(a) for wl in workloads for a in wl.attempts)
    n_runs = len(pool["runs"])
    if n_runs < k_hist + 1:
        raise SystemExit(
            f"the pool has {n_runs} runs; a trial needs {k_hist + 1} distinct ones "
            f"(--history {k_hist} baseline runs + 1 current): measure more (--runs)"
        )
    numbers = pool.get("numbers") or list(range(1, n_runs + 1))  # as measured (--drop-runs)
    settings = GateSettings(tolerance=args.tolerance, spread_multiple=args.spread_multiple)
    rules: dict[str, Rule] = {f"default rule, K={k_hist}": rule_default(settings)}
    for k in args.short_history:
        if k < k_hist:
            rules[f"default rule, K={k}"] = rule_default(settings, k)
    if n_attempts > 1:
        name_confirm = f"gate policy, K={k_hist}, + confirm ({n_attempts - 1} re-measurements)"
        rules[name_confirm] = rule_confirm(settings)
    rules["fixed 5% factor, 1 run"] = rule_fixed(1.05)
    rules[f"Mann-Whitney p<{settings.alpha:g}, 1 run"] = rule_mwu(settings.alpha)

    print(
        f"resampling {args.trials} trials x {len(workloads)} workloads x {len(SCENARIOS)} "
        f"scenarios x {len(rules)} rules (seed {args.seed}) ...",
        flush=True,
    )
    start = time.perf_counter()
    res = resample(workloads, name, rules, k_hist, 1, args.trials, args.seed, judge_with=settings)
    figures = {rname: figures_of(res, rname) for rname in rules}
    culprits: dict[str, dict[str, int]] = {}
    for rname in rules:
        aa = res.red[rname]["aa"]
        who = Counter(numbers[int(res.draws[t, k_hist])] for t in np.flatnonzero(aa.any(axis=1)))
        culprits[rname] = {f"run {i}": c for i, c in who.most_common()}
    assert res.suite_red is not None
    gate_fig = figure(res.suite_red.astype(float), np.ones(args.trials), res.members, "suite")
    main = f"default rule, K={k_hist}"
    per_workload = {
        wl.key: {s: float(res.red[main][s][:, w].mean()) for s in ("aa", "s5", "s10")}
        for w, wl in enumerate(workloads)
    }
    return {
        "metric": name,
        "history": k_hist,
        "trials": args.trials,
        "seed": args.seed,
        "pool_runs": n_runs,
        "pytest_args": pool["pytest_args"],
        "workloads": pool_facts(workloads, name),
        "figures": figures,
        "suite_full_gate": gate_fig,
        "aa_culprits": culprits,
        "per_workload_default": per_workload,
        "seconds": round(time.perf_counter() - start, 1),
    }


# ------------------------------------------------------------- the multi-process rule (N >= 2)


def wall_estimate(pool: dict[str, Any]) -> dict[str, Any]:
    """One process's wall time at the plugin's default ROUNDS rounds, from the pool's runs.

    A pool run measured more rounds (``--attempts``); the time its rounds beyond the first
    ROUNDS took (their e2e_latency_s samples, summed over the workloads) is taken off its wall
    time. What a round costs outside the timed region stays in, so this errs high.
    """
    walls, extra = [], []
    for run in pool["runs"]:
        beyond = 0.0
        for r in run["records"]:
            samples = ((r.get("metrics") or {}).get("e2e_latency_s") or {}).get("samples") or []
            beyond += sum(samples[ROUNDS:])
        walls.append(run["wall_s"] - beyond)
        extra.append(beyond)
    rounds = max(
        len(((r.get("metrics") or {}).get("e2e_latency_s") or {}).get("samples") or [])
        for run in pool["runs"]
        for r in run["records"]
    )
    return {
        "per_process_s": statistics.median(walls),
        "measured_median_s": statistics.median(run["wall_s"] for run in pool["runs"]),
        "rounds_measured": rounds,
        "rounds_removed_median_s": statistics.median(extra),
        "how": (
            f"median over the pool's runs of (wall time - the e2e_latency_s of rounds "
            f"{ROUNDS + 1}..{rounds}); N processes = N x that (children run one at a time)"
            if rounds > ROUNDS
            else "median wall time of the pool's runs; N processes = N x that"
        ),
    }


def analyse_processes(
    pool: dict[str, Any], args: argparse.Namespace, workloads: list[Workload]
) -> dict[str, Any]:
    """K stored runs and N current processes per trial, for every K in --histories and N in
    --processes; N = 1 is judged by today's one-process rules, N >= 2 by the multi-process
    rule with ``GateSettings(tolerance=T, comparisons=m)``."""
    name, n_runs = args.metric, len(pool["runs"])
    m = args.comparisons or 2 * len(workloads)
    level = GateSettings(comparisons=m).process_alpha
    wall = wall_estimate(pool)
    rows: list[dict[str, Any]] = []
    skipped = []
    start = time.perf_counter()
    for k in args.histories:
        for n in args.processes:
            if k + n > n_runs:
                skipped.append(f"K={k}, N={n}: needs {k + n} distinct runs, the pool has {n_runs}")
                continue
            rules: dict[str, tuple[str, float, Rule]] = {}
            if n == 1:
                for tol in args.one_process_tolerance:
                    one = GateSettings(tolerance=tol, spread_multiple=args.spread_multiple)
                    rules[f"default rule {tol:.0%}"] = ("default rule", tol, rule_default(one))
                    rules[f"+ confirm {tol:.0%}"] = (
                        "default rule + confirm",
                        tol,
                        rule_confirm(one),
                    )
            else:
                for tol in args.process_tolerance:
                    multi = GateSettings(tolerance=tol, comparisons=m)
                    rules[f"processes {tol:.0%}"] = ("process medians", tol, rule_processes(multi))
                    if args.also_mann_whitney:
                        rules[f"mwu {tol:.0%}"] = (
                            "process medians, Mann-Whitney",
                            tol,
                            rule_processes_mwu(multi),
                        )
            res = resample(
                workloads, name, {r: v[2] for r, v in rules.items()}, k, n, args.trials, args.seed
            )
            for rname, (label, tol, _) in rules.items():
                rows.append(
                    {
                        "k": k,
                        "n": n,
                        "rule": label,
                        "tolerance": tol,
                        "figures": figures_of(res, rname),
                        "wall_s": n * wall["per_process_s"],
                    }
                )
    return {
        "comparisons": m,
        "process_alpha": level,
        "rows": rows,
        "skipped": skipped,
        "wall": wall,
        "mde_check": mde_check(workloads, args, m),
        "seconds": round(time.perf_counter() - start, 1),
    }


def mde_check(workloads: list[Workload], args: argparse.Namespace, m: int) -> list[dict[str, Any]]:
    """Does ``verdict.minimum_detectable`` (what ``llmperf baselines show`` prints) hold on
    measured runs? Per workload, at the first --process-tolerance: the slowdown it predicts for
    K stored runs and N processes from the pool's spread, the robust CV
    (``between_run_spread``) and the log sd (``log_spread``, what ``show`` uses for N >= 2),
    then the detection rate the resampling finds at exactly that slowdown (predicted: 90 %)."""
    k, n = args.mde_check
    if k + n > len(workloads[0].records):
        return []
    trials = min(args.trials, MDE_TRIALS)
    tol = args.process_tolerance[0]
    settings = GateSettings(tolerance=tol, comparisons=m)
    out = []
    for w, wl in enumerate(workloads):
        for label, spread in (
            ("robust CV", between_run_spread(wl.medians())),
            ("log sd", log_spread(wl.medians())),
        ):
            mde = minimum_detectable(spread, k, n, settings.process_alpha, tol)
            if mde is None or spread is None:
                continue
            res = resample(
                [wl],
                args.metric,
                {"rule": rule_processes(settings)},
                k,
                n,
                trials,
                args.seed + 1 + w,
                scenarios=(("mde", 1 + mde),),
            )
            hits = int(res.red["rule"]["mde"].sum())
            low, high = wilson(hits, trials)
            out.append(
                {
                    "workload": wl.label,
                    "tolerance": tol,
                    "k": k,
                    "n": n,
                    "spread_kind": label,
                    "spread": spread,
                    "mde": mde,
                    "detected": hits / trials,
                    "trials": trials,
                    "ci95": [low, high],
                }
            )
    return out


def day_drift(workloads: list[Workload], name: str, root: Path) -> list[dict[str, Any]]:
    """The pool's level against the repository's stored baselines of the same entries
    (recorded on other days, CPU devices): how far the level moves from day to day, which the
    tolerance has to absorb since the multi-process rule compares against stored runs."""
    if not root.is_dir():
        return []
    files = {
        where: bf for where, bf in baselines.load_dir(root).items() if where[0].startswith("cpu-")
    }
    out = []
    for wl in workloads:
        pool_meds = wl.medians()
        pool_center = statistics.median(pool_meds)
        for (device, suite), bf in sorted(files.items()):
            if suite != wl.suite or wl.key not in bf.entries:
                continue
            runs = bf.entries[wl.key]
            meds = [med for med, _ in base_values(name, runs)]
            if not meds:
                continue
            stored = statistics.median(meds)
            dates = sorted(str(r.get("date", "?")) for r in runs if r.get("outcome") == "ok")
            out.append(
                {
                    "workload": wl.label,
                    "device": device,
                    "stored_runs": len(meds),
                    "stored_dates": [dates[0], dates[-1]] if dates else [],
                    "stored_median": stored,
                    "stored_spread": between_run_spread(meds),
                    "pool_median": pool_center,
                    "pool_spread": between_run_spread(pool_meds),
                    "ratio": pool_center / stored if stored else None,
                }
            )
    return out


# ----------------------------------------------------------------------------- the report


def _pct(x: float | None, digits: int = 1) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.{digits}f}%"
    )


def _se(se: float | None) -> str:
    return "n/a" if se is None else f"±{se * 100:.2f}"


def cell(fig: dict[str, Any]) -> str:
    low, high = fig["ci95"]
    digits = 2 if max(fig["rate"], high) < 0.1 else 1
    text = f"{_pct(fig['rate'], digits)} [{_pct(low, digits)}, {_pct(high, digits)}]"
    if not fig["met"]:
        text += " **GOAL MISSED**"
    elif not fig["shown_at_95"]:
        text += " (goal not shown)"
    return text


def render(res: dict[str, Any], command: str) -> str:
    name = res["metric"]
    unit = METRICS[name].unit
    lines = [
        f"## Gate quality: {name}, {res['pool_runs']} runs (one process each), "
        f"{res['trials']} trials",
        "",
        f"Each trial draws {res['history'] + 1} distinct runs from the pool: "
        f"{res['history']} baseline runs (oldest first) and 1 current run. "
        "**Slowdowns are simulated** by multiplying the current run's samples by 1.05 / 1.10. "
        "Fixed 5 % and Mann-Whitney use only the newest baseline run; `K=k` rows use the newest "
        "k runs of the same draw. Cells: rate [95 % Wilson CI over the resampled comparisons].",
        "",
        "| rule | "
        + " | ".join(f"{lab} (goal {op} {g:.0%})" for lab, op, g in FIGURES.values())
        + " |",
        "|---|" + "---|" * len(FIGURES),
    ]
    for rname, figs in res["figures"].items():
        lines.append(f"| {rname} | " + " | ".join(cell(figs[k]) for k in FIGURES) + " |")
    g = res["suite_full_gate"]
    lines += [
        "",
        f"Whole-suite A/A through `judge()` (default rule, K={res['history']}, the record's "
        f"gated metrics {', '.join(GateSettings().gate)}, whatever --metric is): {cell(g)}.",
        "",
        "Pool uncertainty (jackknife over the pool's runs, standard error in percentage points; "
        "the Wilson CIs above ignore it; 0 events give ±0.00, which proves nothing; n/a: every "
        "trial uses every run, measure more runs than --history + 1):",
        "",
        "| rule | " + " | ".join(lab for lab, _, _ in FIGURES.values()) + " |",
        "|---|" + "---|" * len(FIGURES),
    ]
    for rname, figs in res["figures"].items():
        lines.append(f"| {rname} | " + " | ".join(_se(figs[k]["pool_se"]) for k in FIGURES) + " |")
    lines += ["", "Current runs behind the A/A reds (trials with any red, by pool run):", ""]
    for rname, who in res["aa_culprits"].items():
        items = list(who.items())
        text = ", ".join(f"{k} ({v} trial{'s' if v != 1 else ''})" for k, v in items[:5])
        if len(items) > 5:
            rest = sum(v for _, v in items[5:])
            text += f", {len(items) - 5} more runs ({rest} trials)"
        text = text or "none"
        lines.append(f"- {rname}: {text}")
    lines += [
        "",
        f"Pool ({res['pool_runs']} runs; CV = sd / mean; range = (max - min) / median of the "
        f"run medians); default rule K={res['history']} per workload:",
        "",
        f"| workload | rounds | median {name} | within-run CV (median) | between-run CV | range "
        "| A/A false alarms | +5% caught | +10% caught |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, f in res["workloads"].items():
        pw = res["per_workload_default"][key]
        med = f["median"] * 1000 if unit == "s" else f["median"]
        med_text = f"{med:.2f} ms" if unit == "s" else f"{med:.4g} {unit}"
        lines.append(
            f"| {f['label']} | {f['rounds']} | {med_text} | {_pct(f['within_run_cv_median'], 2)} "
            f"| {_pct(f['between_run_cv'], 2)} | {_pct(f['range'], 2)} | {_pct(pw['aa'], 2)} "
            f"| {_pct(pw['s5'], 1)} | {_pct(pw['s10'], 1)} |"
        )
    wl = list(res["workloads"].values())
    lines += [
        "",
        f"Across workloads: within-run CV median "
        f"{_pct(statistics.median(x['within_run_cv_median'] or 0 for x in wl), 2)}, "
        f"between-run CV median {_pct(statistics.median(x['between_run_cv'] for x in wl), 2)}, "
        f"widest range {_pct(max(x['range'] for x in wl), 2)}.",
        "",
        f"Runs measured with: `python -m pytest {shlex.join(res['pytest_args'])}` "
        "(+ a temporary --llmperf-report and an empty --llmperf-baselines).",
        "",
        f"Command: `{command}` (analysis {res['seconds']} s)",
    ]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def render_processes(proc: dict[str, Any], res: dict[str, Any]) -> str:
    """The multi-process table: K stored runs x N current processes, with wall times."""
    wall = proc["wall"]
    m, level = proc["comparisons"], proc["process_alpha"]
    lines = [
        f"## Gate quality with N processes: {res['metric']}, {res['pool_runs']} runs"
        + (
            f" (runs {', '.join(map(str, res['dropped_runs']))} left out)"
            if res.get("dropped_runs")
            else ""
        )
        + f", {res['trials']} trials per row",
        "",
        "Each trial draws K + N distinct runs: K stored runs (as `llmperf baselines record` "
        "stores them) and N current processes. N = 1: today's one-process rule "
        "(`compare_metric`, allowance max(tolerance, 2 x between-run CV)), alone and with the "
        "plugin's confirmation (`gate.decide`). N >= 2: the multi-process rule (`compare_metric` "
        "on the N process medians: one-sided Welch t on their logs against the K run medians, "
        f"p < {level:.2g} = min(alpha 0.01, family alpha 0.05 / {m} gated comparisons), and the "
        "median of process medians worse than the stored center by more than the tolerance). "
        f"m = {m} (--comparisons): the gated comparisons of one process of the suite "
        "(e2e_latency_s and peak_memory_bytes per workload); only "
        f"{res['metric']} is resampled here, so the suite A/A column counts half of the "
        "suite's gated comparisons. **Slowdowns are simulated** (each process's samples x "
        "1.05 / 1.10). Every workload of a trial uses the same runs; every row of one K, N the "
        "same draws. Cells: rate [95 % Wilson CI].",
        "",
        "| K | N | rule | tolerance | "
        + " | ".join(f"{lab} (goal {op} {g:.0%})" for lab, op, g in FIGURES.values())
        + " | suite wall time |",
        "|---|---|---|---|" + "---|" * len(FIGURES) + "---|",
    ]
    for row in proc["rows"]:
        lines.append(
            f"| {row['k']} | {row['n']} | {row['rule']} | {row['tolerance']:.0%} | "
            + " | ".join(cell(row["figures"][key]) for key in FIGURES)
            + f" | {_minutes(row['wall_s'])} |"
        )
    for text in proc["skipped"]:
        lines.append(f"\nskipped: {text}")
    lines += [
        "",
        f"Suite wall time: N x {wall['per_process_s']:.1f} s per process at {ROUNDS} rounds per "
        f"workload, estimated as the {wall['how']} (the pool's runs took "
        f"{wall['measured_median_s']:.1f} s at {wall['rounds_measured']} rounds; the rounds "
        f"beyond {ROUNDS} took {wall['rounds_removed_median_s']:.1f} s of that).",
        "",
        "Pool uncertainty (jackknife SE over the pool's runs, percentage points):",
        "",
        "| K | N | rule | tolerance | " + " | ".join(lab for lab, _, _ in FIGURES.values()) + " |",
        "|---|---|---|---|" + "---|" * len(FIGURES),
    ]
    for row in proc["rows"]:
        lines.append(
            f"| {row['k']} | {row['n']} | {row['rule']} | {row['tolerance']:.0%} | "
            + " | ".join(_se(row["figures"][key]["pool_se"]) for key in FIGURES)
            + " |"
        )
    if proc["mde_check"]:
        c0 = proc["mde_check"][0]
        lines += [
            "",
            f"`verdict.minimum_detectable` (the MDE of `llmperf baselines show`) against the "
            f"resampling, K={c0['k']}, N={c0['n']}, tolerance {c0['tolerance']:.0%}: the "
            "slowdown it predicts from the spread of all the pool's run medians (robust CV, or "
            "sd of their logs as `show` uses for N >= 2) and the share of "
            f"{c0['trials']} trials that caught exactly that slowdown (predicted: 90 %):",
            "",
            "| workload | spread from | spread | predicted MDE | caught at the MDE |",
            "|---|---|---|---|---|",
        ]
        for c in proc["mde_check"]:
            low, high = c["ci95"]
            lines.append(
                f"| {c['workload']} | {c['spread_kind']} | {_pct(c['spread'], 2)} "
                f"| +{_pct(c['mde'])} | {_pct(c['detected'])} [{_pct(low)}, {_pct(high)}] |"
            )
    drift = proc.get("day_drift") or []
    unit = METRICS[res["metric"]].unit
    if drift:
        lines += [
            "",
            "Day drift: the pool's median against the repository's stored baselines of the same "
            "entries (recorded at other times, on the dates shown); the multi-process rule "
            "compares with stored runs, so its tolerance must absorb this:",
            "",
            "| workload | device | stored runs (dates) | stored median | stored spread "
            "| pool median | pool spread | pool / stored |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in drift:
            dates = " .. ".join(x[:16] for x in d["stored_dates"])
            ratio = "n/a" if d["ratio"] is None else f"{d['ratio']:.3f}"
            lines.append(
                f"| {d['workload']} | {d['device']} | {d['stored_runs']} ({dates}) "
                f"| {format_value(d['stored_median'], unit)} | {_pct(d['stored_spread'], 2)} "
                f"| {format_value(d['pool_median'], unit)} | {_pct(d['pool_spread'], 2)} "
                f"| {ratio} |"
            )
        ratios = [d["ratio"] for d in drift if d["ratio"] is not None]
        if ratios:
            worst = max(ratios, key=lambda r: abs(math.log(r)))
            lines.append(
                f"\nLargest day-to-day move: ×{worst:.3f}; median |move| "
                f"{_pct(statistics.median(abs(r - 1) for r in ratios))}."
            )
    lines += ["", f"(multi-process analysis {proc['seconds']} s)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return out


def _fractions(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fractions") from None
    if not out or any(not 0 <= x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected fractions in [0, 1), e.g. 0.03")
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="False-alarm and detection rates of the llmperf regression gate, "
        "measured on a pool of separate CPU runs of the shipped suite.",
    )
    p.add_argument(
        "--runs",
        type=_positive,
        default=None,
        help="runs (fresh pytest processes) in the pool (default 20); with --reuse: measure "
        "until the pool holds this many (default: add none; a pool is never cut)",
    )
    p.add_argument("--trials", type=_positive, default=5000, help="resampled trials (5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (0)")
    p.add_argument(
        "--pool",
        default="gate_quality_pool.json",
        help="JSON file the measured runs are cached in (gate_quality_pool.json)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="start from the runs already in --pool instead of measuring afresh",
    )
    p.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    p.add_argument(
        "--history", type=_positive, default=5, help="baseline runs per entry, K (default 5)"
    )
    p.add_argument(
        "--short-history",
        type=_ints,
        default=[1, 2, 3],
        metavar="K,K",
        help="extra rows: the default rule with only the newest k runs (default 1,2,3)",
    )
    p.add_argument(
        "--metric",
        default="e2e_latency_s",
        choices=SAMPLED,
        help="metric to judge, one with per-round samples (e2e_latency_s)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=GateSettings().tolerance,
        help="tolerance of the default rule (--llmperf-tolerance; default 0.03)",
    )
    p.add_argument(
        "--spread-multiple",
        type=float,
        default=GateSettings().spread_multiple,
        help="k in max(tolerance, k x between-run CV) of the default rule (default 2)",
    )
    p.add_argument(
        "--attempts",
        type=_positive,
        default=3,
        help="measurements of each workload per process (default 3): the first is the run, "
        "the others are the re-measurements --llmperf-confirm=2 makes on a red; new pool runs "
        "use --llmperf-rounds=10xN and are split into N consecutive measurements",
    )
    p.add_argument(
        "--histories",
        type=_ints,
        default=[5, 8],
        metavar="K,K",
        help="multi-process table: stored runs per trial (default 5,8)",
    )
    p.add_argument(
        "--processes",
        type=_ints,
        default=[1, 4, 8, 16],
        metavar="N,N",
        help="multi-process table: current processes per trial (default 1,4,8,16; a K, N "
        "that needs more runs than the pool has is skipped)",
    )
    p.add_argument(
        "--process-tolerance",
        type=_fractions,
        default=[0.03, 0.05],
        metavar="T,T",
        help="tolerances (minimum change) of the multi-process rule (default 0.03,0.05)",
    )
    p.add_argument(
        "--one-process-tolerance",
        type=_fractions,
        default=[0.08, 0.03],
        metavar="T,T",
        help="tolerances of the N = 1 rows (default 0.08,0.03: the CPU default and the "
        "generic one)",
    )
    p.add_argument(
        "--comparisons",
        type=_positive,
        default=None,
        metavar="M",
        help="gated comparisons of one process of the suite, the Bonferroni divisor "
        "(default: 2 x the pool's workloads, e2e_latency_s and peak_memory_bytes each)",
    )
    p.add_argument(
        "--mde-check",
        type=_ints,
        default=[5, 8],
        metavar="K,N",
        help="check verdict.minimum_detectable on the pool at this K, N (default 5,8)",
    )
    p.add_argument(
        "--baselines",
        default=str(REPO / "baselines"),
        metavar="DIR",
        help="stored baselines for the day-drift table (default: the repository's)",
    )
    p.add_argument(
        "--select", metavar="EXPR", help="pytest -k expression to measure a subset, e.g. fp32"
    )
    p.add_argument(
        "--also-mann-whitney",
        action="store_true",
        help="multi-process table: also the rule with Mann-Whitney on the process medians",
    )
    p.add_argument(
        "--drop-runs",
        type=_ints,
        default=[],
        metavar="I,J",
        help="leave these pool runs out of the analysis (1-based, as measured; the pool file "
        "keeps them)",
    )
    p.add_argument(
        "--pytest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra pytest argument per run, repeatable (e.g. --pytest-arg=--llmperf-rounds=20)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    if len(args.mde_check) != 2:
        raise SystemExit(f"--mde-check {args.mde_check}: expected K,N")
    pool = build_pool(args)
    if args.drop_runs:
        pool = drop_runs(pool, args.drop_runs)
    workloads = workloads_from_pool(pool, args.metric, args.attempts)
    res = analyse(pool, args, workloads)
    res["dropped_runs"] = sorted(set(args.drop_runs))
    print()
    print(render(res, command))
    proc = analyse_processes(pool, args, workloads)
    proc["day_drift"] = day_drift(workloads, args.metric, Path(args.baselines))
    res["processes"] = proc
    print()
    print(render_processes(proc, res))
    if args.json:
        res["command"] = command
        Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
