"""Settings: one table of options, each readable from CLI, environment and ini, validated.

Precedence, most specific first: argument of the call > marker ``llmperf(...)`` > CLI > env >
ini > default. Every value is validated where it is read, and a bad one is reported with its
source ("--llmperf-rounds=abc", "env LLMPERF_ROUNDS=abc", "ini llmperf_rounds in tox.ini") and
what is allowed, because a perf gate that silently falls back to a default gates nothing.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .metrics import METRICS

MODEL_TIERS = ("auto", "tiny", "full")


class SettingError(ValueError):
    """A bad value; the message names its source and what is allowed."""


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise SettingError(f"expected an integer ≥ {minimum}") from None
        if value < minimum:
            raise SettingError(f"expected an integer ≥ {minimum}")
        return value

    return parse


def parse_fraction(text: Any, *, what: str = "tolerance") -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SettingError(f"expected a {what} fraction between 0 and 1, e.g. 0.03") from None
    if not 0 < value < 1:
        raise SettingError(f"expected a {what} fraction between 0 and 1 (exclusive), e.g. 0.03")
    return value


def parse_tolerance(text: str) -> dict[str, float]:
    """``0.03`` or ``e2e_latency_s=0.05,peak_memory_bytes=0.1`` → {"*": …, metric: …}."""
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in METRICS:
                raise SettingError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
            out[name] = parse_fraction(value)
        else:
            out["*"] = parse_fraction(part)
    if not out:
        raise SettingError("expected a fraction like 0.03 or metric=fraction,…")
    return out


def parse_alpha(text: Any) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SettingError("expected a significance level in (0, 0.5], e.g. 0.01") from None
    if not 0 < value <= 0.5:
        raise SettingError("expected a significance level in (0, 0.5], e.g. 0.01")
    return value


def parse_bool(text: Any) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingError("expected true/false (1/0, yes/no, on/off)")


def _seconds(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SettingError("expected a number of seconds ≥ 1") from None
    if not math.isfinite(value) or value < 1:
        raise SettingError("expected a number of seconds ≥ 1")
    return value


def _lock_seconds(text: str) -> float:
    usage = "expected a number of seconds ≥ 0 (0: fail at once when another job holds the device)"
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SettingError(usage) from None
    if not math.isfinite(value) or value < 0:
        raise SettingError(usage)
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        if value not in choices:
            raise SettingError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _models(text: str) -> str:
    """A tier or model names; names are checked where they are used (a path may exist only on
    the node that runs the suite)."""
    value = ",".join(part.strip() for part in str(text).split(",") if part.strip())
    if not value:
        raise SettingError("expected a tier (auto, tiny, full) or a comma-separated list of models")
    return value


def _backends(text: str) -> list[str]:
    from . import backends

    known = ["auto", *backends.names()]
    out = [part.strip() for part in str(text).split(",") if part.strip()]
    if not out:
        raise SettingError(f"expected one or more of {', '.join(known)} (comma-separated)")
    for name in out:
        if name not in known:
            raise SettingError(f"unknown backend {name!r}; allowed: {', '.join(known)}")
    return out


def parse_label(text: str) -> str:
    # A label is a directory name in git (baselines/<device-key>@<label>/). Only lowercase ASCII,
    # so two labels can never fold onto one directory: "café" and "cafe" would after accent
    # folding, "SDK2" and "sdk2" on a case-insensitive (macOS, Windows) checkout.
    value = str(text).strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value) or len(value) > 64:
        hint = ""
        folded = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip(".-")
        if folded and folded != value:
            hint = f" (e.g. {folded!r})"
        raise SettingError(
            "expected a name of lowercase ASCII letters, digits, '.', '_' or '-' (at most 64, "
            f"not starting with '.', '_' or '-'){hint}"
        )
    return value


def _path(text: str) -> str:
    value = str(text).strip()
    if not value:
        raise SettingError("expected a directory path")
    if "\0" in value:
        raise SettingError("a path cannot hold a NUL character")
    return value


def _file(text: str) -> str:
    if not str(text).strip():
        raise SettingError("expected a file path")
    return _path(text)


#: The checkpoint cache's default size cap (``--llmperf-cache-size``). 100 GiB holds two 7-8B
#: models in both dtypes of the shipped suite (bf16 + fp32: 38 GiB for bloomz-7b1, 45 GiB for
#: llama-3.1-8b), so a run alternating between two such models does not evict what it reuses
#: next, while ~/.cache stays bounded. Models of 70B and up (131 GiB and more in bf16) are beyond
#: any cap a home directory affords: they should come from their real checkpoint. A node with a
#: disk for the cache sets more, or 'unlimited'.
DEFAULT_CACHE_SIZE = 100 * 2**30
#: How the memory cap reaches worker children and ranks (the option's own variable, in bytes).
MEMORY_LIMIT_ENV = "LLMPERF_MEMORY_LIMIT"
#: The smallest memory cap: on a CPU host a worker runs under it as RLIMIT_DATA, and the
#: interpreter, torch and its OpenMP threads need about half a GiB before any model loads;
#: below that the worker itself dies (libgomp cannot start a thread) instead of a workload
#: being recorded oom.
MIN_MEMORY_LIMIT = 2**30
#: Above this a cap means nothing (and overflows RLIMIT_DATA's C long): say 'unlimited'.
MAX_MEMORY_LIMIT = 2**60


def parse_memory_limit(text: Any) -> Optional[int]:
    """``--llmperf-memory-limit``: a size between 1 GiB and 1 EiB, or ``unlimited``."""
    size = parse_size(text)
    if size is not None and size < MIN_MEMORY_LIMIT:
        raise SettingError(
            "below 1GiB: on a CPU host the interpreter, torch and its threads need about half of "
            "that before any model loads, so the worker process would die instead of a "
            "workload being recorded oom; give at least 1GiB"
        )
    if size is not None and size > MAX_MEMORY_LIMIT:
        raise SettingError("above 1 EiB; for no cap say 'unlimited'")
    return size


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: Any) -> Optional[int]:
    """``100GiB``, ``500MB``, ``1.5 TiB``, ``1073741824`` → bytes; ``unlimited`` → None.

    Single-letter units (``50G``) are refused: tools disagree on whether they mean GB or GiB, and
    7 % of a cap is a checkpoint evicted or kept.
    """
    value = str(text).strip()
    if value.lower() in ("unlimited", "none"):
        return None
    usage = (
        "expected a size such as 100GiB, 500MB or a number of bytes (units B, kB, MB, GB, TB, "
        "KiB, MiB, GiB, TiB), or 'unlimited'"
    )
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise SettingError(usage)
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise SettingError("expected a size > 0, e.g. 100GiB, or 'unlimited'")
    return size


def format_size(size: Optional[int]) -> str:
    """The text :func:`parse_size` reads back: how a child process learns the cap."""
    return "unlimited" if size is None else str(size)


@dataclass(frozen=True)
class Option:
    name: str  # "rounds" → --llmperf-rounds, ini llmperf_rounds, env LLMPERF_ROUNDS
    help: str
    parse: Callable[[str], Any]
    default: Any
    flag: bool = False
    env: bool = True

    @property
    def cli(self) -> str:
        return "--llmperf-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "llmperf_" + self.name

    @property
    def envvar(self) -> str:
        return "LLMPERF_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "backend",
        "backends to run on: auto (the accelerators present, else cpu) or a comma-separated "
        "list of cpu,cuda,hpu,neuron,xpu,mps",
        _backends,
        ["auto"],
    ),
    Option(
        "baselines",
        "baseline directory (default: baselines/ next to the ini file, else in the current "
        "directory; a relative ini value is read from the ini file's directory)",
        _path,
        None,
    ),
    Option(
        "update_baselines",
        "append this run to the baselines of the tests that ran",
        parse_bool,
        False,
        flag=True,
    ),
    Option(
        "reset_baselines",
        "start the baselines of the tests that ran afresh with this run",
        parse_bool,
        False,
        flag=True,
    ),
    Option(
        "label", "keep a separate baseline set: baselines/<device-key>@<label>/", parse_label, None
    ),
    Option(
        "tolerance",
        "allowed worsening as a fraction (default: the backend's, 0.03; cpu 0.08), or "
        "metric=fraction,…",
        parse_tolerance,
        {"*": 0.03},
    ),
    Option("alpha", "significance level of the statistical test (default 0.01)", parse_alpha, 0.01),
    Option(
        "family_alpha",
        "with --llmperf-processes above 1: the chance that a run of unchanged code shows any "
        "red; each of the run's gated comparisons is tested at min(alpha, family_alpha / "
        "comparisons) (Bonferroni; default 0.05)",
        parse_alpha,
        0.05,
    ),
    Option(
        "processes",
        "measure the selected tests in N fresh processes (N-1 child pytest runs, one at a time, "
        "then this one) and judge each workload on the N process medians (default 1)",
        _int(1),
        1,
    ),
    Option(
        "process_timeout",
        "seconds one child process of --llmperf-processes may take before it is killed and "
        "the run fails (default: 3 x the first child's time + 120 s for the later ones; the "
        "first gets --llmperf-timeout)",
        _seconds,
        None,
    ),
    Option("baseline_runs", "runs of history kept per baseline entry (default 5)", _int(1), 5),
    Option("no_gate", "measure and report, never fail on a verdict", parse_bool, False, flag=True),
    Option("strict", "a missing baseline fails instead of passing", parse_bool, False, flag=True),
    Option(
        "check_outputs",
        "fail when the greedy output differs from the baseline's",
        parse_bool,
        False,
        flag=True,
    ),
    Option("report", "directory for results.json, summary.md and plots", _path, None),
    Option(
        "models",
        "models the shipped suites run: a tier (auto: tiny on cpu, full on accelerators; tiny; "
        "full) or a comma-separated list of model names (catalog ids, registered names, "
        "checkpoint directories)",
        _models,
        "auto",
    ),
    Option(
        "prompts",
        "prompts of llmperf.generate_dataset: a .jsonl file (per line a JSON string or an "
        'object with a "prompt" or "text" field) or a .txt file (one prompt per line); a '
        "relative ini value is read from the ini file's directory (default: the prompts shipped "
        "with the plugin)",
        _file,
        None,
    ),
    Option("rounds", "timed rounds per workload (default 10, at least 5)", _int(5), 10),
    Option(
        "confirm",
        "re-measure a regressed workload up to N times; it fails only if every measurement "
        "regresses (default 2, 0 = off)",
        _int(0),
        2,
    ),
    Option("warmup", "warm-up calls per workload, not timed (default 2)", _int(0), 2),
    Option(
        "launcher",
        "where workloads run: auto (several devices: deepspeed for the DeepSpeed engines where "
        "it is installed, else torchrun; one device: this process), inline, process (a child "
        "process: crash isolation), torchrun, deepspeed (DeepSpeed's launcher; "
        "LLMPERF_DEEPSPEED_ARGS passes its --hostfile/--include through)",
        _choice(("auto", "inline", "process", "torchrun", "deepspeed")),
        "auto",
    ),
    Option(
        "timeout",
        "seconds a workload may run in a child process or rank group before it is killed and "
        "reported as an error (default 3600)",
        _seconds,
        3600.0,
    ),
    Option(
        "cache_dir",
        "where seeded checkpoints for multi-process runs are written (default "
        "~/.cache/pytest-llmperf)",
        _path,
        None,
    ),
    Option(
        "cache_size",
        "size cap of the checkpoint cache, e.g. 100GiB, 500MB or 'unlimited' (default 100GiB); "
        "least recently used seeded checkpoints are evicted to stay under it",
        parse_size,
        DEFAULT_CACHE_SIZE,
    ),
    Option(
        "memory_limit",
        "a memory cap, e.g. 2GiB: the memory check and the backend's free memory use it, so "
        "workloads above it are recorded as oom; on CPU child processes run under it "
        "(RLIMIT_DATA), so a real out-of-memory can happen (at least 1GiB; default: unlimited)",
        parse_memory_limit,
        None,
    ),
    Option(
        "lock_dir",
        "node-wide directory of the device locks that keep two jobs from measuring one "
        "accelerator at once (default /tmp/pytest-llmperf-locks; every job on the node must use "
        "the same)",
        _path,
        None,
    ),
    Option(
        "lock_timeout",
        "seconds a workload waits for a device another job holds before it is recorded as an "
        "error naming the holder (default 3600; 0 = fail at once)",
        _lock_seconds,
        3600.0,
    ),
    Option(
        "nvme_path",
        "a directory on this node's NVMe drive for DeepSpeed ZeRO workloads with "
        "engine_options={'offload': 'nvme'} (where the drive is mounted is the node's, not the "
        "workload's)",
        _path,
        None,
    ),
)


@dataclass
class Settings:
    """The resolved options, typed; ``sources`` says where each came from (for messages, and
    to tell a user's tolerance from the backend's default)."""

    backend: list[str] = field(default_factory=lambda: ["auto"])
    baselines: Optional[str] = None
    update_baselines: bool = False
    reset_baselines: bool = False
    label: Optional[str] = None
    tolerance: dict[str, float] = field(default_factory=lambda: {"*": 0.03})
    alpha: float = 0.01
    family_alpha: float = 0.05
    processes: int = 1
    process_timeout: Optional[float] = None
    baseline_runs: int = 5
    no_gate: bool = False
    strict: bool = False
    check_outputs: bool = False
    report: Optional[str] = None
    models: str = "auto"
    prompts: Optional[str] = None
    rounds: int = 10
    confirm: int = 2
    warmup: int = 2
    launcher: str = "auto"
    timeout: float = 3600.0
    cache_dir: Optional[str] = None
    nvme_path: Optional[str] = None
    lock_dir: Optional[str] = None
    lock_timeout: float = 3600.0
    cache_size: Optional[int] = DEFAULT_CACHE_SIZE
    memory_limit: Optional[int] = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Any]:
        """Every option's value by name (what results.json records of the run's settings)."""
        return {opt.name: getattr(self, opt.name) for opt in OPTIONS}


def resolve(
    cli: Callable[[str], Any],
    ini: Callable[[str], Any],
    inifile: str | None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Read every option from its most specific source; raise SettingError naming it.

    ``cli(name)`` returns the parsed command-line value or None when the option was not given;
    ``ini(key)`` returns the raw ini string or "" when unset.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    settings = Settings()
    where = f" in {inifile}" if inifile else ""
    for opt in OPTIONS:
        raw = cli(opt.name)
        if raw is not None and raw is not False:
            source = opt.cli if opt.flag else f"{opt.cli}={raw}"
        elif opt.env and env.get(opt.envvar, "") != "":
            raw = env[opt.envvar]
            source = f"env {opt.envvar}={raw}"
        elif str(ini(opt.ini) or "").strip():
            raw = ini(opt.ini)
            source = f"ini {opt.ini}={raw}{where}"
        else:
            setattr(settings, opt.name, opt.default)
            settings.sources[opt.name] = "default"
            continue
        try:
            setattr(settings, opt.name, opt.parse(raw))
        except SettingError as exc:
            raise SettingError(f"{source}: {exc}") from None
        settings.sources[opt.name] = source
    return settings


# -- marker ----------------------------------------------------------------------------------

MARKER_KEYS = ("tolerance", "alpha", "rounds", "warmup", "gate", "launcher")


def _gate_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        names: list[Any] = [value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    else:
        raise SettingError(
            "expected a metric name or a list of metric names, e.g. gate=['e2e_latency_s']"
        )
    for name in names:
        if not isinstance(name, str) or (name not in METRICS and name != "outcome"):
            raise SettingError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return tuple(names)


def _limit(value: Any) -> float:
    # Every metric is a duration, size, rate or fraction: a negative or NaN limit can only be a
    # typo, and would fail (or pass) every run for a reason nobody can see.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingError("expected a number ≥ 0 in the metric's unit")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError("expected a number ≥ 0 in the metric's unit") from None
    if not math.isfinite(number) or number < 0:
        raise SettingError("expected a finite number ≥ 0 in the metric's unit")
    return number


@dataclass(frozen=True)
class MarkerOptions:
    """``@pytest.mark.llmperf(...)`` of one test: what it overrides (None: not set there)."""

    tolerance: dict[str, float] = field(default_factory=dict)
    alpha: Optional[float] = None
    rounds: Optional[int] = None
    warmup: Optional[int] = None
    gate: Optional[tuple[str, ...]] = None
    launcher: Optional[str] = None
    limits: dict[str, float] = field(default_factory=dict)


def parse_marker(kwargs: Mapping[str, Any], where: str) -> MarkerOptions:
    """Validate ``@pytest.mark.llmperf(...)`` keywords; unknown keywords are usage errors."""
    out: dict[str, Any] = {}
    limits: dict[str, float] = {}
    for key, value in kwargs.items():
        source = f"{where}: marker llmperf({key}={value!r})"
        try:
            if key == "tolerance":
                out[key] = (
                    parse_tolerance(",".join(f"{k}={v}" for k, v in value.items()))
                    if isinstance(value, dict)
                    else {"*": parse_fraction(value)}
                )
            elif key == "alpha":
                out[key] = parse_alpha(value)
            elif key == "rounds":
                out[key] = _int(5)(value)
            elif key == "warmup":
                out[key] = _int(0)(value)
            elif key == "gate":
                out[key] = _gate_names(value)
            elif key == "launcher":
                out[key] = _choice(("auto", "inline", "process", "torchrun", "deepspeed"))(value)
            elif key.startswith(("max_", "min_")) and key[4:] in METRICS:
                limits[key] = _limit(value)
            else:
                allowed = ", ".join((*MARKER_KEYS, "max_<metric>", "min_<metric>"))
                known = [*MARKER_KEYS, *(f"{b}_{m}" for b in ("max", "min") for m in METRICS)]
                raise SettingError(
                    f"unknown keyword {key!r}{_did_you_mean(key, known)}; allowed: {allowed}"
                )
        except SettingError as exc:
            raise SettingError(f"{source}: {exc}") from None
    return MarkerOptions(limits=limits, **out)


# -- [tool.llmperf] and device aliases ----------------------------------------------------------


def tool_table(pyproject: Path | None) -> dict[str, Any]:
    """``[tool.llmperf]`` of a pyproject.toml, or {} (no file, no table).

    Parsed only when the text mentions the table: every pytest run loads this plugin, and most
    projects never configure it.
    """
    if pyproject is None or not pyproject.is_file():
        return {}
    try:
        raw = pyproject.read_bytes()
    except OSError as exc:
        raise SettingError(f"{pyproject}: cannot read ({exc.strerror})") from None
    if b"tool.llmperf" not in raw:
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingError(f"{pyproject}: not valid TOML ({exc})") from None
    table = data.get("tool", {}).get("llmperf", {})
    if not isinstance(table, dict):
        raise SettingError(f"{pyproject}: [tool.llmperf] must be a table")
    for key in table:
        if key not in TOOL_KEYS:
            raise SettingError(
                f"{pyproject}: [tool.llmperf] {key}: unknown key{_did_you_mean(key, TOOL_KEYS)}; "
                f"known: {', '.join(TOOL_KEYS)} (options go in [tool.pytest.ini_options] as "
                "llmperf_*)"
            )
    return table


#: Keys of ``[tool.llmperf]``: project settings that are not options.
TOOL_KEYS = ("device_aliases", "models")
#: ``llmperf baselines prune`` collects in a subprocess that writes the keys it found here.
KEYS_OUT_ENV = "LLMPERF_KEYS_OUT"
#: ``n/N``, set by ``llmperf baselines record`` for its runs: runs 2…N append to the history
#: run 1 started, whatever their verdict.
RECORD_RUN_ENV = "LLMPERF_RECORD_RUN"
#: Modules a worker process imports first (backends and engines a conftest registers in code).
WORKER_IMPORTS_ENV = "LLMPERF_WORKER_IMPORTS"
#: Environment variables of ours that are not options (set by the CLI and for workers).
#: Set in a child of --llmperf-processes: "k/N", and the directory its results go to
#: (processes.py: the child gates nothing, stores nothing, spawns nothing).
PROCESS_ENV = "LLMPERF_PROCESS"
PROCESS_REPORT_ENV = "LLMPERF_PROCESS_REPORT"
#: The pid whose process tree a worker or rank counts as "ours" in the load (noise.own_load).
FAMILY_ROOT_ENV = "LLMPERF_FAMILY_ROOT"
#: ``<holder pid>:<device id>,…``: the device locks a process holds, inherited by its children
#: so that they never take them again (devicelock.py).
LOCKS_HELD_ENV = "LLMPERF_DEVICE_LOCKS"
#: In a pytest-xdist worker pinned to one device: the visible-devices variables as they were
#: before (JSON, null for unset); a workload of several devices gives its ranks these back.
UNPINNED_ENV = "LLMPERF_XDIST_UNPINNED"
#: DeepSpeed launcher options passed through to its runner (``--hostfile``, ``--include``, …;
#: checked by launchers/deepspeed.py): read there, not an option of its own.
DEEPSPEED_ARGS_ENV = "LLMPERF_DEEPSPEED_ARGS"
INTERNAL_ENV = (
    DEEPSPEED_ARGS_ENV,
    LOCKS_HELD_ENV,
    UNPINNED_ENV,
    KEYS_OUT_ENV,
    RECORD_RUN_ENV,
    WORKER_IMPORTS_ENV,
    PROCESS_ENV,
    PROCESS_REPORT_ENV,
    FAMILY_ROOT_ENV,
)


def _did_you_mean(word: str, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_environment(environ: Mapping[str, str]) -> None:
    """A misspelt ``LLMPERF_*`` variable would be ignored while the user believes it set; a
    gate configured by accident is worse than one that refuses to start."""
    known = [opt.envvar for opt in OPTIONS if opt.env] + list(INTERNAL_ENV)
    for name in sorted(environ):
        if name.startswith("LLMPERF_") and name not in known:
            raise SettingError(
                f"env {name}: unknown variable{_did_you_mean(name, known)}; known: "
                + ", ".join(opt.envvar for opt in OPTIONS if opt.env)
            )


@dataclass(frozen=True)
class DeviceAliases:
    """Device keys (or glob patterns) mapped onto the device key whose baselines they share.

    Runner pools mix SKUs (A100 40 and 80 GB, SXM and PCIe, several CPU models); a project may
    decide, deliberately and visibly, that they gate against one baseline set.
    """

    mapping: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def resolve(self, device_key: str) -> str:
        for pattern, target in self.mapping:
            if pattern == device_key:
                return target
        import fnmatch

        for pattern, target in self.mapping:
            if fnmatch.fnmatchcase(device_key, pattern):
                return target
        return device_key


_DEVICE_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")


def device_aliases(ini_lines: list[str], ini_source: str, pyproject: Path | None) -> DeviceAliases:
    """Aliases from ini ``llmperf_device_aliases`` (lines ``KEY = TARGET``) and from
    ``[tool.llmperf] device_aliases = {KEY = TARGET}``; the ini lines come first."""
    pairs: list[tuple[str, str, str]] = []
    for line in ini_lines:
        if not line.strip():
            continue
        key, sep, target = line.partition("=")
        if not sep:
            raise SettingError(
                f"ini llmperf_device_aliases{ini_source}: {line.strip()!r}: expected "
                "DEVICE_KEY = BASELINE_DEVICE_KEY"
            )
        pairs.append((key.strip(), target.strip(), f"ini llmperf_device_aliases{ini_source}"))
    table = tool_table(pyproject).get("device_aliases", {})
    where = f"{pyproject}: [tool.llmperf] device_aliases"
    if not isinstance(table, dict):
        raise SettingError(f"{where}: expected a table of DEVICE_KEY = BASELINE_DEVICE_KEY")
    pairs += [(str(k), v, where) for k, v in table.items()]
    mapping = []
    for key, target, source in pairs:
        if not isinstance(target, str) or not _DEVICE_KEY.fullmatch(target) or "@" in target:
            raise SettingError(
                f"{source}: {key!r} = {target!r}: the target must be a device key as in "
                "baselines/<device-key>/ (lowercase letters, digits, '.', '_', '-')"
            )
        if not key or not re.fullmatch(r"[a-z0-9.*?\[\]_-]+", key):
            raise SettingError(
                f"{source}: {key!r}: expected a device key or a glob pattern such as "
                "'cuda-nvidia-a100-*'"
            )
        mapping.append((key, target))
    sources = sorted({source for _, _, source in pairs})
    return DeviceAliases(tuple(mapping), "; ".join(sources))


def model_registry(models_file: str, ini_source: str, inidir: Path, pyproject: Path | None) -> Any:
    """Models the project registered: ``[tool.llmperf.models]`` and the file ini
    ``llmperf_models_file`` names (relative to the ini file); one name in both is an error."""
    from .models import parse_registry, read_models_file

    out: dict[str, Any] = {}
    try:
        if pyproject is not None:
            table = tool_table(pyproject).get("models")
            if table is not None:
                where = f"{pyproject}: [tool.llmperf.models]"
                out.update(parse_registry(table, where, pyproject.parent))
        if models_file.strip():
            path = Path(models_file.strip()).expanduser()
            where = f"ini llmperf_models_file{ini_source}"
            listed = read_models_file(path if path.is_absolute() else inidir / path, where)
            both = sorted(set(out) & set(listed))
            if both:
                raise ValueError(
                    f"{where}: {', '.join(both)} also registered in [tool.llmperf.models]; "
                    "register each name once"
                )
            out.update(listed)
    except ValueError as exc:
        raise SettingError(str(exc)) from None
    return out


def check_directory(path: Path, source: str, *, must_write: bool, create: bool = False) -> None:
    """Fail at start-up, with one line naming the option, when ``path`` cannot serve as the
    directory it is meant to be: a run that measured for an hour and then cannot write its
    report or baselines has lost the hour."""
    where = f"{source}: " if source != "default" else ""
    if path.exists():
        if not path.is_dir():
            raise SettingError(f"{where}{path} exists and is not a directory")
        target = path
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise SettingError(f"{where}{path}: {target} is a file, not a directory")
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SettingError(f"{where}{path}: cannot create it ({exc.strerror})") from None
            target = path
    if must_write and not os.access(target, os.W_OK | os.X_OK):
        raise SettingError(f"{where}{path}: not writable by this user")
