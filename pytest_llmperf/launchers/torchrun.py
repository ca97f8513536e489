"""Several devices: one rank per device through ``torch.distributed.run`` (torchrun).

Every rank executes the same spec; device syncs are followed by a barrier, so the clocks rank
0 reads mark the slowest rank's progress, and rank 0 returns the record. The ranks load the
same weights: a seeded model is written once as a checkpoint under ``--llmperf-cache-dir``
(atomically; its seed stays the weight source, so outputs digest as in one process), and
transformers shards it by the model's tensor-parallel plan.

A rank that crashes or hangs fails the workload with torchrun's exit code and the tail of the
group's output; a timeout kills the whole process group, so no rank outlives the test. On CPU
each rank is a "device" with cores ÷ ranks threads, over gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ..backends.base import Backend
from ..devicelock import unpinned_env
from ..errors import SkipWorkload
from ..execute import model_of
from ..progress import ChildProgress, ProgressFn
from ..results import Record
from ..roofline import Bandwidth
from ..spec import RecordContext, WorkloadSpec
from . import LaunchSettings
from .base import Launcher, error_record, exit_reason, kill_group, request
from .process import from_reply


class TorchrunLauncher(Launcher):
    """A rank group under torch's launcher; :class:`~.deepspeed.DeepSpeedLauncher` is the same
    group under DeepSpeed's, overriding only what differs (:meth:`unavailable`,
    :meth:`command`, :meth:`rank_env`, :meth:`first_failure`)."""

    name: ClassVar[str] = "torchrun"

    def __init__(self, settings: LaunchSettings) -> None:
        self.settings = settings

    def unavailable(self) -> Optional[str]:
        """Why this launcher cannot start a group here (a skip), or None."""
        if importlib.util.find_spec("torch.distributed.run") is None:
            return "torchrun unavailable: torch.distributed.run cannot be imported"
        return None

    def command(self, ranks: int, backend: Backend, worker: list[str]) -> list[str]:
        """The command line that starts ``ranks`` ranks, each running ``worker`` (the
        arguments after ``python -m``)."""
        return [
            self.settings.python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            *worker,
        ]

    def rank_env(self, ranks: int, backend: Backend) -> dict[str, str]:
        """The ranks' environment: the children's, with all the node's devices visible (also
        from an xdist worker pinned to one), the cores shared out, and what the backend's
        collectives need (:data:`RANK_DEFAULTS`) unless the user set it."""
        env = {
            **unpinned_env(self.settings.child_env()),
            "OMP_NUM_THREADS": str(max(1, _cpus() // ranks)),
        }
        for key, value in RANK_DEFAULTS.get(backend.torch_device, {}).items():
            env.setdefault(key, value)
        return env

    def first_failure(self, log: Path) -> str:
        """What the launcher's log says about the rank that failed first (" (...)"), or ""."""
        return _failed_rank(log)

    def tail(self, log: Path) -> str:
        """The end of the group's output, for an error record's note."""
        return _tail(log)

    def run(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        *,
        progress: Optional[ProgressFn] = None,
    ) -> Record:
        reason = self.unavailable()
        if reason:
            raise SkipWorkload(reason)
        spec = self._with_weights(spec)
        with tempfile.TemporaryDirectory(prefix="llmperf-ranks-") as tmp:
            message, out, log = (
                Path(tmp) / "request.json",
                Path(tmp) / "reply.json",
                Path(tmp) / "log",
            )
            message.write_text(json.dumps(request(spec, context, backend)), encoding="utf-8")
            code = self._launch(spec.devices, backend, message, out, log, progress)
            tail = self.tail(log)
            if code is None:
                why = (
                    f"timed out after {self.settings.timeout:g} s (--llmperf-timeout); "
                    "the rank group was killed"
                )
                return error_record(spec, context, backend, f"{why}; output tail:\n{tail}")
            if code != 0 or not out.is_file():
                why = f"{self.name} {exit_reason(code)}" + self.first_failure(log)
                return error_record(spec, context, backend, f"{why}; output tail:\n{tail}")
            reply = json.loads(out.read_text(encoding="utf-8"))
        record = from_reply(reply, spec, context, backend, lambda: tail)
        # auto picks the rank launcher by engine: the record says which one ran.
        record.provenance["launcher"] = self.name
        return record

    def _with_weights(self, spec: WorkloadSpec) -> WorkloadSpec:
        """The spec with a checkpoint directory every rank loads (a seeded one written once)."""

        if spec.weights is not None or spec.options.get("checkpoint"):
            return spec
        model = model_of(spec)
        try:
            # Quantizing engines load a 16-bit checkpoint and quantize it themselves.
            stored = "fp16" if spec.dtype in ("int8", "int4") else spec.dtype
            directory, _ = self.settings.store().checkpoint(model, stored, spec.seed)
        except OSError as exc:
            raise SkipWorkload(str(exc)) from None
        return replace(spec, weights=str(directory))

    def _launch(
        self,
        ranks: int,
        backend: Backend,
        request: Path,
        out: Path,
        log: Path,
        progress: Optional[ProgressFn] = None,
    ) -> int | None:
        """The launcher's exit code, or None when the group ran past the timeout (then
        killed). With ``progress``, rank 0 appends its events to a file next to the reply,
        which is read while the group runs."""
        events = out.with_name("progress")
        worker = [
            "pytest_llmperf.worker",
            "--rank",
            f"--request={request}",
            f"--out={out}",
            *([f"--progress={events}"] if progress is not None else []),
        ]
        cmd = self.command(ranks, backend, worker)
        env = self.rank_env(ranks, backend)
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
            deadline = time.monotonic() + self.settings.timeout
            watch = ChildProgress(progress, proc.pid) if progress is not None else None
            read = 0
            while True:
                left = deadline - time.monotonic()
                try:
                    return proc.wait(timeout=max(0.0, min(left, POLL_S if watch else left)))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        kill_group(proc)
                        return None
                if watch is not None:
                    read = _forward(events, read, watch)
                    watch.tick()


#: What the ranks' collectives need on a backend, set unless the user set it: Gaudi's lazy
#: mode runs collectives only with PT_HPU_ENABLE_LAZY_COLLECTIVES (optimum-habana's
#: text-generation example sets both for every multi-card run, utils.setup_env).
RANK_DEFAULTS: dict[str, dict[str, str]] = {
    "hpu": {"PT_HPU_ENABLE_LAZY_COLLECTIVES": "true", "PT_HPU_LAZY_ACC_PAR_MODE": "0"},
}

#: How often the group's progress file is read while it runs (a few stat and read calls of
#: a small file: nothing next to the ranks' work).
POLL_S = 0.25


def _forward(events: Path, read: int, watch: ChildProgress) -> int:
    """Hand rank 0's events written since byte ``read`` to ``watch``; returns how far the
    complete lines reach. A line that is not an event is skipped: the reply decides the record."""
    try:
        with open(events, "rb") as f:
            f.seek(read)
            chunk = f.read()
    except OSError:
        return read
    complete, newline, _ = chunk.rpartition(b"\n")
    for line in complete.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            watch.receive(data.get("progress"))
    return read + len(complete) + len(newline)


def _tail(log: Path, lines: int = 20, skip: Callable[[str], bool] = lambda line: False) -> str:
    """The last ``lines`` lines of ``log`` that ``skip`` keeps out (a launcher's chatter)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in text if not skip(line)][-lines:])


def _failed_rank(log: Path) -> str:
    """torchrun's summary names the root-cause rank and its exit code (the other ranks are then
    terminated by torchrun and listed too): say it up front."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    _, found, root = text.partition("Root Cause")
    rank = code = None
    for line in (root if found else text).splitlines():
        line = line.strip()
        if line.startswith("rank") and ":" in line:
            rank = line.split(":", 1)[1].strip().split()[0]
        elif line.startswith("exitcode") and ":" in line and rank is not None:
            code = line.split(":", 1)[1].strip().split()[0]
            break
    return f" (first failure: rank {rank}, exit code {code})" if rank and code else ""


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- inside a rank ------------------------------------------------------------------------------


def init_rank(backend: Backend) -> int:
    """Join the group torchrun started; returns this rank. On CPU each rank gets its share of
    the cores, so two ranks on two cores do not fight over them."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if backend.torch_device == "cpu":
        torch.set_num_threads(max(1, _cpus() // world))
    else:
        backend.bind_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend.distributed_backend, rank=rank, world_size=world)
    return rank


class RankBackend(Backend):
    """A backend seen from one rank: a device sync is followed by a barrier of all ranks."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.torch_device = inner.torch_device  # type: ignore[misc]
        self.default_dtype = inner.default_dtype  # type: ignore[misc]
        self.dtypes = inner.dtypes  # type: ignore[misc]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def synchronize(self) -> None:
        import torch.distributed as dist

        self.inner.synchronize()
        if dist.is_initialized():
            dist.barrier()

    def clock(self) -> float:
        return self.inner.clock()

    def device_count(self) -> int:
        return self.inner.device_count()

    def host_load(self) -> float | None:
        return self.inner.host_load()

    def own_load(self, load: float | None) -> float | None:
        return self.inner.own_load(load)

    def reset_peak_memory(self) -> None:
        self.inner.reset_peak_memory()

    def peak_memory_bytes(self) -> int | None:
        return self.inner.peak_memory_bytes()

    def available_memory_bytes(self) -> int | None:
        return self.inner.available_memory_bytes()

    def memory_in_use_bytes(self) -> int | None:
        return self.inner.memory_in_use_bytes()

    def usable_memory_bytes(self) -> int | None:
        return self.inner.usable_memory_bytes()

    def memory_bandwidth(self) -> Bandwidth | None:
        return self.inner.memory_bandwidth()

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return self.inner.oom_errors()

    def free_memory(self) -> None:
        self.inner.free_memory()

    def prepare(self, model: Any) -> Any:
        return self.inner.prepare(model)

    def dtype_reason(self, dtype: str) -> str | None:
        return self.inner.dtype_reason(dtype)
