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

Run it on a quiet machine: every other process on it is part of what gets measured. It always
exits 0 once it has figures (a measurement, not a test); a figure that misses its goal is
marked GOAL MISSED.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from pytest_llmperf.baselines import record_to_run
from pytest_llmperf.gate import GatePolicy, decide
from pytest_llmperf.metrics import METRICS
from pytest_llmperf.metrics import metric as metric_info
from pytest_llmperf.noise import scatter
from pytest_llmperf.report import load_results
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.verdict import GateSettings, Verdict, compare_metric, judge

REPO = Path(__file__).resolve().parent.parent
POOL_SCHEMA = "llmperf-gate-quality-pool/1"
DEFAULT_RUNS = 20
#: Rounds of one measurement (the plugin's default --llmperf-rounds).
ROUNDS = 10
# Metrics with per-round samples (Mann-Whitney needs them); the others are single readings.
SAMPLED = ("e2e_latency_s", "ms_per_token", "tokens_per_s", "tpot_s", "ttft_s")
SCENARIOS = (("aa", 1.0), ("s5", 1.05), ("s10", 1.10))
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


def _short(workload: dict[str, Any]) -> str:
    return "/".join(str(workload.get(k)) for k in ("model", "dtype") if k in workload)


def _median_ms(record: dict[str, Any], name: str) -> str:
    m = record.get("metrics", {}).get(name) or {}
    return "-" if m.get("median") is None else f"{m['median'] * 1000:.1f} ms"


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Workload:
    """One workload's runs in the pool: stored runs (as baselines) and current values."""

    key: str
    label: str
    records: list[Record]
    stored: list[dict[str, Any]] = field(default_factory=list)
    current: dict[str, list[MetricValue]] = field(default_factory=dict)
    gated: list[Record] = field(default_factory=list)  # records with only the gated metrics
    # scenario -> per run: the run's consecutive measurements (first = ``current``)
    attempts: dict[str, list[list[MetricValue]]] = field(default_factory=dict)


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
        wl = Workload(key=key, label=_short(records[0].workload) or key, records=records)
        wl.stored = [record_to_run(r) for r in records]
        wl.gated = [
            dataclasses.replace(r, metrics={m: v for m, v in r.metrics.items() if m in gate})
            for r in records
        ]
        for scen, factor in SCENARIOS:
            wl.current[scen] = [slowed(r.metrics[name], factor) for r in records]
            wl.attempts[scen] = [[slowed(m, factor) for m in parts] for parts in split]
        out.append(wl)
    return out


@dataclass(frozen=True)
class Rule:
    """A regression rule: ``red(metric, current, runs)`` sees only the newest ``depth`` baseline
    runs (None: all K). A rule that sees few runs is judged once per distinct draw (cached)."""

    red: Callable[[str, MetricValue, list[dict[str, Any]]], bool]
    depth: int | None = None


def rule_default(settings: GateSettings, depth: int | None = None) -> Rule:
    def red(name: str, cur: MetricValue, runs: list[dict[str, Any]]) -> bool:
        return compare_metric(name, cur, runs, settings).verdict is Verdict.REGRESSED

    return Rule(red, depth)


def rule_fixed(factor: float) -> Rule:
    def red(name: str, cur: MetricValue, runs: list[dict[str, Any]]) -> bool:
        base = runs[-1]["metrics"][name]["median"]
        if metric_info(name).lower_is_better:
            return cur.value > factor * base
        return cur.value * factor < base

    return Rule(red, 1)


def rule_mwu(alpha: float) -> Rule:
    def red(name: str, cur: MetricValue, runs: list[dict[str, Any]]) -> bool:
        base = runs[-1]["metrics"][name]["samples"]
        alt = "greater" if metric_info(name).lower_is_better else "less"
        return bool(stats.mannwhitneyu(cur.samples, base, alternative=alt).pvalue < alpha)

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
        meds = [r.value(name) for r in wl.records]
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


def analyse(pool: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    name, k_hist = args.metric, args.history
    workloads = workloads_from_pool(pool, name, args.attempts)
    n_attempts = min(len(a) for wl in workloads for a in wl.attempts["aa"]) if workloads else 1
    n_runs = len(pool["runs"])
    if not workloads:
        raise SystemExit("no workload was measured ok with that metric in every run")
    if n_runs < k_hist + 1:
        raise SystemExit(
            f"the pool has {n_runs} runs; a trial needs {k_hist + 1} distinct ones "
            f"(--history {k_hist} baseline runs + 1 current): measure more (--runs)"
        )
    settings = GateSettings(tolerance=args.tolerance, spread_multiple=args.spread_multiple)
    rules: dict[str, Rule] = {f"default rule, K={k_hist}": rule_default(settings)}
    for k in args.short_history:
        if k < k_hist:
            rules[f"default rule, K={k}"] = rule_default(settings, k)
    confirm_name = f"gate policy, K={k_hist}, + confirm ({n_attempts - 1} re-measurements)"
    if n_attempts > 1:
        # Placeholder: judged below from the run's later measurements, like the plugin does.
        rules[confirm_name] = rule_default(settings)
    rules["fixed 5% factor, 1 run"] = rule_fixed(1.05)
    rules[f"Mann-Whitney p<{settings.alpha:g}, 1 run"] = rule_mwu(settings.alpha)

    rng = np.random.default_rng(args.seed)
    trials, n_wl = args.trials, len(workloads)
    draws = np.array([rng.choice(n_runs, k_hist + 1, replace=False) for _ in range(trials)])
    members = np.zeros((trials, n_runs), dtype=bool)
    members[np.arange(trials)[:, None], draws] = True
    red = {r: {s: np.zeros((trials, n_wl), dtype=bool) for s, _ in SCENARIOS} for r in rules}
    # judge() on the current record's gated metrics (the others are compared but never fail).
    gate_red = np.zeros(trials, dtype=bool)

    print(
        f"resampling {trials} trials x {n_wl} workloads x {len(SCENARIOS)} scenarios "
        f"x {len(rules)} rules (seed {args.seed}) ...",
        flush=True,
    )
    start, step = time.perf_counter(), max(1, trials // 10)
    cache: dict[tuple[Any, ...], bool] = {}
    for t in range(trials):
        base_idx, cur_idx = [int(i) for i in draws[t, :k_hist]], int(draws[t, k_hist])
        for w, wl in enumerate(workloads):
            runs = [wl.stored[i] for i in base_idx]
            for scen, _ in SCENARIOS:
                cur = wl.current[scen][cur_idx]
                for rname, rule in rules.items():
                    if rname == confirm_name:
                        red[rname][scen][t, w] = policy_red(
                            name, wl.attempts[scen][cur_idx], runs, settings
                        )
                        continue
                    depth = k_hist if rule.depth is None else rule.depth
                    ckey = (rname, w, scen, cur_idx, *base_idx[-depth:])
                    hit = cache.get(ckey)
                    if hit is None:
                        hit = rule.red(name, cur, runs[-depth:])
                        if depth < k_hist:
                            cache[ckey] = hit
                    red[rname][scen][t, w] = hit
            if not gate_red[t]:
                gate_red[t] = judge(wl.gated[cur_idx], runs, settings).failed
        if (t + 1) % step == 0:
            el = time.perf_counter() - start
            print(f"  {t + 1}/{trials} trials, {el:.0f} s", flush=True)

    ones_w = np.full(trials, n_wl, dtype=float)
    ones = np.ones(trials, dtype=float)
    figures: dict[str, dict[str, Any]] = {}
    culprits: dict[str, dict[str, int]] = {}
    for rname in rules:
        aa = red[rname]["aa"]
        figures[rname] = {
            "aa": figure(aa.sum(axis=1).astype(float), ones_w, members, "aa"),
            "suite": figure(aa.any(axis=1).astype(float), ones, members, "suite"),
            "s5": figure(red[rname]["s5"].sum(axis=1).astype(float), ones_w, members, "s5"),
            "s10": figure(red[rname]["s10"].sum(axis=1).astype(float), ones_w, members, "s10"),
        }
        who = Counter(int(draws[t, k_hist]) + 1 for t in np.flatnonzero(aa.any(axis=1)))
        culprits[rname] = {f"run {i}": c for i, c in who.most_common()}
    gate_fig = figure(gate_red.astype(float), ones, members, "suite")
    main = f"default rule, K={k_hist}"
    per_workload = {
        wl.key: {s: float(red[main][s][:, w].mean()) for s in ("aa", "s5", "s10")}
        for w, wl in enumerate(workloads)
    }
    return {
        "metric": name,
        "history": k_hist,
        "trials": trials,
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


# ----------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
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
        "--select", metavar="EXPR", help="pytest -k expression to measure a subset, e.g. fp32"
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
    pool = build_pool(args)
    res = analyse(pool, args)
    print()
    print(render(res, command))
    if args.json:
        res["command"] = command
        Path(args.json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
