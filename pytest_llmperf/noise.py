"""What says a measurement was contended: numbers taken then say nothing about the code.

Three signs, each a field of the record (``results.Record``): the host's load average beyond
what our own processes explain, pytest-xdist workers sharing the device, and rounds (or
confirmation measurements) scattered beyond what a quiet device shows. A regression measured
under any of them is *inconclusive* (``gate.decide``).

"Our own processes" is a family: the process tree under the pytest process that owns the run
(``family_root``). Its xdist workers, the child pytest processes of ``--llmperf-processes``
and the launchers' workers and ranks all raise the load average, and the load average
remembers them for a minute, so a child started right after its sibling still sees the
sibling's load. Counting that as a neighbour's job would switch the gate off for every run
that uses more than one process; ``OwnLoad`` estimates our share and only the rest counts.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from .settings import FAMILY_ROOT_ENV, PROCESS_ENV, RECORD_RUN_ENV

#: Where /proc cannot tell our share (macOS), the old rule: busy when the 1-minute load
#: average exceeds this many times the CPU count, plus BUSY_SLACK. Our own torch threads
#: alone keep the load near the CPU count, and the load average lags by a minute, so "above
#: the CPU count" would flag our own runs.
BUSY_FACTOR = 1.25
BUSY_SLACK = 0.5
#: With our share known, busy when the load that is not ours exceeds this many times the CPU
#: count, plus BUSY_SLACK: the foreign load the old rule tolerated while our own threads kept
#: about every CPU busy.
FOREIGN_FACTOR = 0.25
#: The time constant of the kernel's 1-minute load average (an exponential moving average of
#: the runnable threads, sampled every 5 s).
LOAD_TAU_S = 60.0
#: Rounds (or confirmation measurements) scattered more than this, as a robust CV, were not
#: measured on a quiet device: within one run a tiny model's CV is 1-2% here, while a
#: neighbour's job makes single rounds 2-20x slower.
SCATTER_LIMIT = 0.25

#: Set by pytest-xdist in its workers; their controller is the family's root.
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"


def scatter(values: list[float]) -> Optional[float]:
    """The robust CV (1.4826 x MAD / median) of ``values`` when above SCATTER_LIMIT, else None."""
    if len(values) < 3:
        return None
    center = statistics.median(values)
    if center <= 0:
        return None
    cv = 1.4826 * statistics.median(abs(v - center) for v in values) / center
    return cv if cv > SCATTER_LIMIT else None


def busy_load(
    load: Optional[float], own: Optional[float] = None, cpus: Optional[int] = None
) -> Optional[float]:
    """``load`` (the load average) when other processes competed for the CPU during the
    rounds, else None.

    On a shared box descheduled torch threads make a tiny model 10x slower; a regression
    measured then says nothing about the code (the gate calls it inconclusive). ``own`` is our
    family's share of ``load`` (``own_load``): only the rest is a neighbour. Without it (no
    /proc, as on macOS) the old rule applies, which tolerates about one CPU count of our own.
    """
    if load is None:
        return None
    cpus = cpus or os.cpu_count() or 1
    if own is None:
        return load if load > cpus * BUSY_FACTOR + BUSY_SLACK else None
    return load if load - own > cpus * FOREIGN_FACTOR + BUSY_SLACK else None


def busy_note(load: float, own: Optional[float], cpus: Optional[int] = None) -> str:
    """The note on a busy record: the load and, where known, how much of it was ours."""
    cpus = cpus or os.cpu_count() or 1
    ours = f", {own:.1f} of it ours" if own is not None else ""
    return f"machine busy: load average {load:.1f} on {cpus} CPUs{ours}, during the rounds"


# -- our own share of the load ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says of one process, in clock ticks."""

    pid: int
    ppid: int
    #: utime + stime + cutime + cstime: its own CPU time and that of the children it reaped.
    cpu_ticks: int
    #: When it started, in ticks after boot (field 22).
    start_ticks: int


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name (field 2) sits in parentheses and may
    itself hold spaces and parentheses, so the fields are counted from its last ')'."""
    head, sep, tail = text.rpartition(")")
    pid_text, paren, _comm = head.partition(" (")
    if not sep or not paren:
        raise ValueError(f"/proc stat line without '(comm)': {text[:80]!r}")
    fields = tail.split()  # fields[0] is field 3 (state)
    if len(fields) < 20:
        raise ValueError(f"/proc stat line with {len(fields) + 2} fields, expected 22 or more")
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])  # fields 14-17
    return ProcStat(
        pid=int(pid_text),
        ppid=int(fields[1]),
        cpu_ticks=utime + stime + cutime + cstime,
        start_ticks=int(fields[19]),
    )


class ProcessTable(Protocol):
    """The live processes and the clock they are counted in (a fake one in tests)."""

    #: Clock ticks per second (``os.sysconf("SC_CLK_TCK")``).
    ticks_per_s: float

    def processes(self) -> dict[int, ProcStat]:
        """Every live process by pid."""
        ...

    def uptime_s(self) -> float:
        """Seconds since boot: the clock of ``start_ticks``."""
        ...


class LinuxProcessTable:
    """The real table, read from /proc."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root
        self.ticks_per_s = float(os.sysconf("SC_CLK_TCK"))

    @staticmethod
    def available(root: Path = Path("/proc")) -> bool:
        return (root / "uptime").is_file() and (root / "self" / "stat").is_file()

    def processes(self) -> dict[int, ProcStat]:
        out: dict[int, ProcStat] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                try:
                    stat = parse_stat((self.root / entry.name / "stat").read_text())
                except (OSError, ValueError):
                    continue  # gone since the listing, or not ours to read
                out[stat.pid] = stat
        return out

    def uptime_s(self) -> float:
        return float((self.root / "uptime").read_text().split()[0])


def family_root(
    table: Mapping[int, ProcStat],
    environ: Mapping[str, str],
    pid: Optional[int] = None,
    ppid: Optional[int] = None,
) -> int:
    """The pid whose process tree is "ours".

    A launcher's worker or rank is told by its parent (``FAMILY_ROOT_ENV``, honoured only when
    it names an ancestor, so a stale export cannot point elsewhere); a child of
    ``--llmperf-processes`` (or of ``llmperf ab``) belongs to the pytest process that waits for
    it, a run of ``llmperf baselines record --runs N`` to that command, an xdist worker to its
    controller; anything else is its own root.
    """
    pid = os.getpid() if pid is None else pid
    ppid = os.getppid() if ppid is None else ppid
    named = environ.get(FAMILY_ROOT_ENV, "")
    if named.isdigit() and int(named) in _ancestors(table, pid):
        return int(named)
    if any(environ.get(name) for name in (PROCESS_ENV, RECORD_RUN_ENV, XDIST_WORKER_ENV)):
        return ppid
    return pid


def _ancestors(table: Mapping[int, ProcStat], pid: int) -> list[int]:
    chain = [pid]
    while pid in table and table[pid].ppid not in chain and table[pid].ppid > 0:
        pid = table[pid].ppid
        chain.append(pid)
    return chain


def family_cpu_ticks(table: Mapping[int, ProcStat], root: int) -> Optional[int]:
    """The CPU ticks of ``root``'s live process tree, reaped children included (their time is
    in their parent's cutime/cstime); None when ``root`` is gone."""
    if root not in table:
        return None
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid].cpu_ticks
        todo += children.get(pid, [])
    return total


class OwnLoad:
    """Our family's CPU rate (CPU-seconds per second) as the load average would see it.

    The kernel's 1-minute load average is an exponential moving average (time constant 60 s)
    of the runnable threads. ``sample`` keeps the same average of the family's CPU rate,
    updated at every call with the mean rate since the previous one; the first call seeds it
    with the family's mean rate over the root's lifetime. An approximation, in these ways:

    * CPU time is not runnable time. A thread of ours waiting for a CPU raises the load but
      not our CPU time: when the host is oversubscribed (xdist workers whose torch threads
      together outnumber the CPUs) the rate under-counts us. ``own_load`` corrects for it by
      sharing the excess load out in proportion to CPU time, as a fair scheduler does.
      Uninterruptible sleep (reading a checkpoint) also raises the load and is not counted.
    * The seed is a lifetime mean, while the load average remembers about a minute: a root
      that idled long and only now got busy is under-counted, one that was busy long ago and
      is idle now is over-counted, until a minute of samples has replaced the seed.
    * Between samples the rate is taken as constant: CPU spent early in a long gap is
      over-weighted (the kernel has decayed it more), CPU spent late under-weighted.
    * Only the live tree and the children it reaped count: a process that left the tree
      (daemonized, re-parented) takes its time with it; a subprocess a test starts counts as
      ours (it is, for the question "was a neighbour busy").
    """

    def __init__(self, table: ProcessTable, root: int, tau_s: float = LOAD_TAU_S) -> None:
        self.table = table
        self.root = root
        self.tau_s = tau_s
        self.rate: Optional[float] = None
        self._last: Optional[tuple[float, float]] = None  # (uptime s, family CPU s)

    def sample(self) -> Optional[float]:
        """The family's averaged CPU rate now, None when the root is gone."""
        processes = self.table.processes()
        ticks = family_cpu_ticks(processes, self.root)
        if ticks is None:
            return None
        now = self.table.uptime_s()
        cpu_s = ticks / self.table.ticks_per_s
        if self.rate is None or self._last is None:
            lifetime_s = now - processes[self.root].start_ticks / self.table.ticks_per_s
            self.rate = cpu_s / lifetime_s if lifetime_s > 0 else 0.0
        else:
            then, cpu_then = self._last
            elapsed = now - then
            if elapsed > 0:
                # A process that left the tree takes its time with it: never a negative rate.
                rate = max(0.0, cpu_s - cpu_then) / elapsed
                keep = math.exp(-elapsed / self.tau_s)
                self.rate = self.rate * keep + rate * (1.0 - keep)
        self._last = (now, cpu_s)
        return self.rate


def own_share(rate: float, load: float, cpus: int) -> float:
    """Our part of ``load`` given our averaged CPU rate: the rate itself while the load fits in
    the CPUs; beyond them the CPUs are taken as saturated and the runnable threads share them
    fairly, so our part of the load is our part of the CPU time (``rate / cpus``). A
    neighbour's busy threads take CPU time from us, so they lower ``rate`` and stay foreign;
    our own surplus threads (more than CPUs) stay ours."""
    return rate * max(1.0, load / cpus)


_ESTIMATOR: Optional[OwnLoad] = None
_UNAVAILABLE = False


def own_load(load: Optional[float], cpus: Optional[int] = None) -> Optional[float]:
    """This process family's share of the load average ``load``, or None where /proc does not
    exist (macOS: ``busy_load`` then applies the old rule) or the root is gone.

    Call it each time a measurement checks the load: every call updates the average.
    """
    global _ESTIMATOR, _UNAVAILABLE
    if load is None or _UNAVAILABLE:
        return None
    if _ESTIMATOR is None:
        if not LinuxProcessTable.available():
            _UNAVAILABLE = True
            return None
        table = LinuxProcessTable()
        _ESTIMATOR = OwnLoad(table, family_root(table.processes(), os.environ))
    rate = _ESTIMATOR.sample()
    if rate is None:
        return None
    return own_share(rate, load, cpus or os.cpu_count() or 1)


def family_root_env() -> dict[str, str]:
    """What a launcher puts in a worker's or rank's environment so that it counts the same
    family as the process that started it."""
    if not LinuxProcessTable.available():
        return {}
    return {FAMILY_ROOT_ENV: str(family_root(LinuxProcessTable().processes(), os.environ))}
