"""Reports: results JSON (flushed after every test), Markdown summary, terminal table.

Rows are plain JSON ({"nodeid", "test_outcome", "record", "verdict"}) so the same functions
serve the live run, pytest-xdist controllers and ``llmperf report`` over saved files.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import __version__, baselines, tables
from .baselines import atomic_write
from .gate import confirmation_text
from .metrics import METRICS, ROUNDS_OF, main_metric
from .results import Record
from .units import format_metric, format_value
from .verdict import EntryVerdict, MetricVerdict, Verdict

RESULTS_SCHEMA = 1


def verdict_json(entry: Optional[EntryVerdict]) -> Optional[dict[str, Any]]:
    if entry is None:
        return None
    return {
        "key": entry.key,
        "failed": entry.failed,
        "inconclusive": entry.inconclusive,
        "worst": entry.worst.value,
        "metrics": [_metric_verdict_json(m) for m in entry.metrics],
    }


def _metric_verdict_json(m: MetricVerdict) -> dict[str, Any]:
    out = {**asdict(m), "verdict": m.verdict.value, "failed": m.failed}
    if out.get("history") is None:  # kept only where the verdict moved: results.json stays small
        out.pop("history", None)
    return out


def attach_history(entry: EntryVerdict, runs: Sequence[dict[str, Any]]) -> None:
    """Give each verdict that moved the stored runs it was judged against, summarized, so a
    report drawn later (summary.md's plots, ``llmperf report --plots``) can show the history
    without the baseline files: a gated metric that regressed or improved gets one
    {"date", "median", "q1", "q3", "min", "max"} per stored ok run (quartiles of its samples),
    a new-oom outcome one {"date", "medians": {metric: median}} per stored ok run (the tables'
    "was" beside an oom cell)."""
    for m in entry.metrics:
        if m.metric == "outcome" and m.verdict is Verdict.NEW_OOM:
            m.history = [
                {
                    "date": run.get("date"),
                    "medians": {
                        name: summary["median"]
                        for name, summary in sorted((run.get("metrics") or {}).items())
                        if isinstance(summary, dict) and summary.get("median") is not None
                    },
                }
                for run in runs
                if run.get("outcome") == "ok"
            ] or None
        elif m.gated and m.verdict in (Verdict.REGRESSED, Verdict.IMPROVED):
            m.history = [_run_summary(run, m.metric) for run in runs if _has(run, m.metric)] or None


def _has(run: dict[str, Any], name: str) -> bool:
    summary = (run.get("metrics") or {}).get(name)
    return (
        run.get("outcome") == "ok"
        and isinstance(summary, dict)
        and summary.get("median") is not None
    )


def _run_summary(run: dict[str, Any], name: str) -> dict[str, Any]:
    summary = run["metrics"][name]
    median = float(summary["median"])
    samples = sorted(float(s) for s in summary.get("samples") or [])
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0] if samples else median
    low, high = (samples[0], samples[-1]) if samples else (median, median)
    return {"date": run.get("date"), "median": median, "q1": q1, "q3": q3, "min": low, "max": high}


def write_results(directory: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Rewrite results.json atomically: a run killed mid-way keeps every finished test."""
    data = {
        "schema": RESULTS_SCHEMA,
        "plugin": __version__,
        "run": info,
        "results": rows,
    }
    path = Path(directory) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


class ResultsError(ValueError):
    """A results file that cannot be read; the message names the file and the field."""


_RECORD_FIELDS = {"key": str, "suite": str, "backend": str, "device_key": str, "outcome": str}


def load_results_file(path: Path) -> dict[str, Any]:
    """Read and check a results.json written by --llmperf-report (for report and accept)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ResultsError(
            f"{path}: not UTF-8 text (byte {exc.start}); not a results.json"
        ) from None
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResultsError(f"{path}: not valid JSON ({first}); not a results.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ResultsError(f"{path}: field 'results' missing: not an llmperf results.json")
    for i, row in enumerate(data["results"]):
        where = f"{path}: results[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("record"), dict):
            raise ResultsError(f"{where}: expected an object with a 'record' object")
        record = row["record"]
        for name, kind in _RECORD_FIELDS.items():
            if not isinstance(record.get(name), kind):
                raise ResultsError(f"{where}.record.{name}: missing or not a string")
        metrics = record.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("samples", []), list) for m in metrics.values()
        ):
            raise ResultsError(f"{where}.record.metrics: expected an object of metric objects")
        if row.get("verdict") is not None and not isinstance(row["verdict"], dict):
            raise ResultsError(f"{where}.verdict: expected an object or null")
    if data.get("run") is not None and not isinstance(data["run"], dict):
        raise ResultsError(f"{path}: field 'run': expected an object")
    return data


def load_results(path: Path) -> list[dict[str, Any]]:
    return load_results_file(path)["results"]


# -- the failure message of a test ----------------------------------------------------------


def failure_text(record: Record, entry: EntryVerdict, runs: Sequence[dict[str, Any]]) -> str:
    """What a red test prints: each failed metric with its numbers, the confirmation, what
    changed since the baseline, and the command that accepts the new numbers."""
    failures = entry.failures()
    lines = [f"{record.key} on {record.device_key}:"]
    lines += [f"  {'over the limit' if m.limit else m.verdict.value}: {m.detail}" for m in failures]
    limits_only = all(m.limit for m in failures)
    if len(record.measurements) > 1:
        direction = "limit" if limits_only else "regressed"
        lines.append("  " + confirmation_text(direction, record.measurements))
    if limits_only:
        lines.append(
            "  an absolute limit of the marker llmperf(...): raise it there if the new "
            "numbers are acceptable"
        )
        return "\n".join(lines)
    if record.contended:
        lines.append(
            "  measured on a busy or shared device: accepting stores this run as one more run, "
            "not a new level; re-run on a quiet node (without -n), or start the entry afresh "
            "with --llmperf-reset-baselines"
        )
        return "\n".join(lines)
    if runs:
        changed = baselines.version_changes(
            baselines.perf_versions(runs[-1].get("provenance", {})),
            baselines.perf_versions(record.provenance),
        )
        lines.append(
            "  changed since the baseline: " + (", ".join(changed) if changed else "nothing")
        )
    lines.append(
        "  if the new numbers are right: pytest ... --llmperf-update-baselines (this entry then "
        "starts a new history), or llmperf baselines accept <this run's results.json>"
    )
    return "\n".join(lines)


# -- what a run checked ----------------------------------------------------------------------


@dataclass
class Coverage:
    """How many workloads a run judged against a baseline, and why the others were not.

    A green run that compared nothing (no baselines for this device key, every backend
    unavailable, baselines looked up in the wrong directory) must not look like a pass.
    """

    gating: bool
    updating: bool
    total: int = 0
    judged: int = 0
    #: Workloads measured without a baseline entry to compare with.
    missing: int = 0
    unavailable: int = 0
    #: Tests this node cannot run (too few devices, a model that cannot load here).
    skipped: int = 0
    all_unavailable: bool = False
    #: Why workloads that were asked for were not judged (makes the count short).
    reasons: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    #: What else the reader should know (skips by design of this node).
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.judged == self.total > 0

    @property
    def shown(self) -> bool:
        """Whether the run has anything of llmperf's to account for."""
        return bool(self.total or self.skipped)

    def headline(self) -> str:
        if self.all_unavailable:
            return "llmperf: nothing measured: every selected backend was unavailable"
        if not self.total:
            return f"llmperf: nothing measured: {self.skipped} tests skipped on this node"
        if self.updating:
            measured = self.total - self.unavailable
            return f"llmperf: {measured} workloads measured for the baselines"
        judged = f"{self.judged} of {self.total} workloads judged against a baseline"
        if not self.gating:
            return f"llmperf: not gated (--llmperf-no-gate); {judged}"
        return f"llmperf: {judged}"

    def lines(self) -> list[str]:
        return [f"  {x}" for x in (*self.reasons, *self.notes, *self.hints)]


# -- formatting ------------------------------------------------------------------------------


def _metric(record: dict[str, Any], name: str) -> Optional[float]:
    return (record.get("metrics", {}).get(name) or {}).get("median")


def _fmt(record: dict[str, Any], name: str) -> str:
    return format_metric(_metric(record, name), name)


def verdict_word(row: dict[str, Any]) -> str:
    v = row.get("verdict")
    record = row["record"]
    if record["outcome"] == "error":
        return "error"
    if v is None:
        return "not judged"
    if record.get("inconclusive"):
        return "inconclusive"
    # Under --llmperf-no-gate (or while updating) a regression is reported, not a failure.
    return ("FAIL " if v["failed"] and row.get("gate", True) else "") + v["worst"]


def _table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        r = row["record"]
        main = main_metric(r.get("metrics", {}))
        headline = _fmt(r, main)
        if main in ROUNDS_OF and headline != "-":  # a percentile in the median column: say so
            headline += " " + main.split("_")[1]
        out.append(
            [
                r["key"],
                r["backend"],
                r["outcome"],
                headline,
                _fmt(r, "tpot_s"),
                _fmt(r, "tokens_per_s"),
                _roofline(r),
                _fmt(r, "peak_memory_bytes"),
                verdict_word(row),
            ]
        )
    return out


def _roofline(record: dict[str, Any]) -> str:
    value = _metric(record, "roofline_fraction")
    if value is None:
        return "-"
    # A tiny model on a big memory reaches thousandths: two digits that are not zeros.
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"


# ms/token is not a column: it is 1000 / tokens/s (both from e2e), and tpot and the roofline
# beside it say more about a decode step. It stays in results.json, summary.md and the gate.
HEADER = [
    "test",
    "backend",
    "outcome",
    "median",
    "tpot",
    "tokens/s",
    "roofline",
    "peak mem",
    "verdict",
]
#: Text columns, left-aligned; numbers are right-aligned.
_LEFT = {"test", "backend", "outcome", "verdict"}


def terminal_table(rows: list[dict[str, Any]], width: int = 120) -> list[str]:
    if not rows:
        return []
    header, body = list(HEADER), _table_rows(rows)
    if any(_metric(row["record"], "joules_per_token") is not None for row in rows):
        # Energy per token, where a hardware counter measured it (energy.py): a column only
        # then, "-" for the rows without one.
        at = header.index("peak mem")
        header.insert(at, "J/token")
        for cells, row in zip(body, rows):
            value = _metric(row["record"], "joules_per_token")
            cells.insert(at, "-" if value is None else f"{value:.4g}")
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if name in _LEFT else c.rjust(w) for name, c, w in zip(header, cells, widths)
        ]
        return "  ".join(parts).rstrip()

    lines = ["= llmperf results", line(header)]
    lines += [line(b) for b in body]
    notes = []
    for row in rows:
        r = row["record"]
        generated = generated_lines(r, width)
        if r.get("note") or generated:
            notes.append(f"  {r['key']}: {r.get('note', '')}".rstrip())
        notes += generated
    details = []
    for row in rows:
        v = row.get("verdict") or {}
        for m in v.get("metrics", []):
            shown = m["gated"] or m["metric"] in ("outcome", "output_digest")
            if shown and m["verdict"] in (
                "regressed",
                "improved",
                "new-oom",
                "fixed-oom",
                "output-changed",
            ):
                stale = (
                    " (baseline is stale, consider updating)" if m["verdict"] == "improved" else ""
                )
                details.append(f"  {row['record']['key']}: {m['verdict']}: {m['detail']}{stale}")
    if notes:
        lines += ["notes:", *notes]
    if details:
        lines += ["verdicts:", *details]
    return lines


def summary_markdown(
    rows: list[dict[str, Any]],
    coverage: Optional[Coverage] = None,
    plot_lines: Sequence[str] = (),
) -> str:
    """One table per backend and device (and node, when results of several are merged):
    test, metric, baseline, now, ratio, verdict; then the notes (busy or shared devices,
    confirmations), and what the run judged when the live run knows it; then the seed-shaped
    tables (tables.py) and ``plot_lines``, the plots section (plots.summary_lines)."""

    def host(row: dict[str, Any]) -> str:
        return str(row["record"].get("provenance", {}).get("hostname") or "?")

    several_nodes = len({host(row) for row in rows}) > 1
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        r = row["record"]
        groups[(r["backend"], r["device_key"], host(row) if several_nodes else "")].append(row)
    out = ["# llmperf summary", ""]
    if coverage is not None and coverage.shown:
        out += [f"**{_md(coverage.headline())}**", ""]
        out += [f"- {_md(reason)}" for reason in (*coverage.reasons, *coverage.notes)]
        out += [""] if coverage.reasons or coverage.notes else []
    if not rows:
        out.append("No benchmark ran.")
    for (backend, device, node), group in sorted(groups.items()):
        out += [f"## {backend}: {device}" + (f" on {node}" if node else ""), ""]
        out += ["| test | metric | baseline | now | ratio | verdict |", "|---|---|---|---|---|---|"]
        for row in group:
            out += _markdown_rows(row)
        notes = [row["record"] for row in group if row["record"].get("note")]
        if notes:
            out += ["", *(f"- `{_md(r['key'])}`: {_md(r['note'])}" for r in notes)]
        out += _generated_markdown(group)
        out.append("")
    out += tables.summary_section(rows)
    out += plot_lines
    return "\n".join(out) + "\n"


#: Characters a model's text must not bring to a terminal or a page: C0/C1 controls (an ESC
#: starts a terminal escape sequence; random weights decode to raw bytes) and the bidi
#: overrides that reorder what is displayed.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _one_line(text: str) -> str:
    """Text on one line with nothing in it that acts on the display (shown as U+FFFD)."""
    return _UNSHOWABLE.sub("\ufffd", " ".join(str(text).split()))


def generated_lines(record: dict[str, Any], width: int = 120) -> list[str]:
    """A record's generated text for the terminal, under its key: one line per prompt (the
    prompt as cut, then what the model wrote), cut to ``width``."""
    out = []
    for item in record.get("generated_text") or []:
        prompt = _one_line(item.get("prompt", ""))
        continuation = _one_line(item.get("continuation", ""))
        line = f'    "{prompt}" -> "{continuation}"'
        out.append(line if len(line) <= width else line[: max(width - 1, 40)] + "…")
    return out


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


def _md_text(text: str) -> str:
    """Arbitrary text (a prompt, a model's output) shown as itself in Markdown."""
    return _MD_SPECIAL.sub(r"\\\1", _one_line(text))


def _generated_markdown(group: list[dict[str, Any]]) -> list[str]:
    """What the model wrote after the first prompts of each dataset workload, for people to
    read (seeded random weights write nonsense: that is expected)."""
    records = [row["record"] for row in group if row["record"].get("generated_text")]
    if not records:
        return []
    out = [
        "",
        "### Generated text",
        "",
        "The prompts as the model saw them (bold), then what it generated.",
        "",
    ]
    for r in records:
        out += [f"`{_md(r['key'])}`:", ""]
        for i, item in enumerate(r["generated_text"], 1):
            prompt = _md_text(item.get("prompt", "")) or "(empty)"
            out.append(f"{i}. **{prompt}** {_md_text(item.get('continuation', ''))}")
        out.append("")
    return out[:-1]


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or list item (test ids may hold `|`)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_rows(row: dict[str, Any]) -> list[str]:
    r = row["record"]
    key = f"`{_md(r['key'])}`"
    v = row.get("verdict")
    if v is None or r["outcome"] != "ok":
        return [f"| {key} | outcome | | {r['outcome']} | | {verdict_word(row)} |"]
    out = []
    for m in v["metrics"]:
        if m["metric"] not in METRICS:
            if m["verdict"] != "pass":
                out.append(f"| {key} | {m['metric']} | | | | {m['verdict']} |")
            continue
        unit = METRICS[m["metric"]].unit
        ratio = f"×{m['ratio']:.3f}" if m.get("ratio") is not None else ""
        out.append(
            f"| {key} | {m['metric']} | {format_value(m['baseline'], unit)} | "
            f"{format_value(m['current'], unit)} | {ratio} | {_metric_word(row, m)} |"
        )
    return out


def _metric_word(row: dict[str, Any], m: dict[str, Any]) -> str:
    if m["failed"] and row["record"].get("inconclusive"):
        return f"inconclusive ({m['verdict']} on a contended device, not failed)"
    failed = m["failed"] and row.get("gate", True)
    word = ("**FAIL** " if failed else "") + m["verdict"]
    if not m["gated"] and m["verdict"] != "pass":
        word += " (not gated)"
    return word


# -- pytest-benchmark interop ----------------------------------------------------------------


def benchmark_entries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our rounds in pytest-benchmark's JSON shape, so ``pytest-benchmark compare`` reads them."""
    from pytest_benchmark.stats import Stats

    out = []
    for row in rows:
        r = row["record"]
        name = main_metric(r["metrics"])
        samples = (r["metrics"].get(name) or {}).get("samples") or []
        if not samples and name in ROUNDS_OF:  # a percentile: its rounds are another metric's
            samples = (r["metrics"].get(ROUNDS_OF[name]) or {}).get("samples") or []
        if r["outcome"] != "ok" or not samples:
            continue
        stats = Stats()
        for s in samples:
            stats.update(s)
        out.append(
            {
                "group": f"llmperf:{r['suite']}",
                "name": f"{r['key']}[{r['backend']}]",
                "fullname": row["nodeid"]
                + (f":{r['key'].split(':', 1)[1]}" if ":" in r["key"] else ""),
                "params": r.get("workload"),
                "param": r["backend"],
                "extra_info": {
                    "llmperf_key": r["key"],
                    "device_key": r["device_key"],
                    **{
                        k: v.get("median")
                        for k, v in r["metrics"].items()
                        if k != name and v.get("median") is not None
                    },
                },
                "options": {"timer": "perf_counter+device_sync", "warmup": True},
                "stats": {**stats.as_dict(), "data": list(samples), "iterations": 1},
            }
        )
    return out


def write_benchmark_json(path: str, entries: list[dict[str, Any]]) -> None:
    """Write --benchmark-json ourselves when pytest-benchmark had no benchmark of its own.

    pytest-benchmark skips saving (and so never calls pytest_benchmark_update_json) when its
    own fixture never ran; our entries would vanish.
    """
    if not entries:
        return
    import datetime as _dt

    from pytest_benchmark import __version__ as pb_version

    data = {
        "machine_info": {},
        "commit_info": {},
        "benchmarks": entries,
        "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "version": pb_version,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), json.dumps(data, indent=4) + "\n")
