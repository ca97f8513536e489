"""Who else used the device while we measured: the accelerator's analogue of the busy host.

A device lock (devicelock.py) keeps other *llmperf* jobs off a device; anything else — a
notebook, a training job, an inference server — does not ask. So after the rounds the
backend lists the processes on the measured devices (``Backend.device_users``) and the
record keeps those that are not ours (``Record.device_users``): a regression measured with
any of them is inconclusive (gate.decide, through ``Record.contended``).

"Ours" is the process tree of whoever holds this workload's device locks (the pytest
process, or the xdist worker, that took them: its launcher worker, its ranks), else our
process family (``noise.family_root``). A sibling xdist worker pinned to another device is
not ours here: if it is *active* on our device, it competed with us.

"Active", not "present": a process that merely holds a context (a second CI job waiting on
our lock with its last model still resident, a notebook left open) costs us nothing, and
counting it would make every shared node inconclusive. On NVIDIA the driver samples each
process's SM, memory, encoder and decoder use (``nvmlDeviceGetProcessUtilization``, samples
since a timestamp): a process counts when any of its samples since the rounds began is above
zero. Where the GPU does not report per-process samples (MIG slices, some vGPU setups) every
foreign process with a context counts, and its description says that its activity is unknown.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

#: NVML's return codes (nvml.h): no samples since the timestamp; not on this part.
NVML_ERROR_NOT_FOUND = 6


def our_pids(environ: Optional[dict[str, str]] = None) -> Optional[set[int]]:
    """The pids that count as ours on a device (see the module doc); None where /proc
    cannot tell (then nobody is called foreign)."""
    from .devicelock import holder_pid
    from .noise import LinuxProcessTable, family_root

    env = dict(os.environ) if environ is None else environ
    if not LinuxProcessTable.available():
        return None
    table = LinuxProcessTable().processes()
    root = holder_pid(env) or family_root(table, env)
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out | {os.getpid()}


def process_name(pid: int, nvml_name: Optional[Callable[[int], Any]] = None) -> str:
    """A process's short name: NVML's (it sees other containers' processes), else /proc's."""
    name: Any = None
    if nvml_name is not None:
        try:
            name = nvml_name(pid)
        except Exception:
            name = None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if not name:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            name = "?"
    return os.path.basename(str(name)) or "?"


def _gib(size: Optional[int]) -> str:
    return "memory n/a" if size is None else f"{size / 2**30:.1f} GiB"


def nvml_device_users(
    nvml: Any,
    handles: Sequence[Any],
    since_s: Optional[float],
    ours: Optional[set[int]] = None,
) -> Optional[list[str]]:
    """Foreign processes active on the devices ``handles`` since ``since_s`` (epoch seconds),
    through pynvml module ``nvml`` (initialized by the caller); None when it cannot tell:
    a device without a handle, NVML refusing the process list, or pids that are not this
    process's (a container without the host's pid namespace: NVML reports host pids, and
    then even our own process would look foreign)."""
    ours = our_pids() if ours is None else ours
    if ours is None or not handles or any(h is None for h in handles):
        return None
    stamp = int(max(0.0, since_s or 0.0) * 1_000_000)  # NVML stamps in µs since the epoch
    users: list[str] = []
    seen_ours = False
    for handle in handles:
        try:
            procs = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError:
            return None
        active = _active_pids(nvml, handle, stamp)
        for proc in procs:
            pid = int(proc.pid)
            if pid in ours:
                seen_ours = True
                continue
            if active is not None and pid not in active:
                continue  # holds a context, ran nothing during the rounds
            used = getattr(proc, "usedGpuMemory", None)
            how = _gib(used) if active is not None else f"{_gib(used)}; activity not reported"
            name = process_name(pid, getattr(nvml, "nvmlSystemGetProcessName", None))
            users.append(f"pid {pid} {name} ({how})")
    if not seen_ours:
        return None
    return sorted(set(users))


def _active_pids(nvml: Any, handle: Any, stamp: int) -> Optional[set[int]]:
    """Pids with any utilization sample above zero since ``stamp``; None: not reported."""
    try:
        samples = nvml.nvmlDeviceGetProcessUtilization(handle, stamp)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) == NVML_ERROR_NOT_FOUND:
            return set()  # no samples since the rounds began: nobody ran anything
        return None
    except AttributeError:  # an nvidia-ml-py without the call
        return None
    return {
        int(s.pid)
        for s in samples
        if any(getattr(s, f, 0) for f in ("smUtil", "memUtil", "encUtil", "decUtil"))
    }
