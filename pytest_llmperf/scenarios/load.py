"""Loading a model from its checkpoint on disk: reference 001's table of how long each engine
takes to get BLOOM ready to generate, as a workload kind (``llmperf.load``).

Design: loading *is* this workload, so execute loads nothing first (``measures_load``) and hands
the scenario its own load step (drop the resident model, ``engine.load`` from a store, an OOM as
the record's outcome, keep the new model as the one resident). Each round then

1. imports the engine's libraries (``Engine.libraries``) not yet imported, timed apart as
   ``import_s`` with a device sync before each clock read: in a fresh process this is what a
   cold start pays before a byte of the checkpoint is read, and it is not the engine's load;
2. puts the checkpoint's files in the page-cache state ``file_cache`` asks for: evicted
   (``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file, which needs no root) or read once.
   This happens in a wrapped store, on exactly the directory the engine asks the store for and
   when it asks: engines read different checkpoints (bitsandbytes a 16-bit one, DeepSpeed int8
   an fp16 one) and every engine asks before its clock starts, so neither the eviction nor the
   first write of a seeded checkpoint is timed. How much of the checkpoint was cached as the
   load started is measured with ``mincore`` (``page_cached_fraction``), not assumed;
3. loads: ``load_time_s`` is the engine's own synchronized span, the number a generate record
   reports for its load, so the two kinds agree on what a load is.

A cold start needs a new process per round: ``llmperf.load`` asks for ``fresh="round"``, the
process launcher runs each round in its own child and merges the records. Rounds that share a
process (a spec executed directly with ``rounds > 1``) find the libraries imported; the note
says so.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, cast

from ..measure import Timing
from ..results import MetricValue
from ..units import format_value
from .base import Loader, Scenario

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engines.base import Engine
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..results import Record
    from ..spec import WorkloadSpec

#: Beyond this share of pages in the page cache (cold) or missing from it (warm), the note says
#: the file cache was not what was asked for.
INCOMPLETE = 0.05
_READ_CHUNK = 1 << 24
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each byte is "resident"


@dataclass
class Imported:
    """One round's import of the engine's libraries."""

    seconds: float
    #: Imported in this round (what ``seconds`` covers).
    imported: list[str]
    #: Already imported before the round (by the worker, the backend or the engine's checks).
    present: list[str]


def import_libraries(names: Sequence[str], backend: Backend) -> Imported:
    """Import those of ``names`` not imported yet, timed with a sync before each clock read."""
    backend.synchronize()  # may import the device's runtime itself: look only after it
    present = [n for n in names if n in sys.modules]
    todo = [n for n in names if n not in sys.modules]
    backend.synchronize()
    start = backend.clock()
    for name in todo:
        importlib.import_module(name)
    backend.synchronize()
    return Imported(backend.clock() - start, todo, present)


@dataclass
class FileCache:
    """What one checkpoint directory's files were made to be in the page cache before a load."""

    directory: Path
    files: int
    size: int
    #: Share of their pages in the page cache afterwards (None: could not be asked).
    cached: Optional[float]
    #: Why the state asked for could not be made ("" when it was).
    problem: str = ""


def checkpoint_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` (a real checkpoint's symlinks into the HF cache followed)."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file())


def set_file_cache(directory: Path, mode: str) -> FileCache:
    """Evict ``directory``'s files from the page cache (``cold``) or read them once (``warm``)."""
    files = checkpoint_files(directory)
    problem = ""
    if mode == "warm":
        buffer = bytearray(_READ_CHUNK)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    elif not hasattr(os, "posix_fadvise"):
        problem = f"posix_fadvise is unavailable on {sys.platform}"
    else:
        for path in files:
            try:
                evict(path)
            except OSError as exc:
                problem = f"evicting {path.name} failed: {exc.strerror or exc}"
    size = sum(p.stat().st_size for p in files)
    return FileCache(Path(directory), len(files), size, page_cached_fraction(files), problem)


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache; allowed for any file one can read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # Dirty pages (a seeded checkpoint written a moment ago) are not dropped: write them
        # first. A file system that cannot sync still drops what is clean.
        with suppress(OSError):
            os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cached_fraction(files: Sequence[Path]) -> Optional[float]:
    """Share of the files' pages in the page cache: ``mincore`` on a read-only mapping, which
    reads nothing. None where it cannot be asked (no mmap/mincore in the C library)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, mincore, munmap = libc.mmap, libc.mincore, libc.munmap
        prot, flags, page = mmap.PROT_READ, mmap.MAP_SHARED, mmap.PAGESIZE
    except (OSError, AttributeError, TypeError):
        return None
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t) + (ctypes.c_int,) * 3 + (ctypes.c_long,)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    failed = ctypes.c_void_p(-1).value
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            address = c_mmap(None, size, prot, flags, fd, 0)
        finally:
            os.close(fd)
        if address is None or address == failed:
            return None
        vector = (ctypes.c_ubyte * pages)()
        try:
            asked = mincore(address, size, vector) == 0
        finally:
            munmap(address, size)
        if not asked:
            return None
        resident += bytes(vector).translate(_LOW_BIT).count(1)
        total += pages
    return resident / total if total else None


class FileCacheStore:
    """The session's checkpoint store, except that each checkpoint directory an engine asks for
    is put in the page-cache state asked for before the engine gets it."""

    def __init__(self, inner: CheckpointStore, mode: str) -> None:
        self._inner, self._mode = inner, mode
        self.prepared: list[FileCache] = []

    def checkpoint(self, model: ModelSpec, dtype: str, seed: int) -> tuple[Path, str]:
        directory, source = self._inner.checkpoint(model, dtype, seed)
        self.prepared.append(set_file_cache(directory, self._mode))
        return directory, source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def named_checkpoints(spec: WorkloadSpec) -> list[Path]:
    """Directories an engine reads without asking the store: a launcher's ``weights`` and a
    ``checkpoint`` engine option that is a directory."""
    named = (spec.weights, spec.options.get("checkpoint"))
    return [Path(d) for d in named if isinstance(d, str) and os.path.isdir(d)]


@dataclass
class _Round:
    load_s: float
    imported: Imported
    prepared: list[FileCache] = field(default_factory=list)

    @property
    def cached(self) -> Optional[float]:
        """Share of every checkpoint read in this round cached as the load started."""
        known = [(p.cached, p.size) for p in self.prepared if p.cached is not None]
        if not known:
            return None
        size = sum(n for _, n in known)
        return sum(c * n for c, n in known) / size if size else 0.0


class LoadScenario(Scenario):
    kind: ClassVar[str] = "load"
    activity: ClassVar[str] = "loading"
    measures_load: ClassVar[bool] = True
    engine_method: ClassVar[str] = "load"
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "image-encoder")

    def tokens_floor(self, spec: WorkloadSpec) -> int:
        return 0

    def runtime_bytes(self, model: ModelSpec, spec: WorkloadSpec, input_tokens: int) -> int:
        return 0  # the weights are the whole need of a load

    def load_rounds(
        self,
        spec: WorkloadSpec,
        engine: Engine,
        backend: Backend,
        store: CheckpointStore,
        record: Record,
        load: Loader,
    ) -> Optional[Timing]:
        backend.reset_peak_memory()
        rounds: list[_Round] = []
        note = ""
        for _ in range(spec.rounds):
            imported = import_libraries(engine.libraries, backend)
            wrapped = FileCacheStore(store, spec.file_cache)
            for directory in named_checkpoints(spec):
                wrapped.prepared.append(set_file_cache(directory, spec.file_cache))
            loaded = load(cast("CheckpointStore", wrapped))
            if loaded is None:
                return None
            note = loaded.note  # how the engine ran (placement, quantization)
            rounds.append(_Round(loaded.load_time_s, imported, wrapped.prepared))
            # The cache holds the model; a reference here would keep its weights alive through
            # the next round's eviction (safetensors maps the checkpoint's pages).
            del loaded
        fill(record, spec, engine, rounds, note)
        return Timing(
            warmup_s=0.0,
            e2e=[r.load_s for r in rounds],
            peak_memory_bytes=backend.peak_memory_bytes(),
        )


def fill(
    record: Record, spec: WorkloadSpec, engine: Engine, rounds: list[_Round], note: str
) -> None:
    """import_s and page_cached_fraction per round, the file cache the loads really started from,
    and the note saying what import_s covers and whether the eviction worked."""
    record.metrics["import_s"] = MetricValue.from_samples(
        "import_s", [r.imported.seconds for r in rounds]
    )
    fractions = [r.cached for r in rounds]
    if None not in fractions:
        record.metrics["page_cached_fraction"] = MetricValue.from_samples(
            "page_cached_fraction", cast("list[float]", fractions)
        )
    label, cache_note = file_cache_state(spec.file_cache, rounds)
    record.workload["file_cache"] = label
    notes = [note, import_note(engine.libraries, rounds), cache_note]
    record.note = "; ".join(n for n in notes if n)


def import_note(libraries: Sequence[str], rounds: list[_Round]) -> str:
    if not libraries:
        return "import_s covers nothing: the engine names no libraries to import before its load"
    first = rounds[0].imported
    text = (
        f"import_s covers importing {', '.join(first.imported)}"
        if first.imported
        else "import_s covers nothing: the engine's libraries were imported before the round"
    )
    if first.present and first.imported:
        text += f" ({', '.join(first.present)} imported before the round, not in import_s)"
    if len(rounds) > 1:
        text += "; rounds after the first shared its process and found them imported"
    return text


def file_cache_state(mode: str, rounds: list[_Round]) -> tuple[str, str]:
    """(the file cache the loads started from, the sentence saying how that was made)."""
    prepared = [p for r in rounds for p in r.prepared]
    if not prepared:
        return "none", "file_cache does not apply: the engine read no checkpoint from disk"
    problem = next((p.problem for p in prepared if p.problem), "")
    if problem:
        return "warm", f"asked for a cold file cache, but {problem}: these are warm numbers"
    last = rounds[-1].prepared or prepared
    files, size = sum(p.files for p in last), sum(p.size for p in last)
    what = f"{files} checkpoint files ({format_value(size, 'B')})"
    if mode == "warm":
        text = f"file cache warm: {what} read once before each load"
    else:
        text = f"file cache cold: {what} evicted with posix_fadvise(DONTNEED) before each load"
    known = [c for c in (r.cached for r in rounds) if c is not None]
    if not known:
        return mode, text + " (not verified: no mincore here)"
    if mode == "cold" and max(known) > 0.5:
        return "warm", text + (
            ", but most of it stayed in the page cache (see page_cached_fraction: pages another "
            "process maps, or a file system such as tmpfs that keeps them): warm numbers"
        )
    if mode == "cold" and max(known) > INCOMPLETE:
        return mode, text + ", but part of it stayed in the page cache (see page_cached_fraction)"
    if mode == "warm" and min(known) < 1 - INCOMPLETE:
        return mode, text + ", but part of it was not in the page cache (too little memory?)"
    return mode, text
