"""Settings: one table of options, each readable from CLI, environment and ini, validated.

Precedence, most specific first: argument of the call > marker ``llmperf(...)`` > CLI > env >
ini > default. Every value is validated where it is read, and a bad one is reported with its
source ("--llmperf-rounds=abc", "env LLMPERF_ROUNDS=abc", "ini llmperf_rounds in tox.ini") and
what is allowed, because a perf gate that silently falls back to a default gates nothing.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

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


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        if value not in choices:
            raise SettingError(f"expected one of {', '.join(choices)}")
        return value

    return parse


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


def _label(text: str) -> str:
    value = str(text).strip()
    if not value or not all(c.isalnum() or c in "._-" for c in value) or value.startswith("."):
        raise SettingError("expected a name of letters, digits, '.', '_' or '-'")
    return value


def _text(text: str) -> str:
    return str(text)


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
    Option("baselines", "baseline directory (default: baselines/ at the rootdir)", _text, None),
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
    Option("label", "keep a separate baseline set: baselines/<device-key>@<label>/", _label, None),
    Option(
        "tolerance",
        "allowed worsening as a fraction (default: the backend's, 0.03; cpu 0.08), or "
        "metric=fraction,…",
        parse_tolerance,
        {"*": 0.03},
    ),
    Option("alpha", "significance level of the statistical test (default 0.01)", parse_alpha, 0.01),
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
    Option("report", "directory for results.json, summary.md and plots", _text, None),
    Option(
        "models",
        "model tier of the shipped suites: auto (tiny on cpu, full on accelerators), tiny, full",
        _choice(MODEL_TIERS),
        "auto",
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
)


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


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
    environ = os.environ if environ is None else environ
    settings = Settings()
    where = f" in {inifile}" if inifile else ""
    for opt in OPTIONS:
        raw = cli(opt.name)
        if raw is not None and raw is not False:
            source = opt.cli if opt.flag else f"{opt.cli}={raw}"
        elif opt.env and environ.get(opt.envvar, "") != "":
            raw = environ[opt.envvar]
            source = f"env {opt.envvar}={raw}"
        elif str(ini(opt.ini) or "").strip():
            raw = ini(opt.ini)
            source = f"ini {opt.ini}={raw}{where}"
        else:
            settings.values[opt.name] = opt.default
            settings.sources[opt.name] = "default"
            continue
        try:
            settings.values[opt.name] = opt.parse(raw)
        except SettingError as exc:
            raise SettingError(f"{source}: {exc}") from None
        settings.sources[opt.name] = source
    return settings


# -- marker ----------------------------------------------------------------------------------

MARKER_KEYS = ("tolerance", "alpha", "rounds", "warmup", "gate")


def parse_marker(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
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
                names = [value] if isinstance(value, str) else list(value)
                for name in names:
                    if name not in METRICS and name != "outcome":
                        raise SettingError(
                            f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}"
                        )
                out[key] = tuple(names)
            elif key.startswith(("max_", "min_")) and key[4:] in METRICS:
                try:
                    limits[key] = float(value)
                except (TypeError, ValueError):
                    raise SettingError("expected a number") from None
            else:
                allowed = ", ".join((*MARKER_KEYS, "max_<metric>", "min_<metric>"))
                known = [*MARKER_KEYS, *(f"{b}_{m}" for b in ("max", "min") for m in METRICS)]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SettingError(f"unknown keyword {key!r}{hint}; allowed: {allowed}")
        except SettingError as exc:
            raise SettingError(f"{source}: {exc}") from None
    if limits:
        out["limits"] = limits
    return out
