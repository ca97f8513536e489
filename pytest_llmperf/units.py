"""How numbers and dates are written: one formatter, so the table, the failure message, the
Markdown summary and ``llmperf baselines show`` print a value the same way, and one clock for
the dates in baselines and provenance."""

from __future__ import annotations

import datetime
from typing import Optional

from .metrics import METRICS


def _num(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e4:
        return f"{v:.0f}"
    return f"{v:.4g}"


def format_value(value: float | None, unit: str) -> str:
    """A number with its unit: 4 significant digits; seconds below 1 as ms; bytes in KiB…GiB."""
    if value is None:
        return "n/a"
    if unit == "B":
        a = abs(value)
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if a >= size:
                return f"{value / size:.{2 if name == 'GiB' else 1}f} {name}"
        return f"{value:.0f} B"
    if unit == "1":
        return _num(value)
    if unit == "s" and 0 < abs(value) < 1:
        return f"{_num(value * 1000)} ms"  # latencies read in ms: 81.23 ms, not 0.08123 s
    return f"{_num(value)} {unit}"


def format_metric(value: Optional[float], name: str) -> str:
    """A metric's value in a table column: ms below a second, tokens/s with one decimal."""
    if value is None:
        return "-"
    unit = METRICS[name].unit
    if unit == "s":
        if value < 0.001:
            return f"{value * 1e6:.2f} µs"  # a fast kernel timed with measure()
        return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "tokens/s":
        return f"{value:.1f}"
    return format_value(value, unit)


def utc_now() -> str:
    """Now, as every date the plugin writes: ``2026-11-22T03:00:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
