"""The launcher protocol: where a workload spec runs.

Same contract for every launcher: a spec and its record context in, a Record out. A workload
that cannot be right raises ``UsageError``, one that cannot run here ``SkipWorkload``; a crash
or a timeout in another process comes back as a record with ``outcome="error"`` and the
reason (exit code or signal, the tail of stderr) in its note, and the session goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any, ClassVar, Optional

from ..backends.base import Backend
from ..progress import ProgressFn
from ..results import Record
from ..spec import RecordContext, WorkloadSpec


class Launcher:
    name: ClassVar[str] = ""

    def run(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        *,
        progress: Optional[ProgressFn] = None,
    ) -> Record:
        """Measure ``spec``; ``progress`` hears where it stands (between rounds only), from
        whichever process runs it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the launcher keeps between workloads (a worker, a cached model)."""


def request(spec: WorkloadSpec, context: RecordContext, backend: Backend) -> dict[str, Any]:
    """What a worker or a rank group is sent (``worker.handle`` reads it)."""
    return {"spec": spec.to_json(), "context": context.to_json(), "backend": backend.name}


def error_record(spec: WorkloadSpec, context: RecordContext, backend: Backend, why: str) -> Record:
    record = context.new_record(spec, backend.name)
    record.outcome = "error"
    record.note = why
    return record


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a child started with ``start_new_session=True`` and everything it started.

    Its descendants are listed before anything is killed: torchrun starts every rank in a
    session of its own, so killing torchrun's group alone would leave the ranks running,
    re-parented to init, holding their devices for ever.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(descendants, timeout=10)


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "a signal"
        return f"died with {name} (signal {-code})"
    if code == 0:
        return "exited (code 0) without replying"
    return f"exited with code {code}"
