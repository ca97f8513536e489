"""How much of the machine other processes took while a benchmark measured.

On a shared 2-vCPU box one competing process makes torch's two threads wait on each other: a
75 ms tiny-model ``generate`` then takes up to 1.8 s. Load average reacts over a minute, far
too slowly to tell which few seconds were disturbed, so the benchmarks read the CPU counters
directly around each piece of work they time.
"""

from __future__ import annotations

import os
import time


class ForeignCpu:
    """CPUs other processes used since ``start()``, averaged over the wall time.

    /proc/stat counts every process's CPU time (steal included: a neighbour VM's share);
    ``os.times()`` counts this process's (all threads) and, with ``children=True``, that of
    its finished child processes. The difference is the competition. ``cpus()`` is None where
    /proc/stat cannot be read: callers then keep every measurement.
    """

    def __init__(self, *, children: bool = False) -> None:
        self.children = children
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark = self._read()

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return user + nice + system + irq + softirq + steal

    def _read(self) -> tuple[int | None, float, float]:
        t = os.times()
        own = t.user + t.system
        if self.children:
            own += t.children_user + t.children_system
        return self._busy_ticks(), own, time.perf_counter()

    def start(self) -> None:
        self._mark = self._read()

    def cpus(self) -> float | None:
        (b0, own0, t0), (b1, own1, t1) = self._mark, self._read()
        if b0 is None or b1 is None or t1 <= t0:
            return None
        return max(0.0, ((b1 - b0) / self.tick - (own1 - own0)) / (t1 - t0))
