"""The backend protocol: what the measuring code needs from a piece of hardware.

A backend never decides anything; it answers questions (is the hardware here, how many
devices, how much memory) and performs the few device operations a honest timing loop needs
(synchronize before every clock read, reset and read the memory peak). Adding hardware means
one new module with a subclass of :class:`Backend`, registered by entry point.
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol

if TYPE_CHECKING:
    from ..energy import EnergyMeter
    from ..roofline import Bandwidth


class EventTimer(Protocol):
    """Device-side timestamps that cost no host-device round trip.

    ``record()`` enqueues a marker on the device's current stream and returns at once: the
    device stamps it when the work queued before it is done, so a per-token marker measures
    completion, not kernel launch, without stalling the host as a sync per token would.
    ``elapsed(a, b)`` is valid only after a ``synchronize()`` that follows both records.
    """

    def record(self) -> Any:
        """Enqueue one marker without waiting; its handle for :meth:`elapsed`."""
        ...

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds between two recorded markers (after a sync)."""
        ...


class TorchEventTimer:
    """An :class:`EventTimer` over torch's CUDA-style ``Event(enable_timing=True)`` class:
    ``torch.cuda.Event`` (ROCm builds too), ``torch.xpu.Event``, habana's ``torch.hpu.Event``
    (its ``record`` on the current stream also marks the lazy-mode step, so the marker follows
    the token's work). Their ``elapsed_time`` is in milliseconds.

    Not MPS: ``torch.mps.event.Event`` stamps a whole command buffer's completion on the host,
    so two tokens in one buffer get equal stamps and ``elapsed_time`` refuses them; MPS keeps
    sync-and-clock."""

    def __init__(self, event: Callable[..., Any]) -> None:
        self._event = event

    def record(self) -> Any:
        handle = self._event(enable_timing=True)
        handle.record()
        return handle

    def elapsed(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1000.0


@dataclass(frozen=True)
class Probe:
    available: bool
    reason: str = ""
    count: int = 0


def normalize_device_name(name: str) -> str:
    """Turn whatever a driver reports into a stable, path-safe device key component.

    Vendor strings carry trademark noise and clock speeds that differ between SKUs of the same
    silicon ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"); the key must be the same on every
    node of a pool and safe as a directory name.
    """
    text = re.sub(r"\((r|tm|c)\)", " ", name, flags=re.IGNORECASE)
    text = re.sub(r"@.*$", " ", text)
    text = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return text[:80] or "unknown"


class Backend:
    """Base class with conservative defaults; subclasses override what their hardware knows."""

    name: ClassVar[str] = ""
    torch_device: ClassVar[str] = "cpu"
    #: Environment variables that change performance; recorded in provenance, not in the key.
    env_vars: ClassVar[tuple[str, ...]] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    default_dtype: ClassVar[str] = "bf16"
    #: Allowed worsening when the user sets none (--llmperf-tolerance, ini, env, marker).
    default_tolerance: ClassVar[float] = 0.03
    #: torch.distributed backend of a rank group on this hardware.
    distributed_backend: ClassVar[str] = "gloo"
    #: The devices share one memory (CPU cores): what is free is free for all of them at once.
    shared_memory: ClassVar[bool] = False
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    #: The variable that hides all but some devices from the vendor stack (CUDA_VISIBLE_DEVICES,
    #: …): pytest-xdist workers are pinned through it and device locks are named by its
    #: entries (``devicelock``). "" where there is nothing to pin or lock (cpu, mps).
    visible_devices_env: ClassVar[str] = ""
    #: The only engines that run on this hardware (None: any engine whose ``unsupported`` says
    #: yes). Neuron runs compiled graphs through optimum-neuron only: another engine there would
    #: put the model on the host and report CPU numbers under the neuron device key.
    engines: ClassVar[Optional[tuple[str, ...]]] = None

    _probe: Probe | None = None

    # -- discovery -----------------------------------------------------------------------
    def probe(self) -> Probe:
        """Import the vendor stack for real and count devices; cached per process."""
        if self._probe is None:
            try:
                self._probe = self._probe_impl()
            except Exception as exc:  # a broken vendor install must skip, not crash collection
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self._probe = Probe(False, f"{type(exc).__name__}: {first}"[:200])
        return self._probe

    def _probe_impl(self) -> Probe:
        raise NotImplementedError

    def device_count(self) -> int:
        """The node's devices; in a pytest-xdist worker pinned to one (``devicelock``) the count
        before pinning, since a ``devices(n)`` workload's ranks get them all back."""
        from ..devicelock import unpinned_count

        pinned = unpinned_count(self, os.environ)
        return self.probe().count if pinned is None else pinned

    def node_device_count(self) -> Optional[int]:
        """Devices on the node, counted without initializing the vendor stack (device nodes),
        or None where that cannot be told: xdist pinning must happen before the stack starts."""
        return None

    def device_users(
        self, indices: Sequence[int], *, since_s: Optional[float] = None
    ) -> Optional[list[str]]:
        """Processes outside our process family active on devices ``indices`` (visible
        indices) since ``since_s`` (``time.time()``), as ``pid 4242 python (3.1 GiB)``; None
        where the hardware's tools cannot tell. A regression measured with any is
        inconclusive (``Record.device_users``)."""
        return None

    def device_name(self) -> str:
        return self.name

    def device_key(self) -> str:
        return f"{self.name}-{normalize_device_name(self.device_name())}"

    def device_info(self) -> dict[str, Any]:
        return {
            "key": self.device_key(),
            "backend": self.name,
            "name": self.device_name(),
            "count": self.device_count(),
        }

    def versions(self) -> dict[str, str]:
        """SDK and driver versions for provenance (library versions are collected elsewhere)."""
        return {}

    def environment(self) -> dict[str, str]:
        return {k: os.environ[k] for k in self.env_vars if k in os.environ}

    # -- timing --------------------------------------------------------------------------
    def host_load(self) -> float | None:
        """The host's 1-minute load average (None where unknown): a busy host slows even an
        accelerator's kernel launches. A method so a fake chip can pin it in tests."""
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return None

    def own_load(self, load: float | None) -> float | None:
        """Our own processes' part of ``load`` (``noise.own_load``; None where unknown, and
        then the old rule applies). A method so a fake chip can pin it in tests."""
        from ..noise import own_load

        return own_load(load)

    def clock(self) -> float:
        return time.perf_counter()

    def synchronize(self) -> None:
        """Block until queued device work is done; called before every clock read."""

    def event_timer(self) -> Optional[EventTimer]:
        """Device events for per-token stamps without a sync per token (measure.run_rounds);
        None where the hardware has none: the tokens are then stamped by sync and clock."""
        return None

    def energy_meter(self) -> Optional[EnergyMeter]:
        """The device's cumulative energy counter (``energy.EnergyMeter``), read once after
        the sync that opens a round and once after the one that closes it; None: no counter."""
        return None

    def bind_device(self, local_rank: int) -> None:
        """Make ``local_rank``'s device this process's default (one rank per device)."""

    # -- memory --------------------------------------------------------------------------
    def reset_peak_memory(self) -> None:
        pass

    def peak_memory_bytes(self) -> int | None:
        return None

    def available_memory_bytes(self) -> int | None:
        """Memory a new workload may still use on one device; None when unknown."""
        return None

    #: ``--llmperf-memory-limit``: bytes this process may use on one device (None: no cap).
    memory_limit: int | None = None

    def memory_in_use_bytes(self) -> int | None:
        """What this process holds on one device now (what counts against a memory cap)."""
        return None

    def usable_memory_bytes(self) -> int | None:
        """What a new workload may use: the free memory, and under a cap what the cap leaves.

        The memory check (execute) reads this, so a workload above the cap is recorded as
        ``oom`` without running, as one above the device's memory is.
        """
        avail = self.available_memory_bytes()
        if self.memory_limit is None:
            return avail
        left = max(0, self.memory_limit - (self.memory_in_use_bytes() or 0))
        return left if avail is None else min(avail, left)

    def limit_memory(self, limit: int | None, *, in_worker: bool = False) -> None:
        """Apply ``--llmperf-memory-limit`` to this process. The estimate always uses it; a
        backend whose allocator can be capped without harming the process enforces it too (a
        CPU host only in a worker child: capping the pytest process itself would turn any
        allocation of pytest's into a MemoryError)."""
        self.memory_limit = limit

    def memory_bandwidth(self) -> Bandwidth | None:
        """Peak memory bandwidth of one device (roofline_fraction's limit): the vendor's
        published figure for the device name this backend reports (``roofline.PEAKS``), None
        for hardware not in that table. Asked once per run (provenance), never while timing."""
        from ..roofline import published_peak

        return published_peak(self.device_name())

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        import torch

        return (torch.OutOfMemoryError,)

    def free_memory(self) -> None:
        gc.collect()

    # -- models --------------------------------------------------------------------------
    def prepare(self, model: Any) -> Any:
        """Hardware-specific wrapping (HPU graphs, Neuron compile); identity by default."""
        return model

    def dtype_reason(self, dtype: str) -> str | None:
        if dtype not in self.dtypes:
            return f"dtype {dtype!r} is not supported on {self.name}; supported: " + ", ".join(
                self.dtypes
            )
        return None


class TorchDeviceBackend(Backend):
    """Hardware that torch exposes as a ``torch.<namespace>`` module with the CUDA-style calls
    (``synchronize``, ``reset_peak_memory_stats``, ``max_memory_allocated``,
    ``get_device_name``, ``set_device``): CUDA/ROCm, Gaudi (habana_frameworks registers
    ``torch.hpu``) and Intel GPUs (``torch.xpu``). Subclasses add the probe and what differs."""

    #: The attribute of ``torch`` that holds the device calls.
    namespace: ClassVar[str] = ""

    def _ns(self) -> Any:
        import torch

        return getattr(torch, self.namespace)

    def device_name(self) -> str:
        return str(self._ns().get_device_name(0))

    def bind_device(self, local_rank: int) -> None:
        self._ns().set_device(local_rank)

    def synchronize(self) -> None:
        self._ns().synchronize()

    def event_timer(self) -> Optional[EventTimer]:
        """``torch.<namespace>.Event`` where the namespace has one (CUDA/ROCm, XPU, and HPU
        once habana_frameworks registers ``torch.hpu``); None for a namespace without."""
        event = getattr(self._ns(), "Event", None)
        return None if event is None else TorchEventTimer(event)

    def reset_peak_memory(self) -> None:
        self._ns().reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int | None:
        return int(self._ns().max_memory_allocated())


def installed_versions(*dists: str) -> dict[str, str]:
    """Versions of installed distributions, read from metadata without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def device_nodes(*patterns: str) -> list[str]:
    """Vendor device nodes in /dev, checked before importing a vendor stack.

    Importing torch and a vendor plugin costs seconds; a CPU-only CI box should learn "no
    such hardware" from the filesystem. The real import still decides when nodes exist.
    """
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted(n for n in names if any(re.fullmatch(p, n) for p in patterns))
