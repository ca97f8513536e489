"""``llmperf ab``: is environment B slower than environment A *on this node*, workload by workload.

Why: after an SDK upgrade the question is whether the new stack is slower than the old one here,
today. A baseline recorded weeks ago folds host drift into the answer, and on a shared host the
noise lives between processes (``processes.py``). So the two sides run as fresh pytest processes,
one at a time, alternating A B B A A B B A … (``abba_order``): a slow drift of the host adds
about as much to A as to B within each pair of adjacent processes and cancels in their ratio.
Pair i is the i-th A process with the i-th B process (adjacent in that order), and each workload
is judged on the log ratios of its paired process medians (``paired_interval``): the ratio
B/A is their geometric mean, with a t interval.

A table of m workloads makes m tests; the intervals are Bonferroni-adjusted (each at
1 - 0.05/m) so that an A/A run calls no workload different with at least 95 % probability across
the whole table. A difference must also exceed a minimum effect (``tolerance``): with enough
pairs a real but negligible 0.5 % would otherwise be called a change.

Everything but ``run_sides`` and ``check_side`` is plain data in, data out, so the tests need no
processes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import processes
from .baselines import Change, perf_versions, version_changes
from .metrics import metric
from .results import Record
from .units import format_value

#: The confidence of the whole table: an A/A run calls nothing different with this probability.
FAMILY_CONFIDENCE = 0.95
#: Default minimum effect: a ratio within 2 % of 1 is "no difference" even when significant.
DEFAULT_TOLERANCE = 0.02
#: Fewer pairs than this give no interval worth a verdict.
MIN_PAIRS = 3
#: How long checking that a side imports pytest and pytest_llmperf may take.
CHECK_TIMEOUT_S = 300.0

SLOWER = "B slower"
FASTER = "B faster"
SAME = "no difference"
INCONCLUSIVE = "inconclusive"
NOT_COMPARED = "not compared"
#: A ok, B never ok (oom, error in every process that ran it): blocks like "B slower".
FAILED = "B failed"

_CHECK_CODE = (
    "import sys, importlib.util, pytest, pytest_llmperf; "
    "print(sys.executable); print(importlib.util.find_spec('xdist') is not None)"
)


class SideError(Exception):
    """A side that cannot run: the message names the option (``--a``/``--b``) and what was
    expected. A usage error."""


@dataclass
class Side:
    """One environment: how to start its python, and what it adds to the environment."""

    name: str  # "A" or "B"
    given: str  # what the user wrote after --a / --b
    prefix: list[str]  # the command that stands for "python": [python] or [wrapper script]
    env: dict[str, str] = field(default_factory=dict)  # --a-env / --b-env pairs
    python: str = ""  # sys.executable as the side reports it
    xdist: bool = False  # pytest-xdist installed: children get -n0

    @property
    def option(self) -> str:
        return f"--{self.name.lower()}"

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**base, **self.env}

    def command(self, pytest_args: Sequence[str]) -> list[str]:
        """The side's pytest command for one process: what must happen once taken out."""
        args = processes.child_args(pytest_args, xdist=self.xdist)
        if "no:cacheprovider" not in args:
            args += ["-p", "no:cacheprovider"]  # a measuring run must not touch .pytest_cache
        return [*self.prefix, "-m", "pytest", *args]


def parse_env_pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--a-env``/``--b-env``; ValueError with what was expected."""
    key, eq, value = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(f"{text!r}: expected KEY=VALUE (KEY a variable name)")
    return key, value


def resolve_side(name: str, given: str, env: Optional[Mapping[str, str]] = None) -> Side:
    """A side from what the user gave: a python executable, a venv directory (its bin/python),
    or an executable wrapper script (run as ``SCRIPT -m pytest ...``); a bare name is looked up
    on PATH. Bad input is a :class:`SideError` naming the option."""
    option = f"--{name.lower()}"
    expected = "expected a python executable, a venv directory or an executable wrapper script"
    # absolute(), never resolve(): a venv's bin/python is a symlink whose target is not the venv.
    path = Path(given).expanduser().absolute()
    if path.is_dir():
        python = path / "bin" / "python"
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise SideError(f"{option} {given}: no python in {path / 'bin'} ({expected})")
        prefix = str(python)
    elif path.is_file():
        if not os.access(path, os.X_OK):
            raise SideError(f"{option} {given}: not executable ({expected})")
        prefix = str(path)
    elif os.sep not in given and shutil.which(given):
        prefix = str(shutil.which(given))
    else:
        raise SideError(f"{option} {given}: no such file or directory ({expected})")
    return Side(name=name, given=given, prefix=[prefix], env=dict(env or {}))


def check_side(side: Side, base_env: Mapping[str, str], cwd: Path) -> Side:
    """Ask the side, once and before anything is measured, whether it can import pytest and
    pytest_llmperf (with its own environment); fill in its python and whether it has xdist."""
    command = [*side.prefix, "-c", _CHECK_CODE]
    try:
        done = subprocess.run(
            command,
            cwd=str(cwd),
            env=side.environment(base_env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
        )
    except OSError as exc:
        raise SideError(
            f"{side.option} {side.given}: cannot run it ({exc.strerror or exc})"
        ) from None
    except subprocess.TimeoutExpired:
        raise SideError(
            f"{side.option} {side.given}: importing pytest_llmperf took over {CHECK_TIMEOUT_S:g} s"
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or len(lines) < 2:
        why = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise SideError(
            f"{side.option} {side.given}: cannot import pytest_llmperf and pytest with it"
            + (f" ({why[-1]})" if why else f" (exit code {done.returncode})")
        )
    side.python = lines[-2].strip()
    side.xdist = lines[-1].strip() == "True"
    return side


# -- running the processes -----------------------------------------------------------------------


def abba_order(pairs: int) -> list[str]:
    """The sides of 2·pairs processes: A B B A A B B A …; pair i is the i-th A and i-th B."""
    return [s for i in range(pairs) for s in (("A", "B") if i % 2 == 0 else ("B", "A"))]


class ProcessFailed(Exception):
    """A side's process that crashed, hung or wrote no results: the command stops."""

    def __init__(self, side: Side, run: processes.ChildRun, position: int, total: int) -> None:
        self.side = side
        self.run = run
        super().__init__(
            f"side {side.name} ({side.option} {side.given}): process {position}/{total} "
            f"{run.problem}"
        )


RunChild = Callable[..., processes.ChildRun]


def run_sides(
    sides: Mapping[str, Side],
    pytest_args: Sequence[str],
    *,
    pairs: int,
    cwd: Path,
    base_env: Mapping[str, str],
    timeout: Optional[float] = None,
    say: Callable[[str], None] = print,
    run_child: RunChild = processes.run_child,
) -> dict[str, list[list[Record]]]:
    """Run the 2·pairs processes one at a time in ABBA order; each side's records per process,
    in that side's order. The first process that fails raises :class:`ProcessFailed`."""
    order = abba_order(pairs)
    out: dict[str, list[list[Record]]] = {"A": [], "B": []}
    for position, name in enumerate(order, start=1):
        side = sides[name]
        run = run_child(
            side.command(pytest_args),
            index=position,
            total=len(order),
            cwd=cwd,
            env=side.environment(base_env),
            timeout=timeout,
        )
        if run.problem is not None:
            raise ProcessFailed(side, run, position, len(order))
        out[name].append(run.records)
        say(
            f"llmperf ab: process {position}/{len(order)} ({name}): "
            f"{len(run.records)} workloads, {run.wall_s:.0f} s"
        )
    return out


# -- the statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """The ratio B/A (geometric mean of the paired ratios) and its two-sided interval."""

    ratio: float
    low: float
    high: float
    pairs: int
    confidence: float


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float) -> Interval:
    """Paired t interval on d_i = log(b_i / a_i), back-transformed: ratio = exp(mean d)."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need at least 2 pairs of equal length, got {len(a)} and {len(b)}")
    d = [math.log(y / x) for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.fmean(d)
    half = float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * statistics.stdev(d) / n**0.5
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n, confidence)


def decide(interval: Interval, *, lower_is_better: bool, tolerance: float) -> str:
    """The verdict for B: a change only when the interval excludes 1 *and* the ratio is beyond
    the tolerance (|log ratio| > log(1 + tolerance), symmetric for faster and slower)."""
    if interval.pairs < MIN_PAIRS:
        return INCONCLUSIVE
    beyond = abs(math.log(interval.ratio)) > math.log1p(tolerance)
    if not beyond or interval.low <= 1 <= interval.high:
        return SAME
    b_larger = interval.low > 1
    return SLOWER if b_larger == lower_is_better else FASTER


#: (backend, suite, key). Not the device key: both sides run on this node, and a side that
#: differs in settings may have another one (OMP_NUM_THREADS is part of a CPU's key), which
#: must not keep its workloads from being paired.
WorkloadId = tuple[str, str, str]


def workload_id(record: Record) -> WorkloadId:
    return (record.backend, record.suite, record.key)


@dataclass
class Row:
    """One workload of the table."""

    workload: WorkloadId
    label: str
    metric: Optional[str]
    #: Each process's median of the metric, in the side's process order; None where that
    #: process did not run the workload or its outcome was not ok.
    a: list[Optional[float]]
    b: list[Optional[float]]
    verdict: str
    interval: Optional[Interval] = None
    note: str = ""

    @property
    def unit(self) -> str:
        return metric(self.metric).unit if self.metric else ""

    def median(self, side: str) -> Optional[float]:
        values = [v for v in (self.a if side == "A" else self.b) if v is not None]
        return statistics.median(values) if values else None


@dataclass
class Comparison:
    rows: list[Row]
    pairs: int
    tolerance: float
    family_confidence: float
    #: The workloads with an interval: what the Bonferroni correction divides by.
    compared: int
    a_versions: dict[str, str]
    b_versions: dict[str, str]
    common: list[str] = field(default_factory=list)  # key parameters every workload shares
    a_devices: list[str] = field(default_factory=list)  # device keys, sorted
    b_devices: list[str] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """Each interval's confidence (Bonferroni)."""
        return 1 - (1 - self.family_confidence) / max(self.compared, 1)

    @property
    def version_changes(self) -> list[str]:
        return version_changes(self.a_versions, self.b_versions)

    @property
    def slower(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == SLOWER or r.verdict.startswith(FAILED)]


def _value(record: Optional[Record], name: Optional[str]) -> Optional[float]:
    if record is None or not record.ok or name is None:
        return None
    value = record.value(name)
    return float(value) if value is not None and value > 0 else None


def _outcomes(records: Sequence[Optional[Record]]) -> str:
    """What a side's processes did with a workload when some did not measure it: 'oom in 3,
    not run in 1 of 8 processes'."""
    counts: dict[str, int] = {}
    for r in records:
        word = "not run" if r is None else r.outcome
        if word != "ok":
            counts[word] = counts.get(word, 0) + 1
    parts = [f"{word} in {n}" for word, n in sorted(counts.items())]
    return f"{', '.join(parts)} of {len(records)} processes" if parts else ""


def compare(
    a_runs: Sequence[Sequence[Record]],
    b_runs: Sequence[Sequence[Record]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    family_confidence: float = FAMILY_CONFIDENCE,
) -> Comparison:
    """Judge every workload either side measured on its paired process medians of the headline
    metric. ``a_runs[i]`` is the records of A's i-th process. A workload that one side did not
    measure in some process (missing, ``oom``, ``error``) is compared on the pairs that remain
    and says so; one that a side never measured is reported, not compared — except that A ok
    and B never ok is "B failed (...)": an upgrade that makes a workload fail is worse than
    a slower one."""
    pairs = min(len(a_runs), len(b_runs))
    ids: list[WorkloadId] = []
    by_side: dict[str, list[dict[WorkloadId, Record]]] = {}
    for side, runs in (("A", a_runs), ("B", b_runs)):
        by_side[side] = []
        for records in runs[:pairs]:
            found = {workload_id(r): r for r in records}
            by_side[side].append(found)
            ids += [i for i in found if i not in ids]
    labels, common = short_labels(ids)
    rows: list[Row] = []
    judged: list[tuple[Row, list[tuple[float, float]]]] = []
    for wid in ids:
        a_recs = [found.get(wid) for found in by_side["A"]]
        b_recs = [found.get(wid) for found in by_side["B"]]
        ok = [r for r in a_recs + b_recs if r is not None and r.ok]
        name = ok[0].main_metric if ok else None
        a = [_value(r, name) for r in a_recs]
        b = [_value(r, name) for r in b_recs]
        said = [
            f"{side}: {text}"
            for side, recs in (("A", a_recs), ("B", b_recs))
            if (text := _outcomes(recs))
        ]
        row = Row(wid, labels[wid], name, a, b, NOT_COMPARED, note="; ".join(said))
        rows.append(row)
        kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        a_ok, b_ok = any(v is not None for v in a), any(v is not None for v in b)
        if a_ok and not b_ok and any(r is not None for r in b_recs):
            failed = sorted({r.outcome for r in b_recs if r is not None})
            row.verdict = f"{FAILED} ({', '.join(failed)})"
        elif len(kept) >= MIN_PAIRS:
            judged.append((row, kept))
        elif a_ok and b_ok:
            row.verdict = INCONCLUSIVE
            row.note = "; ".join(
                x for x in (f"{len(kept)} pair(s), {MIN_PAIRS} needed", row.note) if x
            )
    result = Comparison(
        rows=rows,
        pairs=pairs,
        tolerance=tolerance,
        family_confidence=family_confidence,
        compared=len(judged),
        a_versions=_first_versions(a_runs),
        b_versions=_first_versions(b_runs),
        common=common,
        a_devices=sorted({r.device_key for records in a_runs for r in records}),
        b_devices=sorted({r.device_key for records in b_runs for r in records}),
    )
    for row, kept in judged:
        row.interval = paired_interval(
            [x for x, _ in kept], [y for _, y in kept], result.confidence
        )
        row.verdict = decide(
            row.interval,
            lower_is_better=metric(str(row.metric)).lower_is_better,
            tolerance=tolerance,
        )
    return result


def _first_versions(runs: Sequence[Sequence[Record]]) -> dict[str, str]:
    for records in runs:
        for record in records:
            if record.provenance:
                return perf_versions(record.provenance)
    return {}


def change_lines(changes: Sequence[Change]) -> list[str]:
    """One line per entry for N runs stored at once: what the first run did to the history
    (added, restarted because versions differ) and what the rest did."""
    by_key: dict[str, list[Change]] = {}
    for change in changes:
        by_key.setdefault(change.key, []).append(change)
    lines = []
    for group in by_key.values():
        first, rest = group[0], group[1:]
        lines.append(
            str(first)
            + (
                f"; then {len(rest)} more run(s) {rest[-1].action} ({rest[-1].detail})"
                if rest
                else ""
            )
        )
    return lines


# -- labels ---------------------------------------------------------------------------------------

_KEY = re.compile(r"^(?P<func>[^\[\]]*)\[(?P<params>.*)\](?P<name>:.*)?$")


def _split_params(text: str) -> list[str]:
    """``a=1,b={x:1,y:2}`` → ``['a=1', 'b={x:1,y:2}']``: commas inside brackets stay."""
    parts: list[str] = []
    depth = start = 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def short_labels(ids: Sequence[WorkloadId]) -> tuple[dict[WorkloadId, str], list[str]]:
    """A label per workload without the key parameters every workload shares (those are
    returned apart, said once above the table); the suite and device are named only when the
    table holds more than one."""
    parsed: dict[WorkloadId, Optional[tuple[str, list[str], str]]] = {}
    for wid in ids:
        m = _KEY.match(wid[2])
        parsed[wid] = (
            (m["func"], _split_params(m["params"]), m["name"] or "") if m is not None else None
        )
    param_sets = [set(p[1]) for p in parsed.values() if p is not None]
    common = set.intersection(*param_sets) if len(ids) > 1 and param_sets else set()
    if any(p is None for p in parsed.values()):
        common = set()
    suites = len({wid[1] for wid in ids}) > 1
    backends = len({wid[0] for wid in ids}) > 1
    labels = {}
    for wid, p in parsed.items():
        if p is None:
            text = wid[2]
        else:
            func, params, name = p
            rest = [x for x in params if x not in common]
            text = func + (f"[{','.join(rest)}]" if rest else "") + name
        if suites:
            text = f"{wid[1]}::{text}"
        if backends:
            text += f" on {wid[0]}"
        labels[wid] = text
    order = [x for p in parsed.values() if p is not None for x in p[1]]
    return labels, sorted(common, key=order.index)


# -- rendering ------------------------------------------------------------------------------------

HEADER = ["workload", "metric", "A median", "B median", "B/A (interval)", "pairs", "verdict"]


def _ratio(row: Row) -> str:
    i = row.interval
    if i is None:
        return "-"
    return f"{i.ratio:.3f} ({i.low:.3f}–{i.high:.3f})"


def table_rows(comparison: Comparison) -> list[list[str]]:
    out = []
    for row in comparison.rows:
        pairs = sum(1 for x, y in zip(row.a, row.b) if x is not None and y is not None)
        out.append(
            [
                row.label,
                row.metric or "-",
                format_value(row.median("A"), row.unit) if row.metric else "-",
                format_value(row.median("B"), row.unit) if row.metric else "-",
                _ratio(row),
                str(pairs),
                row.verdict,
            ]
        )
    return out


def _side_line(side: Side) -> str:
    env = " ".join(f"{k}={v}" for k, v in side.env.items())
    python = side.python or side.prefix[0]
    via = "" if side.prefix[0] == python else f" via {side.prefix[0]}"
    return f"{side.name} ({side.option} {side.given}): {python}{via}" + (
        f", env {env}" if env else ""
    )


def header_lines(comparison: Comparison, sides: Mapping[str, Side]) -> list[str]:
    changes = comparison.version_changes
    lines = [_side_line(sides["A"]), _side_line(sides["B"])]
    if changes:
        lines.append("versions that differ (A → B): " + "; ".join(changes))
    else:
        lines.append(
            f"versions that differ: none ({len(comparison.a_versions)} packages and "
            "settings the same)"
        )
    lines.append(
        f"{comparison.pairs} process pairs in ABBA order; B/A = geometric mean of the paired "
        f"process-median ratios; {comparison.family_confidence:.0%} simultaneous intervals "
        f"(Bonferroni over {comparison.compared} workloads: each at "
        f"{comparison.confidence:.2%}); a change must exceed {comparison.tolerance:.1%} "
        "(--tolerance)"
    )
    if comparison.a_devices != comparison.b_devices:
        lines.append(
            f"device keys differ (A → B): {', '.join(comparison.a_devices) or '(none)'} → "
            f"{', '.join(comparison.b_devices) or '(none)'}: workloads are paired by backend, "
            "test and parameters"
        )
    if comparison.common:
        lines.append("every workload: " + ", ".join(comparison.common))
    return lines


def notes(comparison: Comparison) -> list[str]:
    return [f"{row.label}: {row.note}" for row in comparison.rows if row.note]


def summary_line(comparison: Comparison) -> str:
    counts: dict[str, int] = {}
    for row in comparison.rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    parts = [f"{n} {verdict}" for verdict, n in counts.items()]
    return f"{len(comparison.rows)} workloads: " + ", ".join(parts)


def render_text(comparison: Comparison, sides: Mapping[str, Side]) -> str:
    rows = [HEADER, *table_rows(comparison)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = header_lines(comparison, sides) + [""]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    extra = notes(comparison)
    if extra:
        lines += ["", *extra]
    lines += ["", summary_line(comparison)]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(comparison: Comparison, sides: Mapping[str, Side]) -> str:
    lines = ["## llmperf ab: B against A on this node", ""]
    lines += [f"- {_md(line)}" for line in header_lines(comparison, sides)]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(comparison):
        cells = [f"`{_md(row[0])}`", *(_md(c) for c in row[1:])]
        if row[-1] == SLOWER or row[-1].startswith(FAILED):
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    extra = notes(comparison)
    if extra:
        lines += [""] + [f"- {_md(n)}" for n in extra]
    lines += ["", summary_line(comparison)]
    return "\n".join(lines) + "\n"
