"""Baseline files: their format, where they live, and how they are merged and written safely.

A baseline is ``<root>/<device-key>[@<label>]/<suite>.json``, reviewed in git. Three things
shape this module:

* Files are diffed by humans, so they are written deterministically: sorted keys, floats cut
  to a fixed number of significant digits, a trailing newline. Re-writing the same data gives
  the same bytes, so a reviewer sees only what really changed.
* Files are shared: ``pytest -n 8`` workers, ``llmperf baselines record --runs N`` and a second
  CI job on the same node may update one file at once. Every write re-reads the file under a
  lock and merges into it, so no writer drops another's entries.
* Files must never be lost or half-written (a killed CI job, a full disk, an OOM kill). Writes
  go to a temporary file in the same directory that is fsynced and then renamed over the old
  one, so a reader sees either the old file or the new one. A corrupt file is never
  "repaired" by overwriting it: the error names the file and the field, and nothing is written.

Nothing here imports pytest or torch; the plugin, the verdict and the CLI all call it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import filelock

from .results import Record
from .units import utc_now

SCHEMA_VERSION = 1

#: Significant digits kept for every float. Six is far below run-to-run noise (≈1%) and keeps
#: a re-run's diff from touching digits that mean nothing.
FLOAT_DIGITS = 6

#: Longest device key or label; a path component must stay well under filesystem limits (255)
#: with ``@<label>`` and the suite appended.
MAX_COMPONENT = 100

#: How long a writer waits for another writer's lock before giving up. A writer holds it for
#: milliseconds; waiting forever would hang a CI job on a broken (e.g. network) filesystem.
LOCK_TIMEOUT_S = 300.0

#: Outcomes a baseline stores. ``error`` means nothing was measured: never stored, never gated.
STORED_OUTCOMES = ("ok", "oom")

_PathLike = Union[str, "os.PathLike[str]"]
_MISSING: Any = object()


class BaselineError(Exception):
    """A baseline file that cannot be used, named precisely enough to fix it by hand.

    The message is one line, ``<path>: <field path>: <what is wrong>; <what would be right>``,
    e.g. ``baselines/cpu-x/test_a.json: entries['k'].runs[0].metrics.e2e_latency_s.median:
    expected a number, got 'abc'``.
    """

    def __init__(self, path: _PathLike | str, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: {field}: " if field else f"{self.path}: "
        super().__init__(where + problem)


# ---------------------------------------------------------------------------------------------
# Names and paths


def safe_component(text: str) -> str:
    """Turn a device name or label into one safe, stable path component.

    Device names come from drivers ("NVIDIA A100-SXM4-80GB") and labels from users, and both
    end up as a directory name in git, on Linux, macOS and Windows checkouts alike. So: accents
    folded to ASCII, lowercase, only ``[a-z0-9._-]``, any other run of characters becomes one
    ``-``, no leading or trailing ``.``/``-`` (no hidden directories, no ``..``). A name with
    nothing usable left maps to a short hash of itself rather than to a shared fallback, so two
    different non-Latin labels never share a directory. Over-long names keep a hash suffix for
    the same reason.
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    safe = re.sub(r"[^a-z0-9._-]+", "-", folded.lower()).strip(".-")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if not safe:
        return "unknown" if not text.strip() else f"x-{digest[:12]}"
    if len(safe) > MAX_COMPONENT:
        safe = safe[: MAX_COMPONENT - 13].rstrip(".-") + f"-{digest[:12]}"
    return safe


def _check_suite(suite: str) -> str:
    # The suite is a test file's stem and is used as-is (case kept) so the file name matches
    # the test file; it only has to be one harmless path component.
    if (
        not isinstance(suite, str)
        or not suite
        or suite in (".", "..")
        or suite.startswith(".")
        or any(c in suite for c in "/\\\0")
    ):
        raise ValueError(
            f"suite {suite!r} is not usable as a file name; expected a test file's stem "
            "such as 'test_generation_latency'"
        )
    return suite


def device_dir(root: _PathLike, device_key: str, label: str | None = None) -> Path:
    """``root / "<device-key>[@<label>]"``: one directory per hardware (and label).

    Both parts go through :func:`safe_component` (idempotent on an already-safe key), and
    ``@`` never survives it, so the split between key and label stays unambiguous.
    """
    name = safe_component(device_key)
    if label:
        name += "@" + safe_component(label)
    return Path(root) / name


def baseline_path(root: _PathLike, device_key: str, suite: str, label: str | None = None) -> Path:
    """The baseline file of one test file (``suite``) on one device."""
    return device_dir(root, device_key, label) / f"{_check_suite(suite)}.json"


# ---------------------------------------------------------------------------------------------
# The file in memory


@dataclass
class BaselineFile:
    """One loaded baseline file. ``entries`` maps a baseline key to its runs, oldest first."""

    path: Path
    suite: str
    device: dict[str, Any]
    entries: dict[str, list[dict[str, Any]]]

    def runs(self, key: str) -> list[dict[str, Any]]:
        """The stored runs of ``key``, oldest first; empty when the key has no baseline."""
        return self.entries.get(key, [])

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "suite": self.suite,
            "device": self.device,
            "entries": {key: {"runs": runs} for key, runs in self.entries.items()},
        }


@dataclass
class Change:
    """What :func:`update` did to one entry, for the summary line and the reviewer.

    ``action`` is ``added`` (no history before), ``appended``, ``restarted`` (versions or
    performance-relevant environment changed, so older runs no longer describe this stack; or
    a confirmed change of level), ``reset`` (asked for with ``--llmperf-reset-baselines``) or
    ``unchanged`` (the run was stored already).
    """

    key: str
    action: str
    detail: str

    def __str__(self) -> str:
        return f"{self.key}: {self.action} ({self.detail})"


# ---------------------------------------------------------------------------------------------
# Deterministic serialization


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite number {obj!r}; baselines hold finite numbers only")
        rounded = float(f"{obj:.{FLOAT_DIGITS}g}")
        return rounded + 0.0  # -0.0 -> 0.0: the same value must give the same bytes
    if isinstance(obj, Mapping):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v) for v in obj]
    return obj  # json.dumps names the type it cannot serialize


def dumps(data: Mapping[str, Any]) -> str:
    """Serialize ``data`` the one way baseline files are written, so git diffs stay minimal.

    Sorted keys, two-space indent, floats rounded to :data:`FLOAT_DIGITS` significant digits
    (ints stay ints: byte counts are exact), UTF-8 text rather than ``\\u`` escapes, and a
    trailing newline. NaN and infinity raise ``ValueError``: they are not JSON, and a baseline
    that holds one gates nothing.
    """
    text = json.dumps(
        _round_floats(data), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False
    )
    return _NUMBER_LIST.sub(_one_line, text) + "\n"


# A list of plain numbers (samples, token ids) spread one per line would make every update a
# diff of hundreds of lines; on one line, a reviewer sees one changed line per metric.
_NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-0-9.eE+]*(?:\s*,\s*-?[0-9][-0-9.eE+]*)*)\s*\]")


def _one_line(match: re.Match[str]) -> str:
    return "[" + ", ".join(part.strip() for part in match.group(1).split(",")) + "]"


# ---------------------------------------------------------------------------------------------
# Reading and validating


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


class _NonFinite(Exception):
    def __init__(self, token: str) -> None:
        self.token = token


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; in a baseline that is a botched merge.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise _NonFinite(token)


def _parse(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise BaselineError(
            path,
            None,
            f"key {exc.key!r} appears twice in one object (a bad merge?); "
            "each key may appear once — keep one and delete the other",
        ) from None
    except _NonFinite as exc:
        raise BaselineError(
            path, None, f"holds {exc.token}, which is not a number; expected finite numbers only"
        ) from None
    except RecursionError:
        raise BaselineError(
            path, None, "nested too deeply to be a baseline file; restore it from git"
        ) from None
    except json.JSONDecodeError as exc:
        if not text.strip():
            problem = "empty file; expected a baseline JSON object — restore it from git"
        elif re.search(r"^(<{7}|>{7})( |$)", text, re.MULTILINE):
            problem = (
                "unresolved git merge conflict markers; resolve the conflict "
                "(or re-record the baseline) and keep valid JSON"
            )
        elif exc.pos >= len(text.rstrip()):
            problem = (
                f"not valid JSON: the text ends early at line {exc.lineno} (truncated?); "
                "restore the file from git"
            )
        else:
            problem = (
                f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                "fix that spot or restore the file from git"
            )
        raise BaselineError(path, None, problem) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BaselineError(path, None, f"not a usable JSON file ({first})") from None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # a 400-digit integer is valid JSON but no measurement
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub(field: str, name: str) -> str:
    # Identifier-like names read best dotted (metrics.e2e_latency_s); anything else, such as a
    # baseline key with brackets and commas, is quoted so the field path stays unambiguous.
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return f"{field}.{name}" if field else name
    return f"{field}[{name!r}]"


class _Checker:
    """Validates parsed JSON, raising a :class:`BaselineError` that names file and field."""

    def __init__(self, path: _PathLike | str) -> None:
        self.path = path

    def fail(self, field: str, expected: str, value: Any = _MISSING) -> None:
        if value is _MISSING:
            raise BaselineError(self.path, field, f"missing; expected {expected}")
        raise BaselineError(self.path, field, f"expected {expected}, got {_describe(value)}")

    def get(
        self,
        obj: dict[str, Any],
        parent: str,
        name: str,
        ok: Any,
        expected: str,
        *,
        required: bool = True,
    ) -> Any:
        field = _sub(parent, name)
        if name not in obj:
            if required:
                self.fail(field, expected)
            return None
        value = obj[name]
        if not ok(value):
            self.fail(field, expected, value)
        return value

    def str_map(self, obj: dict[str, Any], parent: str, name: str) -> None:
        mapping = self.get(
            obj, parent, name, lambda v: isinstance(v, dict), "an object", required=False
        )
        for key, value in (mapping or {}).items():
            if not (value is None or isinstance(value, str)):
                self.fail(_sub(_sub(parent, name), key), "a string or null", value)

    def run(self, run: Any, field: str) -> None:
        if not isinstance(run, dict):
            self.fail(field, "an object (one run)", run)
        self.get(run, field, "date", lambda v: isinstance(v, str), "an ISO 8601 date string")
        self.get(
            run,
            field,
            "outcome",
            lambda v: v in STORED_OUTCOMES,
            "'ok' or 'oom' (error outcomes are never stored)",
        )
        metrics = self.get(run, field, "metrics", lambda v: isinstance(v, dict), "an object")
        for name, summary in metrics.items():
            self.metric(summary, _sub(_sub(field, "metrics"), name))
        self.get(
            run,
            field,
            "output_digest",
            lambda v: v is None or isinstance(v, str),
            "a string or null",
            required=False,
        )
        self.get(
            run,
            field,
            "output_head",
            lambda v: v is None or (isinstance(v, list) and all(_is_int(t) for t in v)),
            "a list of token ids (integers) or null",
            required=False,
        )
        provenance = self.get(
            run, field, "provenance", lambda v: isinstance(v, dict), "an object", required=False
        )
        if provenance is not None:
            pfield = _sub(field, "provenance")
            self.str_map(provenance, pfield, "versions")
            self.str_map(provenance, pfield, "env")

    def metric(self, summary: Any, mfield: str) -> None:
        if not isinstance(summary, dict):
            self.fail(mfield, "an object with median and samples", summary)
        # Every metric is a duration, a size, a rate or a fraction: never negative. A
        # negative median (a hand edit gone wrong) would make every run "regressed".
        self.get(
            summary,
            mfield,
            "median",
            lambda v: v is None or (_is_number(v) and v >= 0),
            "a number ≥ 0",
        )
        samples = self.get(
            summary, mfield, "samples", lambda v: isinstance(v, list), "a list of numbers"
        )
        for i, sample in enumerate(samples):
            if not _is_number(sample) or sample < 0:
                self.fail(f"{mfield}.samples[{i}]", "a number ≥ 0", sample)
        self.get(summary, mfield, "unit", lambda v: isinstance(v, str), "a string", required=False)
        self.get(
            summary,
            mfield,
            "direction",
            lambda v: v in ("lower", "higher"),
            "'lower' or 'higher'",
            required=False,
        )

    def file(self, data: Any, path: Path) -> BaselineFile:
        if not isinstance(data, dict):
            self.fail("(top level)", "a JSON object", data)
        if "schema" not in data:
            self.fail("schema", f"the schema version, {SCHEMA_VERSION}")
        schema = data["schema"]
        if not _is_int(schema):
            self.fail("schema", f"an integer schema version ({SCHEMA_VERSION})", schema)
        if schema != SCHEMA_VERSION:
            if schema > SCHEMA_VERSION:
                problem = (
                    f"version {schema} is newer than this pytest-llmperf reads "
                    f"({SCHEMA_VERSION}); upgrade pytest-llmperf"
                )
            else:
                problem = f"unknown version {schema}; expected {SCHEMA_VERSION}"
            raise BaselineError(self.path, "schema", problem)
        suite = self.get(
            data, "", "suite", lambda v: isinstance(v, str) and v, "the suite name (a string)"
        )
        device = self.get(data, "", "device", lambda v: isinstance(v, dict), "an object")
        self.get(
            device, "device", "key", lambda v: isinstance(v, str) and v, "the device key string"
        )
        entries = self.get(data, "", "entries", lambda v: isinstance(v, dict), "an object")
        out: dict[str, list[dict[str, Any]]] = {}
        for key, entry in entries.items():
            efield = f"entries[{key!r}]"
            if not isinstance(entry, dict):
                self.fail(efield, "an object with runs", entry)
            runs = self.get(entry, efield, "runs", lambda v: isinstance(v, list), "a list of runs")
            for i, run in enumerate(runs):
                self.run(run, f"{efield}.runs[{i}]")
            out[key] = runs
        return BaselineFile(path=path, suite=suite, device=device, entries=out)


def load(path: _PathLike) -> BaselineFile | None:
    """Read and validate one baseline file; ``None`` when it does not exist.

    Anything else that is wrong — not UTF-8, not JSON, truncated, merge-conflict markers,
    a newer schema, a missing field, a wrong type — raises :class:`BaselineError` naming the
    file and the field, because gating against a half-understood baseline is worse than
    stopping.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise BaselineError(
                path,
                None,
                f"is a symbolic link to {os.readlink(path)}, which does not exist; "
                "fix the link or remove it",
            ) from None
        return None
    except OSError as exc:
        raise BaselineError(path, None, f"cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BaselineError(path, None, "is a directory; expected a baseline JSON file")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO would block for ever waiting for a writer.
        raise BaselineError(
            path,
            None,
            "is not a regular file (a FIFO, socket or device); expected a baseline JSON file",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BaselineError(
            path, None, f"cannot read ({exc.strerror or exc}); check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors add
    except UnicodeDecodeError as exc:
        raise BaselineError(
            path, None, f"not UTF-8 text (byte {exc.start}); expected a JSON file"
        ) from None
    return _Checker(path).file(_parse(text, path), path)


def load_dir(root: _PathLike) -> dict[tuple[str, str], BaselineFile]:
    """Every baseline under ``root``, keyed ``(device directory name, suite)``.

    The device directory name (``cuda-nvidia-a100-sxm4-80gb@sdk2``) is the key rather than the
    file's device dict so ``show`` and ``diff`` match exactly what sits in git. Hidden files,
    lock files and temporary files are not baselines and are skipped. A missing ``root``
    raises ``FileNotFoundError``: comparing against nothing must not look like "no changes".
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such baselines directory")
    out: dict[tuple[str, str], BaselineFile] = {}
    for directory in sorted(root.iterdir()):
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        for file in sorted(directory.glob("*.json")):
            if file.name.startswith("."):
                continue
            loaded = load(file)
            if loaded is not None:
                out[(directory.name, file.stem)] = loaded
    return out


# ---------------------------------------------------------------------------------------------
# Records, provenance and versions


def record_to_run(record: Record, date: str | None = None) -> dict[str, Any]:
    """One stored run from one measured :class:`Record`.

    ``date`` defaults to the record's provenance date, then to now (UTC). The run goes through
    the same rounding and validation as a file on disk, so what is compared in memory is what
    a later load returns, and a bad value (NaN, an object that is not JSON) is refused here,
    by test key, instead of corrupting the file. ``error`` records raise ``ValueError``: an
    error measured nothing and must not become anyone's baseline.
    """
    if record.outcome not in STORED_OUTCOMES:
        raise ValueError(
            f"record {record.key!r}: outcome {record.outcome!r} is never stored in a baseline; "
            f"only {' and '.join(repr(o) for o in STORED_OUTCOMES)} are"
        )
    provenance = record.provenance or {}
    try:
        # A run is one process: never a combination's per-process medians.
        metrics = {
            name: {k: v for k, v in value.to_json().items() if k != "processes"}
            for name, value in sorted(record.metrics.items())
        }
    except KeyError as exc:
        raise ValueError(f"record {record.key!r}: {exc.args[0]}") from None
    run: dict[str, Any] = {
        "date": date or provenance.get("date") or utc_now(),
        "outcome": record.outcome,
        "metrics": metrics,
        "provenance": provenance,
    }
    if record.output_digest is not None:
        run["output_digest"] = record.output_digest
    if record.output_head is not None:
        run["output_head"] = list(record.output_head)
    try:
        run = json.loads(dumps(run))  # a deep copy, rounded exactly as written
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record {record.key!r}: cannot be stored as JSON: {exc}") from None
    try:
        _Checker(f"record {record.key!r}").run(run, "run")
    except BaselineError as exc:
        raise ValueError(str(exc)) from None
    return run


def perf_versions(provenance: Mapping[str, Any]) -> dict[str, str]:
    """The part of a run's provenance that can change performance: what an upgrade changes.

    Package and SDK versions (``provenance["versions"]``) plus performance-relevant
    environment variables (``provenance["env"]``, prefixed ``env:``). The git commit, date and
    hostname are left out on purpose: they change on every run and say nothing about whether
    older runs still describe the same software stack. A ``None`` value counts as absent.
    """
    out: dict[str, str] = {}
    for name, value in (provenance.get("versions") or {}).items():
        if value is not None:
            out[str(name)] = str(value)
    for name, value in (provenance.get("env") or {}).items():
        if value is not None:
            out[f"env:{name}"] = str(value)
    # How ttft/tpot were stamped (device events or a sync per token) changes the numbers as an
    # upgrade does. Runs stored before the method was recorded were all sync-clock.
    out["timing_method"] = str(provenance.get("timing_method") or "sync-clock")
    return out


def _as_versions(data: Mapping[str, Any]) -> dict[str, str]:
    # Accept a whole provenance dict too: passing one by mistake would otherwise print
    # "versions {...} → {...}", which reads like an answer but is not one.
    if isinstance(data.get("versions"), Mapping) or isinstance(data.get("env"), Mapping):
        return perf_versions(data)
    return {str(k): str(v) for k, v in data.items() if v is not None}


def version_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`perf_versions` dicts, one line per name, sorted by name.

    ``["env:OMP_NUM_THREADS 4 → 2", "torch 2.12.0 → 2.13.0", "transformers (none) → 5.23.0"]``.
    Provenance dicts are accepted as well and reduced with :func:`perf_versions` first.
    """
    a, b = _as_versions(old), _as_versions(new)
    return [
        f"{name} {a.get(name, '(none)')} → {b.get(name, '(none)')}"
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name)
    ]


# ---------------------------------------------------------------------------------------------
# Locked, atomic writing


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _temp_name(path: Path) -> Path:
    # Hidden and ending in .tmp, so load_dir and "*.json" globs never mistake it for a baseline.
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def _stale_temps(path: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    try:
        return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where os.replace is enough.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file that could not be written; the message names it, and nothing was changed."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _make_dirs(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"{directory}: cannot create the directory ({exc.strerror or exc})", exc.errno
        ) from None


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash at any point leaves old or new, whole.

    The replaced file keeps its permission bits (a baseline made read-only for others stays
    so). A symbolic link is never replaced by a regular file: that would silently cut the
    link to wherever the user keeps the real file. Any failure (a full disk, no permission)
    raises :class:`WriteError` naming ``path``; the old file is then untouched.
    """
    path = Path(path)
    if path.is_symlink():
        raise WriteError(
            f"{path}: is a symbolic link; refusing to replace it with a regular file — "
            "point the option at the real directory, or remove the link"
        )
    mode = None
    with suppress(FileNotFoundError):
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise WriteError(f"{path}: exists and is not a regular file; refusing to replace it")
        mode = stat.S_IMODE(st.st_mode)
    data = text.encode("utf-8")
    tmp = _temp_name(path)
    try:
        # 0o666 minus the umask, like any file the user writes (mkstemp's 0o600 would hide the
        # baselines from the other accounts on a shared node).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise WriteError(
            f"{path}: not written ({exc.strerror or exc}); the previous file is unchanged",
            exc.errno,
        ) from None
    _fsync_dir(path.parent)


def _lock_path(path: Path) -> Path:
    """Where the lock of ``path`` lives: outside the baselines tree, so ``git add baselines``
    never picks it up, but keyed by the real path, so every writer of one file takes one lock.

    The directory is shared by all users of the node (like /tmp itself), since two accounts
    may update the same checkout's baselines.
    """
    real = os.path.realpath(path)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    directory = Path(tempfile.gettempdir()) / "pytest-llmperf-locks"
    if not directory.is_dir():
        with suppress(OSError):
            directory.mkdir(mode=0o1777)
            os.chmod(directory, 0o1777)  # mkdir's mode is cut by the umask
    _forget_old_locks(directory)
    return directory / f"{digest}.lock"


_LOCK_MAX_AGE_S = 7 * 24 * 3600
_locks_swept = False


def _forget_old_locks(directory: Path) -> None:
    """Once per process, remove lock files untouched for a week: a lock is held for
    milliseconds, so nobody waits on one that old, and the directory stays small."""
    global _locks_swept
    if _locks_swept:
        return
    _locks_swept = True
    cutoff = time.time() - _LOCK_MAX_AGE_S
    with suppress(OSError):
        for entry in os.scandir(directory):
            with suppress(OSError):
                if entry.name.endswith(".lock") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the per-file lock; then remove temp files that only a killed writer can have left.

    Every writer creates its temp file while holding this lock, so once we hold it any temp
    file of this baseline belongs to a dead process.
    """
    lock = filelock.FileLock(str(_lock_path(path)), timeout=LOCK_TIMEOUT_S, mode=0o666)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BaselineError(
            path,
            None,
            f"could not take the lock {lock.lock_file} within {LOCK_TIMEOUT_S:g} s; "
            "another process is updating this baseline — let it finish and retry",
        ) from None
    except OSError as exc:
        raise BaselineError(
            path, None, f"cannot create the lock file {lock.lock_file} ({exc.strerror or exc})"
        ) from None
    try:
        for stale in _stale_temps(path):
            with suppress(OSError):
                stale.unlink()
        yield
    finally:
        lock.release()


def update(
    path: _PathLike,
    records: Sequence[Record],
    *,
    device: Mapping[str, Any],
    suite: str,
    keep_runs: int = 5,
    reset: bool = False,
    append_only: bool = False,
    now: str | None = None,
) -> list[Change]:
    """Merge this session's records into the baseline file at ``path``; one :class:`Change` each.

    Under the file's lock the current file is re-read, so entries that another process wrote
    meanwhile, and entries of tests that did not run now, are kept untouched. For each stored
    record (``ok`` or ``oom``; ``error`` records are skipped) a run is appended and the history
    trimmed to the newest ``keep_runs``. When the versions or performance-relevant environment
    differ from the newest stored run, the older runs describe another software stack, so the
    history restarts with this run and the change says what differed; a record whose
    ``change`` is set (a regression or improvement confirmed by re-measuring) restarts it too,
    as a new level. ``reset=True`` starts every touched history afresh with this session's
    runs. A history started by this call is appended to by later runs of the same key in the
    same call; ``append_only=True`` (runs 2…N of ``llmperf baselines record``) never restarts
    a history. A run already stored is not stored again. A corrupt existing file raises
    :class:`BaselineError` and nothing is written: it is
    the user's to fix, not ours to overwrite. ``now`` fixes the runs' date (tests, CLI).
    """
    path = Path(path)
    _check_suite(suite)
    if not _is_int(keep_runs) or keep_runs < 1:
        raise ValueError(f"keep_runs must be a whole number of runs ≥ 1, got {keep_runs!r}")
    device = dict(device)
    if not isinstance(device.get("key"), str) or not device["key"]:
        raise ValueError(f"device must have a non-empty 'key' string, got {device!r}")
    new_runs = _new_runs(records, suite, device["key"], now)
    if not new_runs:
        return []
    _make_dirs(path.parent)
    with _locked(path):
        current = load(path)
        if current is not None and current.suite != suite:
            raise BaselineError(
                path, "suite", f"expected {suite!r} (the file's suite), got {current.suite!r}"
            )
        entries = dict(current.entries) if current is not None else {}
        changes = _apply(entries, new_runs, keep_runs, reset, append_only)
        # A file shared through device_aliases keeps the device it was started on.
        aliased = any((r.provenance or {}).get("device_key") for r in records)
        kept = current.device if current is not None and aliased else device
        merged = BaselineFile(path=path, suite=suite, device=kept, entries=entries)
        atomic_write(path, dumps(merged.to_json()))
    return changes


_NewRun = tuple[str, dict[str, Any], Optional[str], bool]


def _new_runs(
    records: Sequence[Record], suite: str, device_key: str, now: str | None
) -> list[_NewRun]:
    """(key, run, confirmed change, contended) of the records to store, checked to belong here."""
    out = []
    for record in records:
        if record.outcome not in STORED_OUTCOMES:
            continue
        if record.suite != suite:
            raise ValueError(
                f"record {record.key!r} belongs to suite {record.suite!r}, not {suite!r}; "
                "records go to their own suite's file"
            )
        if record.device_key and record.device_key != device_key:
            raise ValueError(
                f"record {record.key!r} was measured on {record.device_key!r}, "
                f"not {device_key!r}; records go to their own device's file"
            )
        out.append((record.key, record_to_run(record, date=now), record.change, record.contended))
    return out


def _apply(
    entries: dict[str, list[dict[str, Any]]],
    new_runs: list[_NewRun],
    keep_runs: int,
    reset: bool,
    append_only: bool,
) -> list[Change]:
    changes: list[Change] = []
    # Keys whose history this call started: later runs of the same key in the same call
    # (record --runs N, accept of several results files) append to it.
    started: set[str] = set()
    for key, run, level, contended in new_runs:
        old = entries.get(key, [])
        history, change = _merge(key, old, run, level, reset, append_only or key in started)
        if history is None:
            changes.append(change)
            continue
        if change.action != "appended":
            started.add(key)
        entries[key] = history[-keep_runs:]
        if change.action == "appended":
            dropped = len(history) - len(entries[key])
            change.detail = f"{len(entries[key])} runs kept" + (
                f", {dropped} oldest dropped" if dropped else ""
            )
            if contended:
                change.detail += "; measured on a busy or shared device, so never a new level"
        changes.append(change)
    return changes


def store_records(
    root: _PathLike,
    records: Sequence[Record],
    *,
    devices: Mapping[str, Mapping[str, Any]],
    label: str | None = None,
    keep_runs: int = 5,
    reset: bool = False,
    append_only: bool = False,
) -> tuple[list[Change], list[str]]:
    """Merge records into their files, one per device key and suite: (changes, errors).

    ``devices`` maps anything to device info dicts with a ``key`` (the file's ``device``
    field); a device without one is described by its key and backend alone. A file that
    cannot be updated (corrupt, unwritable) is an error line naming it; the others still are.
    """
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        if record.outcome in STORED_OUTCOMES:
            groups.setdefault((record.device_key, record.suite), []).append(record)
    by_key = {info.get("key"): dict(info) for info in devices.values()}
    changes: list[Change] = []
    errors: list[str] = []
    for (device_key, suite), group in sorted(groups.items()):
        device = by_key.get(device_key) or {"key": device_key, "backend": group[0].backend}
        try:
            changes += update(
                baseline_path(root, device_key, suite, label),
                group,
                device={**device, "key": device_key},
                suite=suite,
                keep_runs=keep_runs,
                reset=reset,
                append_only=append_only,
            )
        except (BaselineError, OSError, ValueError) as exc:
            errors.append(f"baselines not updated: {exc}")
    return changes, errors


def _same_run_stored(run: dict[str, Any], old: list[dict[str, Any]]) -> bool:
    run_id = (run.get("provenance") or {}).get("run_id")
    if run_id:
        return any((r.get("provenance") or {}).get("run_id") == run_id for r in old)
    return run in old


def _merge(
    key: str,
    old: list[dict[str, Any]],
    run: dict[str, Any],
    level: str | None,
    reset: bool,
    append_only: bool,
) -> tuple[list[dict[str, Any]] | None, Change]:
    """The entry's new history and what happened to it (history None: nothing to write)."""
    if not old:
        return [run], Change(key, "added", "1 run")
    if reset and not append_only:
        return [run], Change(key, "reset", f"history reset: {len(old)} old run(s) dropped")
    if _same_run_stored(run, old):
        # The same run stored twice (accepting one results file again) would count one
        # process twice in the between-run spread.
        return None, Change(key, "unchanged", "this run is already stored")
    if append_only:
        return old + [run], Change(key, "appended", "")
    diffs = version_changes(
        perf_versions(old[-1].get("provenance") or {}),
        perf_versions(run.get("provenance") or {}),
    )
    if diffs:
        return [run], Change(key, "restarted", "history restarted: " + ", ".join(diffs))
    if level is not None:
        # A confirmed change: one new run appended to K old ones would be outvoted by their
        # median, and the next plain run would fail again. The new level starts a history.
        return [run], Change(
            key,
            "restarted",
            f"new level: history restarted ({level}, confirmed by re-measuring; "
            f"{len(old)} old run(s) dropped)",
        )
    return old + [run], Change(key, "appended", "")


def prune(
    root: _PathLike,
    live_keys: set[tuple[str, str]],
    *,
    dry_run: bool = True,
    devices: set[str] | None = None,
    suites: set[str] | None = None,
) -> list[tuple[Path, str]]:
    """Entries under ``root`` that no collected test produces: ``(file, key)``, sorted.

    ``live_keys`` holds ``(suite, key)`` for every collected test; a key live on any device
    is kept on all of them. ``suites`` limits pruning to the files of those suites (the test
    files that were collected): ``prune test_b.py`` must not call test_a's entries stale.
    With ``dry_run=False`` the entries are removed, each file
    rewritten atomically under its lock (re-read there, so a concurrent update survives), a
    file left empty deleted, and an emptied device directory removed. The caller must collect
    the whole suite: keys outside a ``-k`` selection look dead.

    ``devices`` (device keys) limits pruning to those devices' directories (labels included):
    a CPU box collects only the tiny models, so every accelerator entry would look dead.
    """
    dead: list[tuple[Path, str]] = []
    for (device, suite), loaded in load_dir(root).items():
        if devices is not None and device.split("@", 1)[0] not in devices:
            continue
        if suites is not None and suite not in suites:
            continue
        dead.extend(
            (loaded.path, key) for key in sorted(loaded.entries) if (suite, key) not in live_keys
        )
    if dry_run:
        return dead
    by_file: dict[Path, set[str]] = {}
    for file, key in dead:
        by_file.setdefault(file, set()).add(key)
    for file, keys in by_file.items():
        with _locked(file):
            current = load(file)
            if current is None:
                continue
            entries = {k: v for k, v in current.entries.items() if k not in keys}
            if entries:
                current.entries = entries
                atomic_write(file, dumps(current.to_json()))
            else:
                file.unlink()
                _fsync_dir(file.parent)
        # Only once nothing else (another suite, a user's file) is left in it.
        with suppress(OSError):
            file.parent.rmdir()
    return dead


# ---------------------------------------------------------------------------------------------
# Baselines at a git revision


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    except FileNotFoundError:
        raise BaselineError(
            repo, None, "git is not installed; expected a git executable on PATH"
        ) from None


def materialize_git_rev(
    rev: str, subdir: _PathLike, repo: _PathLike, dest: _PathLike | None = None
) -> Path:
    """Export the baselines directory ``subdir`` as it was at git revision ``rev``; return it.

    For ``llmperf baselines diff git:REV NEW``: the old side is written to ``dest`` (default: a
    fresh temporary directory removed when the process exits) and the returned path, the
    exported ``subdir``, is read with :func:`load_dir` like any other. ``subdir`` is relative
    to ``repo`` (absolute paths inside ``repo`` are accepted). Blobs are read with
    ``git cat-file``, not by checking out, so the working tree and index are never touched.
    An unknown revision, a directory that is not a git repository, or a revision with no
    files under ``subdir`` raise :class:`BaselineError`.
    """
    repo = Path(repo)
    commit = _commit(repo, rev)
    sub = Path(subdir)
    if sub.is_absolute():
        try:
            sub = sub.resolve().relative_to(repo.resolve())
        except ValueError:
            raise BaselineError(sub, None, f"is outside the repository {repo}") from None
    rel = PurePosixPath(sub.as_posix())
    listing = _git(repo, "ls-tree", "-r", "-z", commit, "--", str(rel))
    if listing.returncode != 0:
        message = listing.stderr.decode(errors="replace").strip()
        raise BaselineError(f"git:{rev}", None, f"cannot list {rel}: {message}")
    if dest is None:
        out = Path(tempfile.mkdtemp(prefix="llmperf-git-"))
        atexit.register(shutil.rmtree, out, True)
    else:
        out = Path(dest)
    if not _export(repo, rev, listing.stdout, out):
        raise BaselineError(
            f"git:{rev}", None, f"has no files under {rel}; expected a baselines directory there"
        )
    return out.joinpath(*rel.parts)


def _commit(repo: Path, rev: str) -> str:
    if _git(repo, "rev-parse", "--git-dir").returncode != 0:
        raise BaselineError(repo, None, "not a git repository; expected a git checkout")
    if not rev or rev.startswith("-"):
        raise BaselineError(f"git:{rev}", None, "not a revision; expected a commit, branch or tag")
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise BaselineError(
            f"git:{rev}",
            None,
            f"unknown revision in {repo}; expected a commit, branch or tag (see git log)",
        )
    return found.stdout.decode().strip()


def _export(repo: Path, rev: str, listing: bytes, out: Path) -> int:
    """Write the regular files of an ``ls-tree -z`` listing under ``out``; how many."""
    wrote = 0
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, _, name = item.partition(b"\t")
        mode, kind, obj = meta.decode().split()
        member = PurePosixPath(name.decode("utf-8", "surrogateescape"))
        # Only regular files; a path escaping the target would be a hostile tree.
        if kind != "blob" or mode not in ("100644", "100755"):
            continue
        if member.is_absolute() or ".." in member.parts:
            continue
        blob = _git(repo, "cat-file", "blob", obj)
        if blob.returncode != 0:
            message = blob.stderr.decode(errors="replace").strip()
            raise BaselineError(f"git:{rev}", str(member), f"cannot read: {message}")
        target = out.joinpath(*member.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.stdout)
        wrote += 1
    return wrote
