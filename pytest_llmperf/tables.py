"""Seed-shaped tables: one metric's medians laid out as the published posts print them.

The posts this project reproduces show a metric as a grid: rows engine·dtype, columns the batch
size (or the sequence length), ``oom`` where a run did not fit and blank beyond it. A change is
read off that grid at a glance, where a list of keys hides it, so ``llmperf report --table``,
summary.md's "Tables" section and the plots (plots.py) share this layout. It is built from the
rows of results.json alone ({"record", "verdict", ...}), old files included: every workload
field is optional.

Which workload parameter makes the columns is found from the data, not from the suite: within
one suite on one device, the numeric parameter that varies (batch size, sequence length, image
size first); the parameters that stay fixed in a row of cells make the block (model, devices,
new tokens).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .metrics import METRICS

#: Facts a measurement adds to its workload (how many rounds, a reused model): not what was
#: asked, so never a column or a block.
NOISE = frozenset(
    {"rounds", "model_reused", "fresh", "nodeid", "input_shape"}
    | {"prompt_token_counts", "batches"}  # what a dataset pass found in its prompts
)
#: What a workload is asked by its test: never dropped as a by-product of the column.
CORE = frozenset(
    {"model", "devices", "engine", "dtype", "engine_options", "new_tokens"}
    | {"batch_size", "sequence_length", "image_size"}
)
#: What a row of a seed table is: the posts' "project" column.
ENGINE_SERIES = ("engine", "dtype", "engine_options")
#: Columns preferred when several parameters vary; the device count only when nothing else does
#: (it usually names a block: the posts' 1-device and 8-device tables).
PREFERRED_COLUMNS = ("batch_size", "sequence_length", "image_size")
#: The metrics summary.md tabulates, and when (see summary_metrics).
SUMMARY_METRICS = ("ms_per_token", "latency_p95_s")
#: Verdicts that put the baseline beside a cell.
MOVED = frozenset({"regressed", "improved", "new-oom", "fixed-oom"})
_TITLE_ORDER = ("model", "engine", "dtype", "engine_options", "devices")


class UnknownMetric(ValueError):
    """A metric name that neither the vocabulary nor any row knows."""


@dataclass(frozen=True)
class Scale:
    """How a block's numbers are printed: ``label`` is the unit a reader sees, ``factor``
    turns the metric's own unit into it (seconds below one read as ms)."""

    label: str
    factor: float = 1.0


@dataclass
class Cell:
    """One workload's value in a table. ``state``: ok, oom, error or blank (not measured, or
    beyond the first oom of its row, as in the seed posts)."""

    state: str
    value: Optional[float] = None  # the median, in the metric's own unit
    verdict: Optional[str] = None  # one of MOVED when the verdict moved, else None
    baseline: Optional[float] = None  # the baseline's center, where the verdict moved
    samples: list[float] = field(default_factory=list)


@dataclass
class Block:
    """One grid: what is fixed in it (``context``), its rows (``series``, first seen first),
    its columns (values of the workload parameter ``column``) and the cells."""

    metric: str
    unit: str
    scale: Scale
    column: Optional[str]
    columns: list[Any]
    series: list[str]
    series_head: str
    context: dict[str, Any]
    cells: dict[tuple[str, Any], Cell]

    def cell(self, label: str, column: Any) -> Cell:
        return self.cells.get((label, column), Cell("blank"))

    def title(self) -> str:
        return " · ".join(title_parts(self.context))

    def header(self) -> str:
        """The metric, its unit stated once, its direction, and what the block holds."""
        better = direction(self.metric)
        # A percentile (latency_p95_s) is one value per run: no median of rounds to name.
        rounds = any(len(c.samples) > 1 for c in self.cells.values())
        unit = ", ".join(p for p in ("median" if rounds else "", self.scale.label) if p)
        hint = "; ".join(p for p in (unit, f"{better} is better" if better else "") if p)
        return (
            f"{self.metric} ({hint}): {self.title()}" if hint else f"{self.metric}: {self.title()}"
        )

    def text_of(self, cell: Cell) -> str:
        return cell_text(cell, self.scale)

    @property
    def moved(self) -> bool:
        return any(c.verdict is not None for c in self.cells.values())


@dataclass
class SeedTable:
    metric: str
    blocks: list[Block]

    def text(self) -> str:
        return render_text(self)

    def markdown(self) -> list[str]:
        return render_markdown(self)


# -- reading rows ----------------------------------------------------------------------------


def metric_unit(metric: str, rows: Iterable[dict[str, Any]] = ()) -> str:
    """The metric's unit: the vocabulary's, else what a record stored, else from its name."""
    if metric in METRICS:
        return METRICS[metric].unit
    for row in rows:
        stored = (row["record"].get("metrics") or {}).get(metric) or {}
        if isinstance(stored.get("unit"), str):
            return str(stored["unit"])
    if metric.endswith("_s"):
        return "s"
    return "B" if metric.endswith("_bytes") else ""


def direction(metric: str) -> str:
    if metric in METRICS:
        return METRICS[metric].direction
    return "lower" if metric.endswith(("_s", "_bytes")) else ""


def known_metrics(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The vocabulary and every metric a row carries (a newer plugin's, a user's)."""
    names = set(METRICS)
    for row in rows:
        names.update((row["record"].get("metrics") or {}).keys())
    return sorted(names)


def median_of(row: dict[str, Any], metric: str) -> Optional[float]:
    stored = (row["record"].get("metrics") or {}).get(metric) or {}
    value = stored.get("median")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def samples_of(row: dict[str, Any], metric: str) -> list[float]:
    stored = (row["record"].get("metrics") or {}).get(metric) or {}
    return [float(s) for s in stored.get("samples") or [] if isinstance(s, (int, float))]


def workload_of(row: dict[str, Any]) -> dict[str, Any]:
    w = row["record"].get("workload")
    return w if isinstance(w, dict) else {}


def _host(row: dict[str, Any]) -> str:
    return str((row["record"].get("provenance") or {}).get("hostname") or "?")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def options_text(options: Any) -> str:
    """``{"offload": "disk"}`` → ``offload=disk``: engine options as the posts name a setup."""
    # A test parametrized with engine_options=None carries it as the text "None".
    if not options or options in ("None", "{}"):
        return ""
    if not isinstance(options, dict):
        return str(options)
    parts = []
    for name, value in sorted(options.items()):
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def series_label(row: dict[str, Any], fields: Sequence[str]) -> str:
    w = workload_of(row)
    parts = []
    for name in fields:
        value = w.get(name)
        if name == "engine_options":
            text = options_text(value)
        else:
            text = "" if value is None else str(value)
        if text:
            parts.append(text)
    key = str(row["record"].get("key", ""))
    if ":" in key.rsplit("]", 1)[-1]:  # a named workload of a test: key ends in ":<name>"
        parts.append(key.rsplit(":", 1)[1])
    return " ".join(parts) or str(row["record"].get("key", "?"))


def title_parts(context: dict[str, Any]) -> list[str]:
    parts = []
    if context.get("suite"):
        parts.append(str(context["suite"]))
    shown = [k for k in _TITLE_ORDER if k in context] + sorted(
        k for k in context if k not in _TITLE_ORDER and k not in ("suite", "device", "host")
    )
    for name in shown:
        value = context[name]
        if value is None or value == "" or value == {}:
            continue
        if name in ("model", "engine", "dtype"):
            parts.append(str(value))
        elif name == "engine_options":
            if options_text(value):
                parts.append(options_text(value))
        elif name == "devices" and is_number(value):
            parts.append(f"{value} device{'s' if value != 1 else ''}")
        else:
            text = str(value)
            parts.append(f"{name}={text if len(text) <= 32 else text[:31] + '…'}")
    if context.get("device"):
        parts.append(str(context["device"]))
    if context.get("host"):
        parts.append(f"on {context['host']}")
    return parts


# -- laying out ------------------------------------------------------------------------------


def seed_table(rows: Sequence[dict[str, Any]], metric: str) -> SeedTable:
    """``metric``'s medians in the seed posts' layout: a block per suite, model, device count
    and device, rows engine·dtype (and options), columns the parameter that varies."""
    return SeedTable(metric, layout(rows, metric, ENGINE_SERIES))


def layout(
    rows: Sequence[dict[str, Any]], metric: str, series: Sequence[str] = ENGINE_SERIES
) -> list[Block]:
    """The blocks of ``metric`` with rows named by the workload fields ``series`` (plots lay
    out the encoder chart with ``("model",)``: a line per model)."""
    several_hosts = len({_host(row) for row in rows}) > 1
    suites: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        r = row["record"]
        at = (
            str(r.get("suite", "")),
            str(r.get("backend", "")),
            str(r.get("device_key", "")),
            _host(row) if several_hosts else "",
        )
        suites[at].append(row)
    unit = metric_unit(metric, rows)
    blocks: list[Block] = []
    for (suite, backend, device, host), group in suites.items():
        if not any(median_of(row, metric) is not None for row in group):
            continue
        # Rows of this suite that measured the metric, or that could not (oom, error): an
        # ok row without it is another kind of workload (a timed callable, a load).
        wanted = [
            row
            for row in group
            if median_of(row, metric) is not None or row["record"].get("outcome") != "ok"
        ]
        context: dict[str, Any] = {"suite": suite, "device": device or backend}
        if host:
            context["host"] = host
        blocks += _blocks(wanted, metric, unit, _rows_by(wanted, series), context)
    return blocks


def _rows_by(rows: Sequence[dict[str, Any]], series: Sequence[str]) -> Sequence[str]:
    """The models as the rows when a suite ran one engine·dtype over several of them (the
    encoder post's table: p95 per model), else ``series``."""
    if tuple(series) != ENGINE_SERIES:
        return series
    engines = {series_label(row, ENGINE_SERIES) for row in rows}
    models = {str(workload_of(row).get("model")) for row in rows}
    return ("model",) if len(engines) == 1 and len(models) > 1 else series


def _identity(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The workload fields that say what was asked: those present in some row, less the
    facts a measurement adds (a field only ok rows carry while other rows exist, such as the
    prompt's measured token count)."""
    ok_only: set[str] = set()
    seen: dict[str, None] = {}
    others = [row for row in rows if row["record"].get("outcome") != "ok"]
    for row in rows:
        seen.update(dict.fromkeys(workload_of(row)))
    if others:
        in_others = set().union(*(workload_of(row).keys() for row in others))
        ok_only = set(seen) - in_others
    return [k for k in seen if k not in NOISE and k not in ok_only]


def _choose_column(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Optional[str]:
    distinct: dict[str, set[Any]] = {}
    for name in fields:
        values = [workload_of(row).get(name) for row in rows]
        values = [v for v in values if v is not None]
        if values and all(is_number(v) for v in values):
            distinct[name] = set(values)
    varying = [n for n, v in distinct.items() if len(v) > 1]
    for name in PREFERRED_COLUMNS:
        if name in varying:
            return name
    others = sorted((n for n in varying if n != "devices"), key=lambda n: -len(distinct[n]))
    if others:
        return others[0]
    if "devices" in varying:
        return "devices"
    return next((n for n in PREFERRED_COLUMNS if n in distinct), None)


def _follows(rows: Sequence[dict[str, Any]], name: str, column: Optional[str]) -> bool:
    """Whether ``name`` only restates the column (a prompt's token count equal to the
    sequence length): it varies, and each column value has one value of it."""
    if column is None:
        return False
    by_column: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        w = workload_of(row)
        at = json.dumps(w.get(column), default=str)
        by_column[at].add(json.dumps(w.get(name), sort_keys=True, default=str))
    seen = set().union(*by_column.values()) if by_column else set()
    return len(seen) > 1 and all(len(v) == 1 for v in by_column.values())


def _blocks(
    rows: list[dict[str, Any]],
    metric: str,
    unit: str,
    series: Sequence[str],
    where: dict[str, Any],
    depth: int = 0,
) -> list[Block]:
    fields = _identity(rows)
    column = _choose_column(rows, [f for f in fields if f not in series])
    inside = [r for r in rows if column is None or workload_of(r).get(column) is not None]
    apart = [r for r in rows if r not in inside]
    fixed = [
        f
        for f in fields
        if f != column and f not in series and (f in CORE or not _follows(inside, f, column))
    ]
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    contexts: dict[str, dict[str, Any]] = {}
    for row in inside:
        w = workload_of(row)
        context = {name: w.get(name) for name in fixed}
        key = json.dumps(context, sort_keys=True, default=str)
        grouped[key].append(row)
        contexts.setdefault(key, {**context, **where})
    out = []
    for key, members in grouped.items():
        if any(median_of(row, metric) is not None for row in members):
            out.append(_block(members, metric, unit, series, column, contexts[key]))
    if apart and depth < 3:  # e.g. ViT (image size) beside the text encoders (sequence length)
        out += _blocks(apart, metric, unit, series, where, depth + 1)
    return out


def _block(
    rows: list[dict[str, Any]],
    metric: str,
    unit: str,
    series: Sequence[str],
    column: Optional[str],
    context: dict[str, Any],
) -> Block:
    labels: dict[str, None] = {}
    columns: set[Any] = set()
    found: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        label = series_label(row, series)
        at = workload_of(row).get(column) if column else None
        labels.setdefault(label)
        columns.add(at)
        found[(label, at)] = row  # a later row of the same workload (merged files) wins
    ordered = sorted(columns, key=lambda v: (not is_number(v), v if is_number(v) else str(v)))
    cells: dict[tuple[str, Any], Cell] = {}
    for label in labels:
        stopped = False
        for at in ordered:
            measured = found.get((label, at))
            if measured is None:
                continue
            cell = _cell(measured, metric)
            if cell.state == "oom" and stopped and cell.verdict is None:
                cell = Cell("blank")  # beyond the first oom: the seed tables leave it empty
            stopped = stopped or cell.state == "oom"
            if cell.state == "ok":
                stopped = False
            cells[(label, at)] = cell
    values = [c.value for c in cells.values() if c.value is not None]
    values += [c.baseline for c in cells.values() if c.baseline is not None]
    head = " ".join(s.replace("_", " ") for s in series if s != "engine_options") or "workload"
    return Block(
        metric=metric,
        unit=unit,
        scale=display_scale(metric, unit, values),
        column=column,
        columns=ordered,
        series=list(labels),
        series_head=head,
        context=context,
        cells=cells,
    )


def _cell(row: dict[str, Any], metric: str) -> Cell:
    record = row["record"]
    outcome = record.get("outcome")
    verdicts = {m.get("metric"): m for m in (row.get("verdict") or {}).get("metrics") or []}
    if outcome == "oom":
        ov = verdicts.get("outcome") or {}
        if ov.get("verdict") == "new-oom":
            return Cell("oom", verdict="new-oom", baseline=_center(ov.get("history"), metric))
        return Cell("oom")
    if outcome != "ok":
        return Cell("error")
    value = median_of(row, metric)
    if value is None:
        return Cell("blank")
    cell = Cell("ok", value=value, samples=samples_of(row, metric))
    mv = verdicts.get(metric) or {}
    if mv.get("verdict") in ("regressed", "improved") and mv.get("baseline") is not None:
        cell.verdict, cell.baseline = str(mv["verdict"]), float(mv["baseline"])
    elif (verdicts.get("outcome") or {}).get("verdict") == "fixed-oom":
        cell.verdict = "fixed-oom"
    return cell


def _center(history: Any, metric: str) -> Optional[float]:
    """The baseline's center (median of the stored runs' medians) from a new-oom verdict's
    history (report.attach_history); None for files written before it was kept."""
    if not isinstance(history, list):
        return None
    medians = [
        float(run["medians"][metric])
        for run in history
        if isinstance(run, dict)
        and isinstance(run.get("medians"), dict)
        and is_number(run["medians"].get(metric))
    ]
    return statistics.median(medians) if medians else None


# -- printing --------------------------------------------------------------------------------


def display_scale(metric: str, unit: str, values: Sequence[float]) -> Scale:
    """One unit per block, stated in its header, so the cells are plain numbers like the
    seed's "230.38"."""
    top = max((abs(v) for v in values), default=0.0)
    if metric == "ms_per_token":
        return Scale("ms/token")
    if unit == "s":
        return Scale("ms", 1000.0) if top < 1 else Scale("s")
    if unit == "B":
        return Scale("GiB", 2.0**-30) if top >= 2**30 else Scale("MiB", 2.0**-20)
    if unit == "1":
        return Scale("")
    return Scale(unit)


def number(value: float) -> str:
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{value:.0f}"
    if a >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}"


def cell_text(cell: Cell, scale: Scale) -> str:
    """``12.40``, ``oom``, ``12.40 (was 10.89) ▲``, ``oom (was 10.89)``, ``3.10 (was oom)``."""
    if cell.state == "blank":
        return ""
    if cell.state == "error":
        return "error"
    base = number(cell.baseline * scale.factor) if cell.baseline is not None else None
    if cell.state == "oom":
        if cell.verdict == "new-oom":
            return f"oom (was {base or 'ok'})"
        return "oom"
    assert cell.value is not None
    now = number(cell.value * scale.factor)
    if cell.verdict == "fixed-oom":
        return f"{now} (was oom)"
    if cell.verdict is not None and base is not None and cell.baseline is not None:
        arrow = "▲" if cell.value > cell.baseline else "▼"
        return f"{now} (was {base}) {arrow}"
    return now


LEGEND = (
    "(was …): the baseline, shown where the verdict moved (regressed, improved, new or fixed "
    "oom); ▲/▼: now above/below it"
)


def _grid(block: Block) -> list[list[str]]:
    head = f"{block.series_head} \\ {block.column or 'value'}"
    grid = [[head, *(str(c) if c is not None else "" for c in block.columns)]]
    for label in block.series:
        grid.append([label, *(block.text_of(block.cell(label, c)) for c in block.columns)])
    return grid


def render_text(table: SeedTable) -> str:
    """Plain text for the terminal: a header line per block, aligned columns, numbers right."""
    out: list[str] = []
    for block in table.blocks:
        grid = _grid(block)
        widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
        out.append(block.header())
        for n, cells in enumerate(grid):
            line = [cells[0].ljust(widths[0])]
            line += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            out.append("  ".join(line).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        if block.moved:
            out.append(LEGEND)
        out.append("")
    return "\n".join(out)


def md_text(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(table: SeedTable, level: int = 3) -> list[str]:
    """Markdown lines: a heading per block, then its grid (numbers right-aligned)."""
    out: list[str] = []
    for block in table.blocks:
        grid = _grid(block)
        out += [f"{'#' * level} {md_text(block.header())}", ""]
        out.append("| " + " | ".join(md_text(c) for c in grid[0]) + " |")
        out.append("|:---|" + "---:|" * (len(grid[0]) - 1))
        out += ["| " + " | ".join(md_text(c) for c in cells) + " |" for cells in grid[1:]]
        if block.moved:
            out += ["", f"_{md_text(LEGEND)}_"]
        out.append("")
    return out


def summary_tables(rows: Sequence[dict[str, Any]]) -> list[SeedTable]:
    """What summary.md tabulates: ms/token where a suite ran several batch sizes (the
    throughput tables; a latency suite's single batch size is the summary's own table), p95
    latency wherever encoder (forward) records exist."""
    chosen = []
    for metric in SUMMARY_METRICS:
        table = seed_table(rows, metric)
        if metric == "ms_per_token":
            table.blocks = [
                b for b in table.blocks if b.column == "batch_size" and len(b.columns) > 1
            ]
        if table.blocks:
            chosen.append(table)
    return chosen


def summary_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """summary.md's "Tables" section, empty when no metric applies."""
    tables = summary_tables(rows)
    if not tables:
        return []
    out = ["## Tables", ""]
    for table in tables:
        out += render_markdown(table)
    return out
