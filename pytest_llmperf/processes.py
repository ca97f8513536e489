"""Several fresh processes per run (``--llmperf-processes=N``), and what their records add up to.

Why: on a shared host the noise of a benchmark lives between processes, not inside one (a tiny
BLOOM: CV 1-2 % within a process, process medians scattered 3-4 %, adjacent processes not
correlated). Re-measuring in the same process cannot average that away; more processes can, as
pyperf does with its worker processes. So the pytest process that owns the session first runs
the selected tests N-1 more times in fresh child pytest processes, one at a time (they must not
compete with each other), and then its own session; each workload is judged on the N process
medians (``combine``) against the stored runs' medians (``verdict``'s two-sample rule).

A child is the same command line with what must happen once taken out: the report, JUnit XML,
``--benchmark-json`` and xdist's ``-n`` (``child_args``). What it must not do it learns from
its environment (``CHILD_ENV``): gating off, never updating baselines, never spawning children,
its results to a directory of ours (``REPORT_ENV``). The parent reads the records back from the
child's results.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import noise
from .results import MetricValue, Record
from .settings import PROCESS_ENV as CHILD_ENV
from .settings import PROCESS_REPORT_ENV as REPORT_ENV

#: Environment variables a child must not inherit: it must not spawn children or store runs,
#: and its summary is not the job's (the parent writes the one $GITHUB_STEP_SUMMARY gets).
DROPPED_ENV = (
    "LLMPERF_PROCESSES",
    "LLMPERF_UPDATE_BASELINES",
    "LLMPERF_RESET_BASELINES",
    "GITHUB_STEP_SUMMARY",
)

#: Options of the command line that must happen once, in the parent: name -> takes a value.
#: ``--opt=value`` and ``--opt value`` are both removed; short ``-n2``/``-n 2`` too.
ONCE_OPTIONS: dict[str, bool] = {
    "--llmperf-processes": True,
    "--llmperf-update-baselines": False,
    "--llmperf-reset-baselines": False,
    "--llmperf-report": True,
    "--junitxml": True,
    "--junit-xml": True,
    "--benchmark-json": True,
    "--benchmark-autosave": False,
    "--benchmark-save": True,
    "-n": True,
    "--numprocesses": True,
    "--maxprocesses": True,
    "--dist": True,
    "--tx": True,
}

#: How much output of a failed child is shown.
TAIL_CHARS = 3000


def child_args(args: Sequence[str], *, xdist: bool = False) -> list[str]:
    """The parent's pytest arguments without what must happen once (``ONCE_OPTIONS``).

    ``xdist``: pytest-xdist is loaded, so ``-n0`` is appended (an ``addopts = -n auto`` in the
    ini file would otherwise distribute the child).
    """
    out: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name, eq, _ = arg.partition("=")
        if name in ONCE_OPTIONS:
            skip_value = ONCE_OPTIONS[name] and not eq
            continue
        if arg.startswith("-n") and not arg.startswith("--") and len(arg) > 2:
            continue  # -n2, -nauto
        out.append(arg)
    if xdist:
        out.append("-n0")
    return out


@dataclass
class ChildRun:
    """What one child process did."""

    index: int  # 1-based among the children
    returncode: Optional[int]  # None: killed after the timeout
    wall_s: float
    records: list[Record] = field(default_factory=list)
    output_tail: str = ""
    #: Why the child's run is unusable (crash, hang, no results); None when it ran.
    problem: Optional[str] = None

    @property
    def failed(self) -> bool:
        return self.problem is not None


def describe_exit(code: Optional[int], timeout: Optional[float]) -> str:
    if code is None:
        return f"did not finish within {timeout:g} s and was killed"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    meaning = {
        2: "interrupted",
        3: "an internal error",
        4: "a usage error",
        5: "no tests collected",
    }.get(code, "")
    return f"exited with {code}" + (f" ({meaning})" if meaning else "")


def run_child(
    command: Sequence[str],
    *,
    index: int,
    total: int,
    cwd: Path,
    env: Mapping[str, str],
    timeout: Optional[float] = None,
    poll: Callable[[float], None] = lambda elapsed: None,
    clock: Callable[[], float] = time.monotonic,
) -> ChildRun:
    """Run one child pytest (``command``: the full argv) in its own session and read its records.

    The child writes results.json to a temporary directory named in its environment; its output
    (stdout and stderr together) goes to a file whose tail is kept for the message when it fails.
    Exit codes 0 and 1 (a test failed: its records still count) are a run; anything else, a
    signal, a timeout, or no results file is a ``problem``. A child that outlives ``timeout`` is
    killed with its whole process group, so none of its workers is left behind. ``poll`` is
    called about once a second with the elapsed time (progress).
    """
    with tempfile.TemporaryDirectory(prefix="llmperf-process-") as tmp:
        report = Path(tmp) / "report"
        out_path = Path(tmp) / "output.txt"
        child_env = {k: v for k, v in env.items() if k not in DROPPED_ENV}
        # The child's load counts this process's family as its own, also through a wrapper
        # script that starts python without exec (``llmperf ab``).
        child_env.update(noise.family_root_env())
        child_env[CHILD_ENV] = f"{index}/{total}"
        child_env[REPORT_ENV] = str(report)
        start = clock()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                list(command),
                cwd=str(cwd),
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            code: Optional[int] = None
            try:
                while True:
                    try:
                        code = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        elapsed = clock() - start
                        if timeout is not None and elapsed > timeout:
                            _kill_group(proc)
                            code = None
                            break
                        poll(elapsed)
            except BaseException:
                _kill_group(proc)  # Ctrl-C in the parent: leave no child behind
                raise
        wall = clock() - start
        tail = out_path.read_text(encoding="utf-8", errors="replace")[-TAIL_CHARS:]
        run = ChildRun(index=index, returncode=code, wall_s=wall, output_tail=tail)
        if code not in (0, 1):
            run.problem = describe_exit(code, timeout)
            return run
        results = report / "results.json"
        if not results.is_file():
            run.problem = f"{describe_exit(code, timeout)} without writing results"
            return run
        try:
            from .report import ResultsError, load_results

            run.records = [Record.from_json(row["record"]) for row in load_results(results)]
        except (ResultsError, KeyError, TypeError, ValueError) as exc:
            run.problem = f"wrote unreadable results: {exc}"
        return run


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def child_command(args: Sequence[str], *, xdist: bool) -> list[str]:
    return [sys.executable, "-m", "pytest", *child_args(args, xdist=xdist)]


def record_id(record: Record) -> tuple[str, str, str]:
    """What identifies one workload across processes: its baseline file and key."""
    return (record.device_key, record.suite, record.key)


@dataclass
class ProcessPool:
    """The children's records of this run, by workload, and the parent's own ones as they come.

    ``total`` is N (the parent included). The parent's own original records are kept too, so a
    baseline update can store N runs instead of their combination.
    """

    total: int
    children: list[ChildRun] = field(default_factory=list)
    own: dict[tuple[str, str, str], Record] = field(default_factory=dict)

    def add(self, run: ChildRun) -> None:
        self.children.append(run)

    def of(self, record: Record) -> list[Record]:
        """The children's records of ``record``'s workload, in process order."""
        rid = record_id(record)
        return [r for run in self.children for r in run.records if record_id(r) == rid]

    def runs_of(self, record: Record) -> list[Record]:
        """Every process's record of this workload: the children's, then the parent's own."""
        own = self.own.get(record_id(record))
        return self.of(record) + ([own] if own is not None else [])

    def gated_comparisons(self) -> int:
        """How many gated metric comparisons one process of this run makes (the most any child
        made): the count the family-wise correction divides the run's alpha by."""
        counts = [sum(len(r.gated) for r in run.records if r.ok) for run in self.children]
        return max(counts, default=0)

    def combine(self, record: Record) -> Record:
        """``record`` (the parent's) with the children's records of the same workload folded in.

        Each metric's value becomes the median of the process medians, ``processes`` holds them
        (the parent's last) and ``samples`` all rounds of all processes in process order. Records
        of another outcome are left out and said in the note (an ``oom`` in some processes but
        not others, a crash). ``record`` is remembered as the parent's own run.
        """
        self.own[record_id(record)] = record
        others = self.of(record)
        if record.outcome != "ok":
            return record
        usable = [r for r in others if r.ok] + [record]
        notes = []
        left_out = [r for r in others if not r.ok]
        if left_out:
            outcomes = ", ".join(sorted({r.outcome for r in left_out}))
            notes.append(f"{len(left_out)} process(es) left out ({outcomes})")
        missing = self.total - len(others) - 1
        if missing > 0:
            notes.append(f"{missing} process(es) did not run this workload")
        digests = {r.output_digest for r in usable if r.output_digest}
        if len(digests) > 1:
            notes.append(f"greedy output differs between processes ({len(digests)} digests)")
        combined = Record.from_json(record.to_json())
        combined.metrics = {
            name: _combined_metric(name, [r.metrics.get(name) for r in usable])
            for name in record.metrics
        }
        combined.processes = len(usable)
        combined.busy_load = max(
            (r.busy_load for r in usable if r.busy_load is not None), default=None
        )
        combined.device_users = sorted({u for r in usable for u in r.device_users})
        scatters = [r.scatter for r in usable if r.scatter is not None]
        combined.scatter = max(scatters) if scatters else None
        head = f"median of {len(usable)} processes"
        combined.note = "; ".join(n for n in (head, *notes, record.note) if n)
        return combined

    def stored_records(self, combined: Iterable[Record]) -> list[Record]:
        """What a baseline update stores for these combined records: each process's own record
        (N runs, as ``llmperf baselines record --runs N``), children first."""
        out: list[Record] = []
        for record in combined:
            runs = self.runs_of(record)
            if runs and record.change:
                # A change the N processes established starts a new history with them.
                runs = [dataclasses.replace(runs[0], change=record.change), *runs[1:]]
            out += runs if runs else [record]
        return out


def _combined_metric(name: str, values: list[Optional[MetricValue]]) -> MetricValue:
    present = [v for v in values if v is not None and v.value is not None]
    if not present:
        return MetricValue(name, None)
    medians = [float(v.value) for v in present if v.value is not None]
    samples = [s for v in present for s in v.samples]
    return MetricValue(name, statistics.median(medians), samples, processes=medians)
