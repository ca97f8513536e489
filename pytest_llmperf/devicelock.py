"""The device is ours while we measure: a node-wide lock per accelerator, and pytest-xdist
workers pinned one per device.

**Locks.** Two CI jobs on one node that measure the same GPU at once each measure half a GPU
and store it as a baseline. So every workload on an accelerator holds a file lock per device
it uses (``<lock dir>/<backend>-<device>.lock``, filelock) from before its launcher starts it
until its record is back: loading, warm-up and rounds. A second job waits, says so on the
terminal and in the record's note, for up to ``--llmperf-lock-timeout`` seconds; past that its
workload is an ``error`` record naming the holder (a red: a benchmark that could not run is
not a pass). The devices of one workload are taken in sorted order, so two jobs that need
overlapping sets cannot deadlock. Who holds a lock is written next to it
(``<lock>.owner``: pid, host, command line, since when), because a flock has no owner to ask.

The holder's children (the process launcher's worker, torchrun/deepspeed ranks, the child
pytest runs of ``--llmperf-processes`` started while a lock is held) inherit
``LLMPERF_DEVICE_LOCKS`` (``<holder pid>:<id>,<id>``) and never take those locks again: the
holder waits for them, so their waiting would deadlock. A stale export cannot switch locking
off: a lock counts as inherited only while the named holder is an ancestor of this process
and the owner file still names it.

CPU workloads take no lock: the host's cores are shared deliberately (xdist CPU workers run
side by side), and a neighbour's load is what the busy-host heuristic (``noise.busy_load``)
already detects.

**Pinning.** Under pytest-xdist on a node with several devices of an accelerator backend,
worker ``gwK`` sets the backend's visible-devices variable (``Backend.visible_devices_env``)
to device ``K mod count`` before the vendor stack initializes (pytest_configure of the
worker), so single-device benchmarks run side by side, each on its own device; with more
workers than devices those that share one take turns through its lock. The variable's value
before pinning is kept in ``LLMPERF_XDIST_UNPINNED``: a ``devices(n>1)`` workload's ranks get
it back (``unpinned_env``) and the workload locks all n devices, waiting for the other
workers' current workloads, which then wait for it: it runs alone. ``Backend.device_count``
reports the node's count, not the pinned one, so ``devices(n)`` is not skipped by a pin.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .settings import LOCKS_HELD_ENV, UNPINNED_ENV

if TYPE_CHECKING:
    from .backends.base import Backend

#: Node-wide, the same for every user and job (not the per-user temp dir of macOS).
DEFAULT_LOCK_DIR = Path("/tmp/pytest-llmperf-locks")
DEFAULT_LOCK_TIMEOUT_S = 3600.0
#: Lock and owner files are read and written by every user's jobs on the node; the directory is
#: sticky like /tmp, so nobody removes another user's files.
FILE_MODE = 0o666
DIR_MODE = 0o1777
#: Set by pytest-xdist in its workers (``gw0``, ``gw1``, …) and their count.
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"
XDIST_COUNT_ENV = "PYTEST_XDIST_WORKER_COUNT"


class LockTimeout(Exception):
    """Another job held a device for longer than --llmperf-lock-timeout."""


@dataclass(frozen=True)
class Owner:
    """Who holds a device lock, as its owner file says."""

    pid: int
    host: str
    cmdline: str
    since: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where} ({self.cmdline}) since {when}"

    @classmethod
    def me(cls, clock: Callable[[], float] = time.time) -> Owner:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                cmdline = " ".join(p.decode(errors="replace") for p in f.read().split(b"\0") if p)
        except OSError:
            import sys

            cmdline = " ".join(sys.argv)
        cmdline = " ".join(cmdline.split())  # one line, whatever the arguments hold
        if len(cmdline) > 240:
            cmdline = cmdline[:239] + "…"
        return cls(os.getpid(), socket.gethostname(), cmdline, clock())


def lock_name(device_id: str) -> str:
    """A device id (``cuda-0``, ``cuda-GPU-8f2…``, ``neuron-4``) as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device_id)[:120] or "device"


def shown(device_id: str) -> str:
    """``cuda-0`` → ``cuda:0``: how people name a device."""
    backend, _, rest = device_id.partition("-")
    return f"{backend}:{rest}" if rest else device_id


def read_owner(path: Path) -> Optional[Owner]:
    try:
        data = json.loads(path.read_text())
        return Owner(
            int(data["pid"]), str(data["host"]), str(data["cmdline"]), float(data["since"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or torn while being written: "unknown holder"


def _write_owner(path: Path, owner: Owner) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with contextlib.suppress(OSError):
        os.fchmod(fd, FILE_MODE)  # only the file's creator may; the others find it writable
    with os.fdopen(fd, "w") as f:
        json.dump(
            {"pid": owner.pid, "host": owner.host, "cmdline": owner.cmdline, "since": owner.since},
            f,
        )


def _ancestors(pid: int) -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process(pid).parents()}
    except Exception:
        return set()


def inherited(environ: Mapping[str, str], directory: Path) -> set[str]:
    """The device ids an ancestor of this process holds for it (``LLMPERF_DEVICE_LOCKS``)."""
    holder, _, ids = environ.get(LOCKS_HELD_ENV, "").partition(":")
    if holder_pid(environ) is None:
        return set()
    out = set()
    for device_id in filter(None, ids.split(",")):
        owner = read_owner(directory / f"{lock_name(device_id)}.lock.owner")
        if owner is not None and owner.pid == int(holder):
            out.add(device_id)
    return out


def holder_pid(environ: Mapping[str, str]) -> Optional[int]:
    """The pid that holds this process's device locks, when it is an ancestor (or itself):
    the root of the processes that count as ours on the device (``noise.our_pids``)."""
    holder = environ.get(LOCKS_HELD_ENV, "").partition(":")[0]
    if not holder.isdigit():
        return None
    pid = int(holder)
    return pid if pid == os.getpid() or pid in _ancestors(os.getpid()) else None


class DeviceLocks:
    """The session's device locks: ``hold(ids)`` around each workload."""

    def __init__(
        self,
        directory: Path = DEFAULT_LOCK_DIR,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        say: Optional[Callable[[str], None]] = None,
        environ: Optional[MutableMapping[str, str]] = None,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self.say = say
        self.environ = os.environ if environ is None else environ
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        #: What the last ``hold`` waited for, for the record's note ("" when it did not wait).
        self.waited = ""

    def _directory(self) -> Path:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(self.directory, DIR_MODE)  # mkdir's mode goes through the umask
        return self.directory

    @contextlib.contextmanager
    def hold(self, device_ids: Sequence[str]) -> Iterator[None]:
        """Hold the locks of ``device_ids`` (sorted; those an ancestor holds are skipped).

        Raises :class:`LockTimeout` naming the holder when one is not free in time; the locks
        already taken are released then.
        """
        from filelock import FileLock, Timeout

        self.waited = ""
        wanted = sorted(set(device_ids))
        if not wanted:
            yield
            return
        directory = self._directory()
        mine = inherited(self.environ, directory)
        deadline = self.clock() + self.timeout_s
        taken: list[FileLock] = []
        owners: list[Path] = []
        before = self.environ.get(LOCKS_HELD_ENV)
        try:
            for device_id in wanted:
                if device_id in mine:
                    continue
                path = directory / f"{lock_name(device_id)}.lock"
                lock = FileLock(str(path), mode=FILE_MODE, thread_local=False)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    owner = read_owner(path.with_name(path.name + ".owner"))
                    held_by = owner.describe() if owner else "an unknown process"
                    left = max(0.0, deadline - self.clock())
                    if left <= 0:
                        raise LockTimeout(self._timeout_text(device_id, held_by)) from None
                    started = self.clock()
                    if self.say is not None:
                        self.say(
                            f"waiting for {shown(device_id)}, held by {held_by}; up to "
                            f"{left:.0f} s more (--llmperf-lock-timeout)"
                        )
                    try:
                        lock.acquire(timeout=left, poll_interval=self.poll_interval_s)
                    except Timeout:
                        raise LockTimeout(self._timeout_text(device_id, held_by)) from None
                    waited = (
                        f"waited {self.clock() - started:.0f} s for {shown(device_id)} ({held_by})"
                    )
                    self.waited = "; ".join(w for w in (self.waited, waited) if w)
                taken.append(lock)
                owner_path = path.with_name(path.name + ".owner")
                _write_owner(owner_path, Owner.me())
                owners.append(owner_path)
            held = sorted({*mine, *(d for d in wanted)})
            self.environ[LOCKS_HELD_ENV] = f"{os.getpid()}:{','.join(held)}"
            yield
        finally:
            if before is None:
                self.environ.pop(LOCKS_HELD_ENV, None)
            else:
                self.environ[LOCKS_HELD_ENV] = before
            for owner_path in owners:
                with contextlib.suppress(OSError):
                    owner_path.write_text("")  # free: no owner to name
            for lock in reversed(taken):
                lock.release()

    def _timeout_text(self, device_id: str, held_by: str) -> str:
        return (
            f"{shown(device_id)} is held by {held_by}; gave up after {self.timeout_s:.0f} s "
            "(--llmperf-lock-timeout); the workload did not run"
        )


# -- pytest-xdist pinning ----------------------------------------------------------------------


def parse_visible(value: Optional[str]) -> Optional[list[str]]:
    """A visible-devices value as a list of entries (None: the variable is not set).

    Comma-separated entries (indices or UUIDs); ranges ``0-3`` as NEURON_RT_VISIBLE_CORES
    writes them are expanded. An empty value hides every device: [].
    """
    if value is None:
        return None
    out: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        if dash and low.isdigit() and high.isdigit() and int(low) <= int(high):
            out += [str(i) for i in range(int(low), int(high) + 1)]
        else:
            out.append(part)
    return out


def visible_ids(backend: Backend, environ: Mapping[str, str], count: int) -> list[str]:
    """Node-wide ids of the first ``count`` devices this process would use on ``backend``:
    the visible-devices entries (indices or UUIDs), mapped through the value before xdist
    pinning for a workload of several devices (its ranks get that value back)."""
    env = backend.visible_devices_env
    if not env:
        return []
    current = parse_visible(environ.get(env))
    if count > 1:
        unpinned = unpinned_values(environ)
        if env in unpinned:
            current = parse_visible(unpinned[env])
    entries = current if current is not None else [str(i) for i in range(count)]
    return [f"{backend.name}-{entry}" for entry in entries[:count]]


def unpinned_values(environ: Mapping[str, str]) -> dict[str, Optional[str]]:
    """The visible-devices variables as they were before pinning (None: unset then)."""
    try:
        data = json.loads(environ.get(UNPINNED_ENV) or "{}")
    except ValueError:
        return {}
    return (
        {str(k): (None if v is None else str(v)) for k, v in data.items()}
        if isinstance(data, dict)
        else {}
    )


def unpinned_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the visible-devices variables as they were before pinning: what the ranks
    of a workload on several devices get (they need all the node's devices)."""
    out = dict(env)
    for name, value in unpinned_values(env).items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def unpinned_count(backend: Backend, environ: Mapping[str, str]) -> Optional[int]:
    """The number of ``backend`` devices before this worker was pinned to one (None: not
    pinned): what ``devices(n)`` and the workload check count."""
    unpinned = unpinned_values(environ)
    env = backend.visible_devices_env
    if not env or env not in unpinned:
        return None
    before = parse_visible(unpinned[env])
    return len(before) if before is not None else backend.node_device_count()


def pin_worker(
    backends: Sequence[Backend], environ: Optional[MutableMapping[str, str]] = None
) -> dict[str, str]:
    """Pin this pytest-xdist worker to one device of each of ``backends`` that has several;
    returns the variables set. Nothing outside an xdist worker, nothing twice."""
    environ = os.environ if environ is None else environ
    worker = environ.get(XDIST_WORKER_ENV, "")
    if not re.fullmatch(r"gw\d+", worker) or UNPINNED_ENV in environ:
        return {}
    index = int(worker[2:])
    before: dict[str, Optional[str]] = {}
    pinned: dict[str, str] = {}
    for backend in backends:
        env = backend.visible_devices_env
        if not env or env in before:
            continue
        current = parse_visible(environ.get(env))
        if current is None:
            count = backend.node_device_count()
            current = [str(i) for i in range(count)] if count else None
        if current is None or len(current) < 2:
            continue
        before[env] = environ.get(env)
        pinned[env] = current[index % len(current)]
    if pinned:
        environ[UNPINNED_ENV] = json.dumps(before, sort_keys=True)
        environ.update(pinned)
    return pinned


def workers_per_device(environ: Mapping[str, str], devices: int) -> int:
    """How many xdist workers are pinned to this worker's device (``devices`` on the node)."""
    worker = environ.get(XDIST_WORKER_ENV, "")
    total = int(environ.get(XDIST_COUNT_ENV, "0") or 0)
    if not re.fullmatch(r"gw\d+", worker) or total < 1 or devices < 1:
        return 0
    mine = int(worker[2:]) % devices
    return sum(1 for k in range(total) if k % devices == mine)
