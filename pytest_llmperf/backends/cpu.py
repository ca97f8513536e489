"""The host CPU: always available, measured with the process's own RSS."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import TYPE_CHECKING, ClassVar, Optional

from .base import Backend, Probe

if TYPE_CHECKING:
    from ..energy import EnergyMeter
    from ..roofline import Bandwidth

#: The host's copy bandwidth, measured once per process (see CpuBackend.memory_bandwidth).
_measured: Optional[Bandwidth] = None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class CpuBackend(Backend):
    name: ClassVar[str] = "cpu"
    torch_device: ClassVar[str] = "cpu"
    default_dtype: ClassVar[str] = "fp32"
    # Measured on a shared 2-vCPU VM (benchmarks/gate_quality.py, 24 processes): run medians
    # scatter with sigma ~3.7%, so 3% gave 17% false alarms per comparison; 8% with the
    # re-measurement confirmation gave 0.6%. Dedicated accelerators keep 3%.
    default_tolerance: ClassVar[float] = 0.08
    shared_memory: ClassVar[bool] = True
    env_vars: ClassVar[tuple[str, ...]] = (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "KMP_AFFINITY",
        "LD_PRELOAD",
        "ONEDNN_DEFAULT_FPMATH_MODE",
    )

    def __init__(self) -> None:
        self._rss_start: int | None = None
        self._peak_reset_ok = False

    def _probe_impl(self) -> Probe:
        # A multi-device workload on CPU runs one rank per core (torchrun over gloo), so the
        # usable cores are this backend's devices.
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return Probe(True, "", cores)

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def device_name(self) -> str:
        return cpu_model_name()

    def device_key(self) -> str:
        # Thread count is part of the key: the same CPU with 2 or 32 threads is another machine.
        return f"{super().device_key()}-{self.threads()}t"

    def device_info(self) -> dict:
        info = super().device_info()
        info["threads"] = self.threads()
        info["machine"] = platform.machine()
        return info

    def versions(self) -> dict[str, str]:
        return {"kernel": platform.release()}

    def memory_bandwidth(self) -> Bandwidth | None:
        """No datasheet knows a host's memory (channels, DIMMs, NUMA): measured, as a copy
        (``roofline.copy_bandwidth``, ~0.3 s), once per process. The run's provenance carries
        the figure to worker and rank processes, so every record of a run uses the same one
        and children never measure it again."""
        global _measured
        if _measured is None:
            from ..roofline import copy_bandwidth

            _measured = copy_bandwidth(device=self.device_name())
        return _measured

    #: The RAPL meter, made on first use (a sysfs scan) and kept for the process.
    _energy: Optional[EnergyMeter] = None

    def energy_meter(self) -> Optional[EnergyMeter]:
        """The CPU packages' RAPL counters (``energy.RaplMeter``); where they are unreadable
        (root-only since Linux 5.10, or no powercap in a VM) a meter that says why."""
        if self._energy is None:
            from ..energy import RaplMeter

            self._energy = RaplMeter()
        return self._energy

    def reset_peak_memory(self) -> None:
        """Start a fresh RSS high-water mark, so the peak is this workload's, not the process's.

        Linux resets VmHWM to the current RSS when "5" is written to /proc/self/clear_refs.
        Without that (other kernels, locked-down containers) no honest per-test peak exists
        and ``peak_memory_bytes`` reports None rather than the process-lifetime maximum.
        """
        self._rss_start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._peak_reset_ok = True
        except OSError:
            self._peak_reset_ok = False

    def peak_memory_bytes(self) -> int | None:
        if not self._peak_reset_ok or self._rss_start is None:
            return None
        hwm = _status_kib("VmHWM")
        if hwm is None:
            return None
        return max(0, hwm - self._rss_start) * 1024

    def available_memory_bytes(self) -> int | None:
        import psutil

        return int(psutil.virtual_memory().available)

    def memory_in_use_bytes(self) -> int | None:
        # VmData is what RLIMIT_DATA counts (the cap children run under); RSS elsewhere.
        kib = _status_kib("VmData") or _status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def limit_memory(self, limit: int | None, *, in_worker: bool = False) -> None:
        """In a worker child, a real cap: RLIMIT_DATA makes torch's allocator fail ("can't
        allocate memory", recorded as oom) where a full host would invoke the OOM killer."""
        if limit is None or not in_worker:
            super().limit_memory(limit, in_worker=in_worker)
            return
        import resource

        # The ranks of a group share the host: each gets its part.
        share = limit // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            share = min(share, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (share, hard))
        super().limit_memory(share, in_worker=in_worker)

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        import torch

        return (torch.OutOfMemoryError, MemoryError)

    def free_memory(self) -> None:
        super().free_memory()
        # glibc keeps freed model weights in its arenas; without a trim the next test's RSS
        # baseline starts high and the host looks fuller than it is to the OOM pre-check.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
