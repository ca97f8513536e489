"""Charts of a run: the seed tables as lines, and the history behind each moved verdict.

Three kinds, all from the rows of results.json (as tables.py):

* ms/token over batch size, a line per engine·dtype, one chart per model and device count,
  an ``x`` and "oom" at the top where a line ran out of memory (seed post 001's table);
* encoder p95 latency over sequence length, a line per model (seed post 004's charts);
* for each gated metric that regressed or improved: the stored runs' medians with their
  quartiles, this run's marked apart, the baseline as a horizontal line — what the gate saw.
  The stored runs come with the row (``verdict.metrics[i]["history"]``, report.attach_history).

Planning a chart (:func:`charts`) is plain data and needs no matplotlib; drawing it
(:func:`figure`) imports matplotlib, an optional extra (``pytest-llmperf[plots]``). Figures are
built with ``matplotlib.figure.Figure`` and never through pyplot, so drawing in a pytest process
neither needs a display nor switches the backend a user's own tests chose.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import tables
from .tables import Block, display_scale, median_of, number

INSTALL = "pip install 'pytest-llmperf[plots]'"
NOT_INSTALLED = f"matplotlib is not installed ({INSTALL})"
#: Where an oom marker sits: just above the top of the axes (axes coordinates), outside the
#: data, so it reads as "no value here" and not as a value of the y axis.
OOM_Y = 1.03
#: Each further line that stopped at the same x stacks its marker this much higher.
OOM_STEP = 0.06


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


@dataclass
class Line:
    """One series: points in the display unit; ``oom_at`` the x where it ran out of memory;
    ``low``/``high`` the spread (quartiles) around each point, when known."""

    label: str
    x: list[float]
    y: list[float]
    oom_at: Optional[float] = None
    low: Optional[list[float]] = None
    high: Optional[list[float]] = None


@dataclass
class Chart:
    """What one PNG shows. ``kind`` "series" (lines over a workload parameter) or "history"
    (stored runs, then this run, against the baseline)."""

    name: str
    kind: str
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    log_x: Optional[int] = None  # the base of a logarithmic x axis
    log_y: bool = False
    xticks: list[float] = field(default_factory=list)
    xticklabels: list[str] = field(default_factory=list)
    #: history charts: this run, the baseline center and the regression threshold.
    now: Optional[Line] = None
    baseline: Optional[float] = None
    threshold: Optional[float] = None
    unit: str = ""  # the display unit of the y values


@dataclass
class Drawn:
    """Files written (title, path) and the charts that failed, one line each."""

    files: list[tuple[str, Path]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def missing() -> Optional[str]:
    """Why charts cannot be drawn here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return NOT_INSTALLED
    return None


# -- planning --------------------------------------------------------------------------------


def charts(rows: Sequence[dict[str, Any]]) -> list[Chart]:
    """Every chart the rows call for, in the order summary.md lists them."""
    out = throughput_charts(rows) + encoder_charts(rows) + history_charts(rows)
    seen: dict[str, int] = {}
    for chart in out:  # two blocks may slug alike: the file names stay apart
        n = seen.get(chart.name, 0)
        seen[chart.name] = n + 1
        if n:
            chart.name = f"{chart.name}-{n + 1}"
    return out


def throughput_charts(rows: Sequence[dict[str, Any]]) -> list[Chart]:
    """ms/token over batch size: the blocks of the ms_per_token seed table with several
    batch sizes, a line per engine·dtype."""
    out = []
    for block in tables.layout(rows, "ms_per_token"):
        if block.column != "batch_size" or len(block.columns) < 2:
            continue
        out.append(
            _series_chart(
                block,
                name=f"ms_per_token-{_block_slug(block)}",
                title=f"ms per token vs batch size — {block.title()}",
                xlabel="batch size",
                ylabel="time per token (ms, median)",
            )
        )
    return out


def encoder_charts(rows: Sequence[dict[str, Any]]) -> list[Chart]:
    """p95 latency over sequence length, a line per model (encoders: BERT, RoBERTa, …)."""
    out = []
    for block in tables.layout(rows, "latency_p95_s", series=("model",)):
        if block.column != "sequence_length" or len(block.columns) < 2:
            continue
        out.append(
            _series_chart(
                block,
                name=f"latency_p95_s-{_block_slug(block)}",
                title=f"p95 latency vs sequence length — {block.title()}",
                xlabel="sequence length in tokens",
                ylabel=f"p95 latency ({block.scale.label})",
                log2_x=True,
            )
        )
    return out


def _series_chart(
    block: Block, *, name: str, title: str, xlabel: str, ylabel: str, log2_x: bool = False
) -> Chart:
    lines = []
    f = block.scale.factor
    for label in block.series:
        line = Line(label, [], [])
        for at in block.columns:
            cell = block.cell(label, at)
            if cell.state == "ok" and cell.value is not None and line.oom_at is None:
                line.x.append(float(at))
                line.y.append(cell.value * f)
            elif cell.state == "oom" and line.oom_at is None:
                line.oom_at = float(at)  # the line stops here, as the seed table's row does
        if line.x or line.oom_at is not None:
            lines.append(line)
    xs = [float(c) for c in block.columns if tables.is_number(c)]
    ys = [v for line in lines for v in line.y if v > 0]
    spans = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 8
    return Chart(
        name=name,
        kind="series",
        title=title,
        xlabel=xlabel + (" (log scale)" if spans or log2_x else ""),
        ylabel=ylabel,
        lines=lines,
        log_x=2 if (spans or log2_x) and xs and min(xs) > 0 else None,
        log_y=bool(ys) and max(ys) / min(ys) >= 10,
        xticks=xs,
        xticklabels=[f"{x:g}" for x in xs],
    )


def history_charts(rows: Sequence[dict[str, Any]]) -> list[Chart]:
    """One chart per gated metric that regressed or improved and carries its history."""
    out = []
    for row in rows:
        v = row.get("verdict") or {}
        for m in v.get("metrics") or []:
            if not (
                m.get("gated")
                and m.get("verdict") in ("regressed", "improved")
                and isinstance(m.get("history"), list)
                and m["history"]
            ):
                continue
            chart = _history_chart(row, m)
            if chart is not None:
                out.append(chart)
    return out


def _history_chart(row: dict[str, Any], m: dict[str, Any]) -> Optional[Chart]:
    record = row["record"]
    name = str(m["metric"])
    runs = [h for h in m["history"] if isinstance(h, dict) and tables.is_number(h.get("median"))]
    current = median_of(row, name)
    if current is None and tables.is_number(m.get("current")):
        current = float(m["current"])
    if not runs or current is None:
        return None
    unit = tables.metric_unit(name, [row])
    medians = [float(h["median"]) for h in runs]
    scale = display_scale(name, unit, [*medians, current])
    f = scale.factor
    stored = Line(
        f"stored runs ({len(runs)}): median, quartiles",
        x=[float(i) for i in range(1, len(runs) + 1)],
        y=[v * f for v in medians],
        low=[_num(h.get("q1"), h["median"]) * f for h in runs],
        high=[_num(h.get("q3"), h["median"]) * f for h in runs],
    )
    samples = tables.samples_of(row, name)
    q1, q3 = _quartiles(samples) if samples else (current, current)
    ratio = f" (×{current / float(m['baseline']):.3f})" if _nonzero(m.get("baseline")) else ""
    now = Line(
        f"this run: {number(current * f)} {scale.label}{ratio}, median, quartiles",
        x=[float(len(runs) + 1)],
        y=[current * f],
        low=[q1 * f],
        high=[q3 * f],
    )
    dates = [str(h.get("date") or "")[:10] for h in runs]
    workload = tables.workload_of(row)
    where = " · ".join(
        p
        for p in (
            str(workload.get("model") or ""),
            str(record.get("device_key") or ""),
        )
        if p
    )
    key = str(record.get("key", "?"))
    title = f"{name} {m['verdict']}: {key}" + (f"\n{where}" if where else "")
    baseline = m.get("baseline")
    threshold = m.get("threshold")
    return Chart(
        name=f"history-{name}-{_slug(key, 80)}-{_slug(str(record.get('device_key', '')), 40)}",
        kind="history",
        title=title,
        xlabel="stored runs, oldest to newest (date), then this run",
        ylabel=f"{name} ({scale.label})" if scale.label else name,
        lines=[stored],
        now=now,
        baseline=_num(baseline, 0) * f if tables.is_number(baseline) else None,
        threshold=_num(threshold, 0) * f if tables.is_number(threshold) else None,
        xticks=[*stored.x, *now.x],
        xticklabels=[*(d or str(i) for i, d in enumerate(dates, 1)), "now"],
        unit=scale.label,
    )


def _nonzero(value: Any) -> bool:
    return tables.is_number(value) and float(value) != 0


def _num(value: Any, default: Any) -> float:
    return float(value) if tables.is_number(value) else float(default)


def _quartiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


def _slug(text: str, limit: int) -> str:
    """A file-name part; one cut to ``limit`` ends in a digest of the whole text, so two long
    keys that differ only at their ends (sequence_length=8 and =16) get different, stable
    names rather than -2, -3 suffixes that depend on the run's order."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_.")
    if len(slug) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        slug = slug[: limit - 9].rstrip("_.") + "-" + digest
    return slug or "x"


def _block_slug(block: Block) -> str:
    parts = tables.title_parts(block.context)
    return _slug("-".join(parts), 120)


# -- drawing ---------------------------------------------------------------------------------


def figure(chart: Chart) -> Any:
    """The chart as a matplotlib Figure (raises PlotsUnavailable without matplotlib)."""
    if missing():
        raise PlotsUnavailable(NOT_INSTALLED)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if chart.kind == "history":
        _draw_history(ax, chart)
    else:
        _draw_series(ax, chart)
    wrapped = [w for part in chart.title.splitlines() for w in textwrap.wrap(part, 90) or [""]]
    ax.set_title("\n".join(wrapped), fontsize=10, pad=6 + 16 * _oom_rows(chart))
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _oom_rows(chart: Chart) -> int:
    """How many oom markers stack at one x (the room they need above the axes)."""
    at = [line.oom_at for line in chart.lines if line.oom_at is not None]
    return max((at.count(x) for x in at), default=0)


def _plain(value: float, _pos: Any = None) -> str:
    return f"{value:g}"


def _draw_series(ax: Any, chart: Chart) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if chart.log_x:
        ax.set_xscale("log", base=chart.log_x)
    if chart.log_y:
        ax.set_yscale("log")
        # 1, 2, 5, 10, 20 …: values read off the axis without counting decades.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ooms: dict[float, int] = {}
    for line in chart.lines:
        (drawn,) = ax.plot(line.x, line.y, marker="o", markersize=4, label=line.label)
        if line.oom_at is None:
            continue
        # Stacked when several lines stop at the same x, so each "oom" stays readable.
        k = ooms.get(line.oom_at, 0)
        ooms[line.oom_at] = k + 1
        y = OOM_Y + OOM_STEP * k
        trans = ax.get_xaxis_transform()  # x in data, y in axes fractions: the top
        ax.plot(
            [line.oom_at],
            [y],
            marker="x",
            markersize=9,
            markeredgewidth=2,
            linestyle="none",
            color=drawn.get_color(),
            transform=trans,
            clip_on=False,
            label=f"_oom {line.label}",
            gid="oom",
        )
        ax.annotate(
            "oom",
            (line.oom_at, y),
            xycoords=trans,
            xytext=(7, -3),
            textcoords="offset points",
            fontsize=8,
            color=drawn.get_color(),
        )
    if chart.xticks:
        ax.set_xticks(chart.xticks, chart.xticklabels)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8, loc="best")


def _draw_history(ax: Any, chart: Chart) -> None:
    for line, style in ((chart.lines[0], {"fmt": "o", "color": "tab:blue"}),) + (
        ((chart.now, {"fmt": "D", "color": "tab:red", "markersize": 8}),) if chart.now else ()
    ):
        low = [y - lo for y, lo in zip(line.y, line.low or line.y)]
        high = [hi - y for y, hi in zip(line.y, line.high or line.y)]
        ax.errorbar(line.x, line.y, yerr=[low, high], capsize=4, label=line.label, **style)
    if chart.baseline is not None:
        ax.axhline(
            chart.baseline,
            color="tab:green",
            linestyle="-",
            label=f"baseline {number(chart.baseline)} {chart.unit} "
            f"(median of the {len(chart.lines[0].x)} runs' medians)",
        )
    if chart.threshold is not None:
        ax.axhline(chart.threshold, color="tab:gray", linestyle="--", label="regression threshold")
    ax.set_xticks(chart.xticks, chart.xticklabels, rotation=30, ha="right")
    ax.set_xlim(0.5, max(chart.xticks or [1.0]) + 0.5)
    ax.legend(fontsize=8, loc="best")


def draw(rows: Sequence[dict[str, Any]], directory: Path) -> Drawn:
    """Write every chart of ``rows`` as ``<directory>/<name>.png``; a chart that fails is one
    line in ``Drawn.errors`` and the others are still written. Raises PlotsUnavailable
    without matplotlib (before anything is created)."""
    planned = charts(rows)
    drawn = Drawn()
    if not planned:
        return drawn
    if missing():
        raise PlotsUnavailable(NOT_INSTALLED)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        drawn.errors.append(f"plots not drawn: {directory}: {exc.strerror or exc}")
        return drawn
    for chart in planned:
        path = directory / f"{chart.name}.png"
        try:
            fig = figure(chart)
            temp = path.with_name(f".{path.name}.tmp")
            fig.savefig(temp, format="png")
            os.replace(temp, path)
        except Exception as exc:  # a chart must never cost the report: one line, go on
            first = str(exc).splitlines()[0] if str(exc) else ""
            drawn.errors.append(f"plot {path.name} not drawn: {type(exc).__name__}: {first}")
            continue
        drawn.files.append((chart.title.splitlines()[0], path))
    return drawn


def summary_lines(
    drawn: Optional[Drawn], markdown_dir: Path, not_drawn: Optional[str] = None
) -> list[str]:
    """summary.md's "Plots" section: relative links to the PNGs, or why there are none."""
    if not_drawn:
        return ["## Plots", "", f"Plots were not drawn: {not_drawn}.", ""]
    if drawn is None or not (drawn.files or drawn.errors):
        return []
    out = ["## Plots", ""]
    for title, path in drawn.files:
        link = os.path.relpath(path, markdown_dir).replace(os.sep, "/")
        alt = tables.md_text(title).replace("[", "\\[").replace("]", "\\]")
        out += [f"![{alt}]({link})", ""]
    out += [f"- {tables.md_text(error)}" for error in drawn.errors]
    return out + ([""] if drawn.errors else [])


__all__ = [
    "INSTALL",
    "NOT_INSTALLED",
    "Chart",
    "Drawn",
    "Line",
    "PlotsUnavailable",
    "charts",
    "draw",
    "encoder_charts",
    "figure",
    "history_charts",
    "missing",
    "summary_lines",
    "throughput_charts",
]
