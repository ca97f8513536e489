"""In a child Python process (``python -m pytest_llmperf.worker``): crash isolation.

A DeepSpeed or bitsandbytes kernel that segfaults, a ``sys.exit`` deep in a library, a hang,
or — on a CPU host — the kernel's OOM killer takes the child, not the pytest session: the
workload becomes an ``error`` record (or ``oom`` when the cgroup's OOM-kill count went up) with
the exit code or signal and the tail of the child's stderr, and the next test runs.

One worker is kept for the next workload of the same model, dtype and engine (like the inline
model cache; a different model replaces it, so two models are never resident). A spec with
``fresh="workload"`` gets a new process, ``fresh="round"`` one per round (cold numbers).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Callable, ClassVar, Optional

from ..backends.base import Backend
from ..errors import SkipWorkload, UsageError
from ..progress import ChildProgress, Progress, ProgressFn
from ..results import MetricValue, Record
from ..spec import RecordContext, WorkloadSpec
from . import LaunchSettings
from .base import Launcher, error_record, exit_reason, kill_group, request


class WorkerFailed(Exception):
    """The child died, hung or answered nonsense; the message says which, for the record."""

    def __init__(self, why: str, oom: bool = False) -> None:
        super().__init__(why)
        self.oom = oom


def oom_kills() -> Optional[int]:
    """The ``oom_kill`` count of this process's cgroup (v2), or None where unreadable.

    On a CPU host an out-of-memory is a SIGKILL from the kernel, not an exception; this count
    going up while a child died of SIGKILL is how it is told apart from any other kill.
    """
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            line = next((x for x in f if x.startswith("0::")), None)
        if line is None:
            return None
        events = Path("/sys/fs/cgroup") / line.strip()[3:].lstrip("/") / "memory.events"
        for entry in events.read_text(encoding="utf-8").splitlines():
            name, _, value = entry.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class Worker:
    """One child process and the line protocol to it."""

    def __init__(self, settings: LaunchSettings) -> None:
        # Lives as long as the worker; closed in stop().
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [settings.python, "-m", "pytest_llmperf.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,  # its whole process group can be killed on a timeout
            env=settings.child_env(),
        )
        self._buffer = b""

    def request(
        self,
        message: dict[str, Any],
        timeout: float,
        progress: Optional[ProgressFn] = None,
        first: Optional[Progress] = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply. Lines ``{"progress": {...}}`` before it are
        the child's progress events (worker.py), handed to ``progress`` with the child's pid;
        anything else is the reply, or what the child did instead of replying."""
        assert self.proc.stdin is not None
        before = oom_kills()
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died before reading: the read below reports how
        watch = ChildProgress(progress, self.proc.pid, first=first) if progress else None
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(deadline, watch)
            if line is None:
                self.kill()
                raise WorkerFailed(f"timed out after {timeout:g} s (--llmperf-timeout)")
            if not line:
                code = self.proc.wait()
                after = oom_kills()
                oom = code == -signal.SIGKILL and None not in (before, after) and after > before  # type: ignore[operator]
                why = "killed by the kernel's OOM killer" if oom else exit_reason(code)
                raise WorkerFailed(f"worker {why}", oom=oom)
            try:
                reply = json.loads(line)
            except ValueError:
                self.kill()
                raise WorkerFailed(
                    f"worker answered something other than JSON: {line[:200]!r}"
                ) from None
            if not isinstance(reply, dict):
                raise WorkerFailed(f"worker answered {type(reply).__name__}, not an object")
            if set(reply) != {"progress"}:
                return reply
            if watch is not None:
                watch.receive(reply["progress"])

    def _readline(self, deadline: float, watch: Optional[ChildProgress] = None) -> Optional[bytes]:
        """One line from the child; b"" at end of file, None when ``deadline`` (monotonic)
        passed first. While it waits, ``watch`` ticks (the line shows the child is alive)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = left if watch is None else min(left, max(0.05, watch.seconds_to_tick()))
                if not sel.select(wait):
                    if watch is not None:
                        watch.tick()
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return b""
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def stderr_tail(self, lines: int = 15) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        kill_group(self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.stderr.close()


class ProcessLauncher(Launcher):
    name: ClassVar[str] = "process"

    def __init__(self, settings: LaunchSettings) -> None:
        self.settings = settings
        self._worker: Optional[Worker] = None
        self._key: Optional[tuple] = None

    def run(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        *,
        progress: Optional[ProgressFn] = None,
        first: Optional[Progress] = None,
    ) -> Record:
        if spec.fresh == "round":
            return self._per_round(spec, context, backend, progress)
        key = (backend.name, spec.model, spec.dtype, spec.engine, spec.engine_options, spec.seed)
        if spec.fresh == "workload" or key != self._key:
            self.close()
        try:
            return self._request(spec, context, backend, key, progress, first)
        finally:
            if spec.fresh == "workload":
                self.close()

    def _request(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        key: tuple,
        progress: Optional[ProgressFn] = None,
        first: Optional[Progress] = None,
    ) -> Record:
        if self._worker is None:
            self._worker, self._key = Worker(self.settings), key
        worker = self._worker
        try:
            message = request(spec, context, backend)
            reply = worker.request(message, self.settings.timeout, progress, first)
        except WorkerFailed as exc:
            record = error_record(spec, context, backend, with_tail(str(exc), worker.stderr_tail()))
            if exc.oom:
                record.outcome = "oom"
            self.close()
            return record
        return from_reply(reply, spec, context, backend, worker.stderr_tail)

    def _per_round(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        progress: Optional[ProgressFn] = None,
    ) -> Record:
        one = replace(spec, rounds=1, fresh="workload")
        records = [
            self.run(
                one,
                context,
                backend,
                progress=_round_of(progress, index, spec.rounds),
                first=Progress("rounds", index, spec.rounds),
            )
            for index in range(spec.rounds)
        ]
        failed = next((r for r in records if r.outcome != "ok"), None)
        return failed if failed is not None else merge_rounds(records)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
        self._worker = self._key = None


def _round_of(progress: Optional[ProgressFn], index: int, total: int) -> Optional[ProgressFn]:
    """Progress of round ``index`` in its own process, counted among all ``total`` rounds
    (the child itself runs one round of one)."""
    if progress is None:
        return None

    def report(event: Progress) -> None:
        if event.phase == "rounds":
            event = replace(event, done=index + event.done, total=total)
        progress(event)

    return report


def with_tail(why: str, tail: str) -> str:
    return f"{why}; stderr tail:\n{tail}" if tail else f"{why} (nothing on stderr)"


def from_reply(
    reply: dict[str, Any],
    spec: WorkloadSpec,
    context: RecordContext,
    backend: Backend,
    tail: Callable[[], str],
) -> Record:
    """The record a worker's reply describes; usage errors and skips raised as here."""
    if "usage" in reply:
        raise UsageError(str(reply["usage"]))
    if "skip" in reply:
        raise SkipWorkload(str(reply["skip"]))
    if "record" in reply:
        try:
            return Record.from_json(reply["record"])
        except (KeyError, TypeError, ValueError) as exc:
            why = f"worker sent a malformed record ({exc})"
            return error_record(spec, context, backend, with_tail(why, tail()))
    why = str(reply.get("error") or f"worker sent an unknown reply {sorted(reply)}")
    trace = str(reply.get("traceback") or "").strip().splitlines()
    return error_record(
        spec,
        context,
        backend,
        "in the worker: " + why + ("; traceback tail:\n" + "\n".join(trace[-8:]) if trace else ""),
    )


def merge_rounds(records: list[Record]) -> Record:
    """One record from one-round records, each measured in its own process (cold numbers)."""
    first = records[0]
    merged = replace(first, metrics={}, workload=dict(first.workload))
    for name in first.metrics:
        values: list[float] = []
        for r in records:
            m = r.metrics.get(name)
            if m is not None:
                values += m.samples or ([m.value] if m.value is not None else [])
        merged.metrics[name] = MetricValue(
            name, statistics.median(values) if values else None, list(values)
        )
    merged.workload["rounds"] = len(records)
    merged.workload["fresh"] = "round"
    # Sentence by sentence, in order: every round says how the engine ran, once is enough.
    notes = dict.fromkeys(part for r in records for part in r.note.split("; ") if part)
    merged.note = "; ".join(["each round measured in a fresh process", *notes])
    return merged
