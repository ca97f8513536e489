"""The "machine busy" sign counts only load that is not ours (noise.own_load).

Our own processes (xdist workers, the children of --llmperf-processes, launcher workers) raise
the load average too, and it remembers them for a minute; counting them as a neighbour would
switch the gate off for every multi-process run. These tests drive the estimate with a fake
process table and a fake clock: no real /proc, no real load.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import pytest
from fakes import FakeBackend

from pytest_llmperf import noise
from pytest_llmperf.execute import fill_timing
from pytest_llmperf.launchers import LaunchSettings
from pytest_llmperf.measure import Timing
from pytest_llmperf.noise import (
    OwnLoad,
    ProcStat,
    busy_load,
    family_cpu_ticks,
    family_root,
    own_share,
    parse_stat,
)
from pytest_llmperf.results import Record
from pytest_llmperf.settings import FAMILY_ROOT_ENV, PROCESS_ENV, RECORD_RUN_ENV

TICKS = 100.0


class FakeTable:
    """Processes whose CPU time grows only when a test says they ran (``run``)."""

    ticks_per_s = TICKS

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s
        self.procs: dict[int, ProcStat] = {}

    def spawn(self, pid: int, ppid: int, *, age_s: float = 0.0, cpu_s: float = 0.0) -> None:
        """A process started ``age_s`` ago that has used ``cpu_s`` so far."""
        self.procs[pid] = ProcStat(
            pid, ppid, round(cpu_s * TICKS), round((self.now_s - age_s) * TICKS)
        )

    def run(self, seconds: float, cpus_by_pid: dict[int, float]) -> None:
        """``seconds`` pass; each listed process uses that many CPUs meanwhile."""
        self.now_s += seconds
        for pid, cpus in cpus_by_pid.items():
            p = self.procs[pid]
            self.procs[pid] = ProcStat(
                pid, p.ppid, p.cpu_ticks + round(cpus * seconds * TICKS), p.start_ticks
            )

    def reap(self, pid: int) -> None:
        """The parent waits for ``pid``: its time moves into the parent's cutime/cstime."""
        child = self.procs.pop(pid)
        p = self.procs[child.ppid]
        self.procs[child.ppid] = ProcStat(
            p.pid, p.ppid, p.cpu_ticks + child.cpu_ticks, p.start_ticks
        )

    def processes(self) -> dict[int, ProcStat]:
        return dict(self.procs)

    def uptime_s(self) -> float:
        return self.now_s


def judge(
    table: FakeTable, load: float, cpus: int, *, pid: int, ppid: int, env: dict[str, str]
) -> tuple[Optional[float], float]:
    """(busy_load as the record gets it, our share of the load), as one measurement sees it."""
    estimate = OwnLoad(table, family_root(table.procs, env, pid=pid, ppid=ppid))
    rate = estimate.sample()
    assert rate is not None
    own = own_share(rate, load, cpus)
    return busy_load(load, own, cpus), own


def test_a_lone_process_using_two_cpus_is_not_busy_at_load_2_1():
    table = FakeTable()
    table.spawn(100, 1, age_s=120, cpu_s=240)  # two CPUs for two minutes
    busy, own = judge(table, 2.1, 4, pid=100, ppid=1, env={})
    assert own == pytest.approx(2.0)
    assert busy is None


def test_load_beyond_our_two_cpus_is_a_neighbour_and_flags_the_record():
    table = FakeTable()
    table.spawn(100, 1, age_s=120, cpu_s=240)
    busy, own = judge(table, 4.5, 4, pid=100, ppid=1, env={})
    # 4.5 runnable on 4 CPUs: our 2 CPUs are 1/2 of the CPU time, so 2.25 of the load.
    assert own == pytest.approx(2.25)
    assert busy == 4.5


def test_an_xdist_family_of_two_workers_is_not_busy_at_load_4():
    table = FakeTable()
    table.spawn(10, 1, age_s=200, cpu_s=2)  # the controller, idle
    table.spawn(11, 10, age_s=180, cpu_s=360)  # gw0: two CPUs
    table.spawn(12, 10, age_s=180, cpu_s=360)  # gw1: two CPUs
    table.spawn(99, 1, age_s=500, cpu_s=50)  # someone else's process: not ours
    busy, own = judge(table, 4.0, 4, pid=11, ppid=10, env={"PYTEST_XDIST_WORKER": "gw0"})
    assert own == pytest.approx((2 + 360 + 360) / 200)
    assert busy is None
    # Counting the worker alone, its sibling's load would look like a neighbour's job.
    alone = OwnLoad(table, 11).sample()
    assert busy_load(4.0, own_share(alone or 0.0, 4.0, 4), 4) == 4.0


def test_oversubscribed_by_our_own_threads_is_not_busy_but_a_neighbour_still_is():
    """Two xdist workers with two torch threads each on 2 CPUs: 4 runnable threads, 2 CPUs of
    time. The old rule (load > 1.25 x CPUs + 0.5 = 3) flagged it; the CPU time shares out the
    excess. Two busy loops of a neighbour take CPU time from us and stay foreign."""
    table = FakeTable()
    table.spawn(10, 1, age_s=100)
    table.spawn(11, 10, age_s=100, cpu_s=100)
    table.spawn(12, 10, age_s=100, cpu_s=100)
    quiet, own = judge(table, 4.0, 2, pid=11, ppid=10, env={"PYTEST_XDIST_WORKER": "gw0"})
    assert own == pytest.approx(4.0)
    assert quiet is None
    assert busy_load(4.0, None, 2) == 4.0  # the old rule

    table = FakeTable()
    table.spawn(10, 1, age_s=100)
    # 6 runnable threads share 2 CPUs: our 4 get 4/6 of them.
    table.spawn(11, 10, age_s=100, cpu_s=100 * 2 / 3)
    table.spawn(12, 10, age_s=100, cpu_s=100 * 2 / 3)
    busy, own = judge(table, 6.0, 2, pid=11, ppid=10, env={"PYTEST_XDIST_WORKER": "gw0"})
    assert own == pytest.approx(4.0, rel=1e-3)
    assert busy == 6.0


def test_a_childs_reaped_sibling_counts_as_ours():
    table = FakeTable()
    table.spawn(10, 1, cpu_s=3)  # the pytest process that orchestrates
    table.run(3, {})  # three seconds of imports and collection
    table.spawn(20, 10)  # child 1/3: both CPUs for 95 s
    table.run(95, {20: 1.9})
    table.reap(20)
    table.spawn(21, 10)  # child 2/3, started right after, still importing
    table.run(2, {21: 0.8})
    family_s = 3 + 95 * 1.9 + 2 * 0.8
    assert family_cpu_ticks(table.procs, 10) == round(family_s * TICKS)

    busy, own = judge(table, 2.0, 2, pid=21, ppid=10, env={PROCESS_ENV: "2/3"})
    assert own == pytest.approx(family_s / 100)
    assert busy is None
    # Counted alone, the child would take its sibling's minute of load for a neighbour's.
    alone = OwnLoad(table, 21).sample() or 0.0
    assert alone == pytest.approx(0.8)
    assert busy_load(2.0, own_share(alone, 2.0, 2), 2) == 2.0


def test_the_estimate_follows_the_load_average_time_constant():
    """Seeded with the lifetime mean, then an exponential average with the kernel's 60 s."""
    table = FakeTable()
    table.spawn(10, 1, age_s=100, cpu_s=200)
    estimate = OwnLoad(table, 10)
    assert estimate.sample() == pytest.approx(2.0)
    table.run(60, {10: 0.0})
    assert estimate.sample() == pytest.approx(2.0 / math.e)
    table.run(240, {10: 0.0})
    rate = estimate.sample() or 0.0
    assert rate == pytest.approx(2.0 * math.exp(-5))
    # Five idle minutes later a load of 4 on 4 CPUs is somebody else's.
    assert busy_load(4.0, own_share(rate, 4.0, 4), 4) == 4.0


def test_a_process_leaving_the_family_is_no_negative_load():
    table = FakeTable()
    table.spawn(10, 1, age_s=10, cpu_s=10)
    table.spawn(11, 10, age_s=10, cpu_s=10)
    estimate = OwnLoad(table, 10)
    assert estimate.sample() == pytest.approx(2.0)
    table.procs[11] = ProcStat(11, 1, table.procs[11].cpu_ticks, 0)  # re-parented to init
    table.run(60, {10: 0.0})
    assert estimate.sample() == pytest.approx(2.0 / math.e)


def test_the_root_gone_leaves_no_estimate():
    table = FakeTable()
    table.spawn(10, 1, age_s=10, cpu_s=10)
    estimate = OwnLoad(table, 10)
    del table.procs[10]
    assert estimate.sample() is None


def test_a_stat_line_whose_command_has_spaces_and_parentheses():
    fields = ["S", "4321"] + ["0"] * 9 + ["150", "50", "30", "20"] + ["0"] * 4 + ["98765"]
    fields += ["0"] * 30
    stat = parse_stat("1234 (py (worker) :) x) " + " ".join(fields) + "\n")
    assert stat == ProcStat(pid=1234, ppid=4321, cpu_ticks=250, start_ticks=98765)


@pytest.mark.parametrize("line", ["", "1234 python S 1", "12 (x) S 1 2 3"])
def test_a_malformed_stat_line_is_an_error_naming_the_file(line):
    with pytest.raises(ValueError, match="/proc stat line"):
        parse_stat(line)


@pytest.mark.skipif(not noise.LinuxProcessTable.available(), reason="no /proc here")
def test_this_process_reads_itself_from_proc():
    table = noise.LinuxProcessTable()
    me = table.processes()[os.getpid()]
    assert me.ppid == os.getppid()
    assert me.start_ticks / table.ticks_per_s <= table.uptime_s()


def test_the_family_root():
    table = FakeTable()
    table.spawn(10, 1)
    table.spawn(11, 10)
    table.spawn(12, 11)  # a launcher's worker of xdist worker 11
    assert family_root(table.procs, {}, pid=12, ppid=11) == 12
    assert family_root(table.procs, {PROCESS_ENV: "1/4"}, pid=11, ppid=10) == 10
    assert family_root(table.procs, {"PYTEST_XDIST_WORKER": "gw1"}, pid=11, ppid=10) == 10
    assert family_root(table.procs, {RECORD_RUN_ENV: "2/5"}, pid=11, ppid=10) == 10
    named = {"PYTEST_XDIST_WORKER": "gw1", FAMILY_ROOT_ENV: "10"}
    assert family_root(table.procs, named, pid=12, ppid=11) == 10
    # A stale export naming no ancestor is ignored.
    stale = {FAMILY_ROOT_ENV: "99"}
    assert family_root(table.procs, stale, pid=12, ppid=11) == 12


@pytest.mark.skipif(not noise.LinuxProcessTable.available(), reason="no /proc here")
def test_a_launchers_worker_is_told_our_family(monkeypatch):
    monkeypatch.delenv(FAMILY_ROOT_ENV, raising=False)
    monkeypatch.delenv(PROCESS_ENV, raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert LaunchSettings().child_env()[FAMILY_ROOT_ENV] == str(os.getpid())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert LaunchSettings().child_env()[FAMILY_ROOT_ENV] == str(os.getppid())


def test_without_proc_the_old_rule_applies(monkeypatch):
    monkeypatch.setattr(noise, "_ESTIMATOR", None)
    monkeypatch.setattr(noise, "_UNAVAILABLE", False)
    monkeypatch.setattr(noise.LinuxProcessTable, "available", staticmethod(lambda root=None: False))
    assert noise.own_load(3.1, 2) is None
    assert noise.family_root_env() == {}
    # load > 1.25 x 2 CPUs + 0.5
    assert busy_load(3.1, None, 2) == 3.1
    assert busy_load(2.9, None, 2) is None
    assert noise.busy_note(3.1, None, 2) == (
        "machine busy: load average 3.1 on 2 CPUs, during the rounds"
    )


class PinnedLoad(FakeBackend):
    """A host whose load average and process table a test sets."""

    def __init__(self, load: float, estimate: OwnLoad) -> None:
        super().__init__()
        self.load = load
        self.estimate = estimate

    def host_load(self) -> Optional[float]:
        return self.load

    def own_load(self, load: Optional[float]) -> Optional[float]:
        rate = self.estimate.sample()
        return None if rate is None or load is None else own_share(rate, load, 2)


def _record_after_rounds(backend: PinnedLoad, monkeypatch: pytest.MonkeyPatch) -> Record:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    record = Record(key="k", suite="s", backend="fake", device_key="fake-chip", outcome="ok")
    fill_timing(record, Timing(warmup_s=0.1, e2e=[1.0, 1.0, 1.0]), backend, tokens=None)
    return record


def test_a_busy_record_says_how_much_of_the_load_was_ours(monkeypatch):
    table = FakeTable()
    table.spawn(10, 1, age_s=100, cpu_s=30)
    record = _record_after_rounds(PinnedLoad(2.0, OwnLoad(table, 10)), monkeypatch)
    assert record.busy_load == 2.0
    assert record.contended
    assert "machine busy: load average 2.0 on 2 CPUs, 0.3 of it ours" in record.note


def test_a_load_that_is_all_ours_leaves_the_record_clean(monkeypatch):
    table = FakeTable()
    table.spawn(10, 1, age_s=100, cpu_s=200)
    record = _record_after_rounds(PinnedLoad(2.1, OwnLoad(table, 10)), monkeypatch)
    assert record.busy_load is None
    assert "machine busy" not in record.note
