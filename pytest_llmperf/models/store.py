"""The checkpoint cache on disk: where engines that load with their library's own loader find a
directory to load from.

Engines load the way users load (``from_pretrained``, ``init_inference``, ZeRO's partitioned
init), so ``load_time_s`` is real file I/O and initialization, as in the seed posts' load-time
table. A real checkpoint (a local directory, the HF cache) is used where it exists; otherwise
the seeded weights are written here once, atomically, and reused by every later load, process
and rank. Offload folders (accelerate's disk offload, DeepSpeed's NVMe swap) live here too, so
one directory holds everything the plugin writes besides reports and baselines.

Layout under the root (``--llmperf-cache-dir``)::

    weights/<model>-<dtype>-seed<N>-g<generator>/   a seeded checkpoint (llmperf-weights.json)
    weights/.<that name>.<random>/                  a write in progress, or a killed one
    scratch/<name>.<random>/                        one load's offloaded weights
    .llmperf-cache.lock                             held by whoever writes or evicts

The cache is capped (``--llmperf-cache-size``): a 7B model is 13-26 GiB per dtype, and every
dtype, seed and generator version is one more copy. Before a seeded checkpoint is written, the
least recently used seeded checkpoints are evicted until it fits: they are regenerated from the
seed on the next use, whereas the user's real checkpoints never live here and are never touched.
"Used" is the marker file's mtime, touched on every :meth:`CheckpointStore.checkpoint` hit.

Several processes share one cache (pytest-xdist workers, torchrun ranks, concurrent CI jobs on a
node), so whatever a process uses is protected by a shared ``flock`` on its folder, held until
:meth:`~CheckpointStore.unpin` (or :meth:`~CheckpointStore.release` for scratch) or until the
process exits — the kernel drops it even for a killed process, so nothing stale is left behind.
Eviction and ``llmperf cache prune`` take an exclusive lock without waiting and skip what they
cannot lock. Writers hold one lock for the whole cache, so two writers never decide on the cap's
room at once, and a hidden ``.<name>.<random>`` folder found while holding it belongs to a dead
writer: it is never reused, and is removed.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import filelock

from ..settings import DEFAULT_CACHE_SIZE, SettingError, parse_size
from ..units import format_value
from . import weights
from .catalog import ModelSpec

#: The variable children read the session's cache directory from (the option's own env name).
CACHE_DIR_ENV = "LLMPERF_CACHE_DIR"
#: The variable children read the cache's size cap from (the option's own env name).
CACHE_SIZE_ENV = "LLMPERF_CACHE_SIZE"
#: Held (filelock) by a process writing a seeded checkpoint or pruning.
LOCK_NAME = ".llmperf-cache.lock"
#: How long a writer waits for another writer. Writing bloomz-7b1 in fp32 (26 GiB) takes minutes;
#: an hour means the other writer is hung, and the test should say so rather than wait for ever.
WRITE_LOCK_TIMEOUT_S = 3600.0
#: Written last into a folder of compiled artifacts (:meth:`CheckpointStore.compiled`): what
#: it was compiled from. A folder without it is an unfinished compile, never loaded.
COMPILED_MARKER = "llmperf-compiled.json"
#: How long a process waits for another one compiling the same artifacts: a 70B model's
#: Neuron compile takes well over an hour.
COMPILE_LOCK_TIMEOUT_S = 4 * 3600.0

SEEDED = "seeded"
PARTIAL = "partial write"
SCRATCH = "scratch"
OTHER = "other"

_SEEDED_NAME = re.compile(r"(?P<model>.+)-(?P<dtype>[a-z0-9]+)-seed(?P<seed>\d+)-g(?P<gen>\d+)")
_PARTIAL_NAME = re.compile(
    r"\.+(?P<model>.+?)-(?P<dtype>[a-z0-9]+)-seed(?P<seed>\d+)-g(?P<gen>\d+)\."
)


class _FromEnv(enum.Enum):
    FROM_ENV = "from-env"


#: :class:`CheckpointStore`'s default cap: ``$LLMPERF_CACHE_SIZE``, else the option's default.
FROM_ENV = _FromEnv.FROM_ENV


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-llmperf"


def cache_dir_from_env(environ: Optional[Mapping[str, str]] = None) -> Path:
    """``$LLMPERF_CACHE_DIR``, else the default: where a child (or ``llmperf cache``) looks."""
    env = os.environ if environ is None else environ
    value = env.get(CACHE_DIR_ENV, "")
    return Path(value).expanduser() if value else default_cache_dir()


def cache_size_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """``$LLMPERF_CACHE_SIZE`` in bytes (None: unlimited), else the option's default.

    Raises SettingError naming the variable: a cap that silently fell back to the default
    would evict what the user meant to keep.
    """
    env = os.environ if environ is None else environ
    raw = env.get(CACHE_SIZE_ENV, "")
    if raw == "":
        return DEFAULT_CACHE_SIZE
    try:
        return parse_size(raw)
    except SettingError as exc:
        raise SettingError(f"env {CACHE_SIZE_ENV}={raw}: {exc}") from None


def seeded_bytes(model: ModelSpec, dtype: str) -> int:
    """Disk a seeded checkpoint of ``model`` needs: its weights plus safetensors headers and
    config, with the margin :func:`weights.save_seeded` checks the free space against."""
    return int(model.weight_bytes(dtype) * 1.05) + (1 << 20)


def _size(value: int) -> str:
    return format_value(value, "B")


@dataclass(frozen=True)
class CacheEntry:
    """One folder (or stray file) of the cache, as ``llmperf cache show`` lists it."""

    path: Path
    kind: str  # SEEDED, PARTIAL, SCRATCH or OTHER
    size: int
    #: Seconds since the epoch: the marker's mtime for a seeded checkpoint (touched on each use),
    #: else the folder's.
    last_used: float
    model: str = "-"
    dtype: str = "-"
    seed: str = "-"
    #: Written by this plugin's generator; an older generator's weights are never loaded again.
    current: bool = True

    @property
    def label(self) -> str:
        """The entry as a sentence names it: kind and folder, relative to the cache root."""
        kind = self.kind if self.current else f"{self.kind} (older generator)"
        return f"{kind} {self.path.parent.name}/{self.path.name}"


@dataclass
class PruneResult:
    removed: list[CacheEntry] = field(default_factory=list)
    #: Entries prune would have removed, with why they stay ("in use", a write in progress).
    kept: list[tuple[CacheEntry, str]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(entry.size for entry in self.removed)


class CheckpointStore:
    """Checkpoint directories and scratch folders under one root, at most ``max_bytes`` of
    checkpoints (None: no cap but the disk)."""

    def __init__(
        self,
        root: Optional[Path] = None,
        max_bytes: Union[int, None, _FromEnv] = FROM_ENV,
    ) -> None:
        self.root = Path(root) if root is not None else cache_dir_from_env()
        self.max_bytes: Optional[int] = (
            cache_size_from_env() if isinstance(max_bytes, _FromEnv) else max_bytes
        )

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, model: ModelSpec, dtype: str, seed: int) -> tuple[Path, str]:
        """(directory, weight source) of ``model`` in ``dtype``: its real checkpoint when one
        is on disk, else the seeded weights written under this root once.

        The seeded directory stays pinned for this process (no other process evicts or prunes
        it) until :meth:`unpin` or the process exits. Raises OSError with the numbers and the
        option to change when a seeded checkpoint fits neither under the cap nor on the disk.
        """
        real = weights.real_checkpoint(model)
        if real is not None:
            return real
        target = weights.seeded_dir(self.root, model, dtype, seed)
        if not self._use(target):
            with self._write_lock():
                # Another process may have written it while we waited for the lock.
                if not self._use(target):
                    self._write(model, dtype, seed, target)
        return target, weights.seeded_source(target)

    def unpin(self, directory: Path) -> None:
        """This process no longer reads ``directory``: eviction and prune may take it.

        Engines whose loaded model never reads its checkpoint again may call this when the
        model is dropped; without it a checkpoint stays pinned until the process exits.
        """
        _unpin(directory)

    @staticmethod
    def unpin_all() -> None:
        """This process dropped its model: every checkpoint it pinned may be evicted again.
        (One model is resident at a time; a model's files are not read after its load.)"""
        for key in list(_PINNED):
            _close(_PINNED.pop(key))

    def _use(self, target: Path) -> bool:
        """Pin ``target`` and mark it used, if it is a complete seeded checkpoint."""
        if not _pin(target):
            return False
        marker = target / weights.SEEDED_MARKER
        if not marker.is_file():  # a folder at our name that no writer finished: not reusable
            _unpin(target)
            return False
        with suppress(OSError):  # a read-only shared cache is still usable, just not ranked
            os.utime(marker)
        return True

    def _write(self, model: ModelSpec, dtype: str, seed: int, target: Path) -> None:
        # Holding the write lock: nothing else writes, evicts or prunes partial writes now.
        if target.exists():
            self._remove_or_fail(target)
        self._make_room(model, dtype)
        weights.save_seeded(model, dtype, seed, self.root)
        if not self._use(target):
            raise OSError(f"{target}: written, then gone before it could be used")

    def _remove_or_fail(self, path: Path) -> None:
        fd = _claim(path)
        if fd is None:
            raise OSError(
                f"{path}: an unfinished checkpoint folder that another process holds open; "
                "stop it, or remove the folder"
            )
        _remove_claimed(path, fd)

    def _make_room(self, model: ModelSpec, dtype: str) -> None:
        """Evict least recently used seeded checkpoints until one of ``model`` in ``dtype``
        fits under the cap and on the disk, or refuse (OSError) before deleting anything."""
        need = seeded_bytes(model, dtype)
        name = f"{model.id} {dtype}"
        cap = self.max_bytes
        if cap is not None and need > cap:
            raise OSError(
                f"{name}: its seeded checkpoint needs {_size(need)}, more than the whole "
                f"checkpoint cache may hold ({_size(cap)}, --llmperf-cache-size); raise "
                "--llmperf-cache-size, or put the real checkpoint in the Hugging Face cache"
            )
        entries = []
        for entry in self.entries():
            if entry.kind == PARTIAL:  # a killed writer's: we hold the lock, so none is alive
                fd = _claim(entry.path)
                if fd is not None:
                    _remove_claimed(entry.path, fd)
                    continue
            if entry.kind != SCRATCH:  # scratch is live loads' working space, not the cache
                entries.append(entry)
        directory = self.root / "weights"
        directory.mkdir(parents=True, exist_ok=True)
        total = sum(entry.size for entry in entries)
        free = shutil.disk_usage(directory).free
        over = total + need - cap if cap is not None else 0
        short = need - free
        if over <= 0 and short <= 0:
            return
        # An older generator's weights are never loaded again: they go first.
        candidates = sorted(
            (e for e in entries if e.kind == SEEDED), key=lambda e: (e.current, e.last_used)
        )
        claimed: list[tuple[CacheEntry, int]] = []
        busy: list[CacheEntry] = []
        freed = 0
        for entry in candidates:
            if freed >= max(over, short):
                break
            fd = _claim(entry.path)
            if fd is None:
                busy.append(entry)
            else:
                claimed.append((entry, fd))
                freed += entry.size
        if freed < max(over, short):
            for _, fd in claimed:
                _close(fd)
            raise OSError(self._refusal(name, need, total, free, freed, over, entries, busy))
        for entry, fd in claimed:
            _remove_claimed(entry.path, fd)

    def _refusal(
        self,
        name: str,
        need: int,
        total: int,
        free: int,
        freed: int,
        over: int,
        entries: list[CacheEntry],
        busy: list[CacheEntry],
    ) -> str:
        evicting = f"evicting every seeded checkpoint not in use frees only {_size(freed)}"
        if freed < over:
            held = []
            if busy:
                names = ", ".join(e.path.name for e in busy[:3]) + (", …" if len(busy) > 3 else "")
                held.append(f"{_size(sum(e.size for e in busy))} in use: {names}")
            other = sum(e.size for e in entries if e.kind == OTHER)
            if other:
                held.append(f"{_size(other)} in folders llmperf did not write")
            why = f" ({'; '.join(held)})" if held else ""
            return (
                f"{name}: its seeded checkpoint needs {_size(need)}, and the checkpoint cache "
                f"{self.root} holds {_size(total)} of its {_size(self.max_bytes or 0)} cap "
                f"(--llmperf-cache-size); {evicting}{why}; raise --llmperf-cache-size or point "
                "--llmperf-cache-dir elsewhere"
            )
        return (
            f"{name}: its seeded checkpoint needs {_size(need)} on disk, {_size(free)} free in "
            f"{self.root / 'weights'}, and {evicting}; free space there or point "
            "--llmperf-cache-dir at a larger disk"
        )

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.root / LOCK_NAME), timeout=WRITE_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise OSError(
                f"{self.root}: another process has held the checkpoint cache's lock "
                f"{lock.lock_file} for {WRITE_LOCK_TIMEOUT_S / 60:g} min; is its write hung? "
                "(--llmperf-cache-dir)"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # -- compiled artifacts --------------------------------------------------------------------

    def compiled(
        self, name: str, build: Callable[[Path], dict[str, Any]]
    ) -> tuple[Path, dict[str, Any], bool]:
        """(folder, marker, built) of the compiled artifacts named ``name`` under
        ``compiled/``: ``build(folder)`` fills a hidden folder once, whose returned dict is
        written as the marker before the folder is renamed into place, so a killed compile
        leaves nothing loadable. ``name`` must carry everything the artifacts depend on (shapes,
        dtype, compiler version): a folder is never rebuilt once complete.

        A lock per name, not the cache's write lock: a compile takes long, and only a process
        compiling the same artifacts needs to wait (then loads what the first one built). The
        folder is pinned like a checkpoint. Not counted under ``--llmperf-cache-size``.
        """
        parent = self.root / "compiled"
        target = parent / name
        marker = self._use_compiled(target)
        if marker is not None:
            return target, marker, False
        parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(parent / f".{name}.lock"), timeout=COMPILE_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise OSError(
                f"{lock.lock_file}: another process has been compiling {name} for "
                f"{COMPILE_LOCK_TIMEOUT_S / 3600:g} h; is it hung? (--llmperf-cache-dir)"
            ) from None
        try:
            marker = self._use_compiled(target)
            if marker is not None:  # built by the process we waited for
                return target, marker, False
            for stale in parent.glob(f".{name}.*"):  # a killed compile's folder (we hold the lock)
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                self._remove_or_fail(target)
            work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
            try:
                marker = dict(build(work))
                (work / COMPILED_MARKER).write_text(json.dumps(marker, indent=1), "utf-8")
                os.rename(work, target)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            if self._use_compiled(target) is None:
                raise OSError(f"{target}: compiled, then gone before it could be used")
            return target, marker, True
        finally:
            lock.release()

    @staticmethod
    def _use_compiled(target: Path) -> Optional[dict[str, Any]]:
        """Pin ``target`` and return its marker, if it is a complete compiled folder."""
        if not _pin(target):
            return None
        try:
            marker = json.loads((target / COMPILED_MARKER).read_text("utf-8"))
        except (OSError, ValueError):
            marker = None
        if not isinstance(marker, dict):
            _unpin(target)
            return None
        return marker

    # -- scratch folders -----------------------------------------------------------------------

    def scratch(self, name: str) -> Path:
        """A fresh, empty folder for one load's offloaded weights; removed by :meth:`release`.

        Pinned like a checkpoint, so ``llmperf cache prune`` leaves a running load's folder
        alone and removes a killed one's.
        """
        parent = self.root / "scratch"
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            folder = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=parent))
            if _pin(folder):  # else a prune took it between mkdtemp and the lock
                return folder
        raise OSError(f"{parent}: a scratch folder vanished as soon as it was made, three times")

    @staticmethod
    def release(folder: Path) -> None:
        _unpin(folder)
        shutil.rmtree(folder, ignore_errors=True)

    # -- listing and pruning -----------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Everything under ``weights/`` and ``scratch/``, in name order."""
        out = []
        for sub in ("weights", "scratch"):
            try:
                children = sorted(os.scandir(self.root / sub), key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            out += [_entry(Path(child.path), sub) for child in children]
        return out

    def in_use(self, entry: CacheEntry) -> bool:
        """Whether a process (this one included) holds ``entry``: eviction and prune skip it."""
        if entry.kind == PARTIAL:
            return self._writing()
        fd = _claim(entry.path)
        if fd is None:
            return entry.path.exists()
        _close(fd)
        return False

    def _writing(self) -> bool:
        lock = filelock.FileLock(str(self.root / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return True
        except OSError:  # cannot even create the lock file: nobody can be writing here
            return False
        lock.release()
        return False

    def prune(
        self,
        *,
        older_than: Optional[float] = None,
        everything: bool = False,
        dry_run: bool = False,
        now: Optional[float] = None,
    ) -> PruneResult:
        """Remove partial writes, scratch folders and older generators' checkpoints always,
        and seeded checkpoints unused for ``older_than`` seconds (all with ``everything``).

        Only regenerable data is removed, and nothing in use: a folder some process holds is
        kept, and so are partial writes while a writer holds the lock (one may be its own).
        """
        now = time.time() if now is None else now
        result = PruneResult()
        lock: Optional[filelock.BaseFileLock] = None
        writing = False
        if self.root.is_dir():
            lock = filelock.FileLock(str(self.root / LOCK_NAME), timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                writing, lock = True, None
            except OSError as exc:
                if not dry_run:
                    raise OSError(
                        f"{self.root}: cannot take the cache's lock ({exc.strerror or exc})"
                    ) from None
                lock = None
        try:
            for entry in self.entries():
                if not _prunable(entry, older_than, everything, now):
                    continue
                if entry.kind == PARTIAL and writing:
                    result.kept.append((entry, "a write is in progress"))
                    continue
                fd = _claim(entry.path)
                if fd is None:
                    if entry.path.exists():
                        result.kept.append((entry, "in use"))
                    continue
                if dry_run:
                    _close(fd)
                else:
                    _remove_claimed(entry.path, fd)
                result.removed.append(entry)
        finally:
            if lock is not None:
                lock.release()
        return result


def _prunable(entry: CacheEntry, older_than: Optional[float], everything: bool, now: float) -> bool:
    if entry.kind in (PARTIAL, SCRATCH):
        return True
    if entry.kind != SEEDED:
        return False  # not ours to delete
    if not entry.current or everything:
        return True
    return older_than is not None and now - entry.last_used > older_than


def _entry(path: Path, sub: str) -> CacheEntry:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return CacheEntry(path, OTHER, 0, 0.0, model=path.name)
    if not os.path.isdir(path) or path.is_symlink():
        return CacheEntry(path, OTHER, st.st_size, st.st_mtime, model=path.name)
    size = _tree_size(path)
    if sub == "scratch":  # <name>.<random>, or .<that>.removing-<random> if a prune was killed
        name = path.name.lstrip(".").split(".removing-")[0].rsplit(".", 1)[0]
        return CacheEntry(path, SCRATCH, size, st.st_mtime, model=name)
    if path.name.startswith("."):  # .<seeded name>.<random>[.removing-<random>]
        parsed = _PARTIAL_NAME.match(path.name)
        if parsed is None:
            return CacheEntry(path, PARTIAL, size, st.st_mtime, model=path.name)
        model, dtype, seed = parsed["model"], parsed["dtype"], parsed["seed"]
        return CacheEntry(path, PARTIAL, size, st.st_mtime, model, dtype, seed)
    marker = path / weights.SEEDED_MARKER
    try:
        used = marker.stat().st_mtime
    except OSError:
        return CacheEntry(path, OTHER, size, st.st_mtime, model=path.name)
    parsed = _SEEDED_NAME.fullmatch(path.name)
    if parsed is None:
        return CacheEntry(path, SEEDED, size, used, model=path.name)
    current = int(parsed["gen"]) == weights.GENERATOR_VERSION
    model, dtype, seed = parsed["model"], parsed["dtype"], parsed["seed"]
    return CacheEntry(path, SEEDED, size, used, model, dtype, seed, current)


def _tree_size(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):  # removed under us: it no longer counts
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


# -- folder locks ---------------------------------------------------------------------------------

#: Folders this process uses, by real path: the open descriptor holding a shared flock on each.
_PINNED: dict[str, int] = {}


#: The "descriptor" of a folder where folders cannot be opened (Windows): pins are then only
#: this process's bookkeeping.
_NO_FD = -1


def _open_dir(path: Path) -> Optional[int]:
    if sys.platform == "win32":
        return _NO_FD if os.path.isdir(path) else None
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _close(fd: int) -> None:
    if fd != _NO_FD:
        os.close(fd)


def _flock(fd: int, *, exclusive: bool, wait: bool) -> bool:
    """Lock ``fd``'s folder; False when another holder prevents it (only without ``wait``).

    Where there is no flock (Windows, a file system without locks), every lock succeeds:
    only this process's own pins protect anything there.
    """
    if sys.platform == "win32":
        return True
    import fcntl

    how = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _same(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the folder ``fd`` opened (not removed or replaced since)."""
    if fd == _NO_FD:
        return os.path.isdir(path)
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _pin(path: Path) -> bool:
    key = os.path.realpath(path)
    held = _PINNED.get(key)
    if held is not None:
        if _same(held, path):
            return True
        _close(_PINNED.pop(key))
    fd = _open_dir(path)
    if fd is None:
        return False
    # Waits only while an evictor holds the folder, i.e. while it is being deleted; then the
    # check below sees it gone.
    _flock(fd, exclusive=False, wait=True)
    if not _same(fd, path):
        _close(fd)
        return False
    _PINNED[key] = fd
    return True


def _unpin(path: Path) -> None:
    fd = _PINNED.pop(os.path.realpath(path), None)
    if fd is not None:
        _close(fd)


def _claim(path: Path) -> Optional[int]:
    """An exclusive lock on folder ``path`` (its descriptor), or None when some process uses it
    or it is gone. Never waits: an evictor or prune that waited would stall a benchmark."""
    if os.path.realpath(path) in _PINNED:
        return None
    fd = _open_dir(path)
    if fd is None:
        return None
    if not _flock(fd, exclusive=True, wait=False) or not _same(fd, path):
        _close(fd)
        return None
    return fd


def _remove_claimed(path: Path, fd: int) -> None:
    """Delete a claimed folder: first renamed to a hidden name, so a deletion killed halfway
    leaves a partial write (never reused, pruned later) rather than half a checkpoint."""
    try:
        hidden = path.with_name(f".{path.name.lstrip('.')}.removing-{uuid.uuid4().hex[:8]}")
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    finally:
        _close(fd)
