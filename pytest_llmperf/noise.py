"""What says a measurement was contended: numbers taken then say nothing about the code.

Three signs, each a field of the record (``results.Record``): the host's load average beyond
what our own threads explain, pytest-xdist workers sharing the device, and rounds (or
confirmation measurements) scattered beyond what a quiet device shows. A regression measured
under any of them is *inconclusive* (``gate.decide``).
"""

from __future__ import annotations

import os
import statistics
from typing import Optional

#: The machine counts as busy when the 1-minute load average exceeds this many times the CPU
#: count, plus BUSY_SLACK. Our own torch threads alone keep the load near the CPU count, and
#: the load average lags by a minute, so "above the CPU count" would flag our own runs.
BUSY_FACTOR = 1.25
BUSY_SLACK = 0.5
#: Rounds (or confirmation measurements) scattered more than this, as a robust CV, were not
#: measured on a quiet device: within one run a tiny model's CV is 1-2% here, while a
#: neighbour's job makes single rounds 2-20x slower.
SCATTER_LIMIT = 0.25


def scatter(values: list[float]) -> Optional[float]:
    """The robust CV (1.4826 x MAD / median) of ``values`` when above SCATTER_LIMIT, else None."""
    if len(values) < 3:
        return None
    center = statistics.median(values)
    if center <= 0:
        return None
    cv = 1.4826 * statistics.median(abs(v - center) for v in values) / center
    return cv if cv > SCATTER_LIMIT else None


def busy_load(load: Optional[float]) -> Optional[float]:
    """``load`` when other processes competed for the CPU during the rounds, else None.

    On a shared box descheduled torch threads make a tiny model 10x slower; a regression
    measured then says nothing about the code (the gate calls it inconclusive).
    """
    cpus = os.cpu_count() or 1
    return load if load is not None and load > cpus * BUSY_FACTOR + BUSY_SLACK else None
