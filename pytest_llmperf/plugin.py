"""pytest glue: options, markers, backend parametrization, fixtures, the gate and the summary.

Everything that measures, judges or stores lives in plain modules; this file only connects
them to pytest's hooks. It must stay import-light: pytest loads it for *every* run in the
environment, most of which never measure anything. So this module imports only the settings
table; the run state (and with it baselines, verdicts, reports) is built the first time a test
uses llmperf, and scipy, torch and transformers load only when something is measured or judged.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytest

from . import settings as S

if TYPE_CHECKING:
    from .backends import Backend
    from .progress import ProgressLine
    from .runner import LLMPerf
    from .state import RunState

BACKEND_NAMES = ("cpu", "cuda", "hpu", "neuron", "xpu", "mps")
#: Parameters the shipped suites gained after baselines were recorded with their implicit value:
#: at that value they stay out of the key, so existing entries keep matching.
IMPLICIT_PARAMS = {"devices": 1, "engine": "transformers", "engine_options": None}
BACKEND_FIXTURES = {f"{n}_backend": n for n in BACKEND_NAMES}
LLMPERF_FIXTURES = frozenset({"llmperf", "llmperf_backend", *BACKEND_FIXTURES})

CONFIG = pytest.StashKey["_Config"]()
STATE = pytest.StashKey["RunState"]()
KEY = pytest.StashKey[str]()
MARKER = pytest.StashKey[S.MarkerOptions]()
HANDLE = pytest.StashKey["LLMPerf"]()
VERDICTS = pytest.StashKey[list]()
SKIP = pytest.StashKey[dict]()
GATE_FAILED = pytest.StashKey[bool]()
PROGRESS = pytest.StashKey[Optional["ProgressLine"]]()


@dataclass(frozen=True)
class _Config:
    """What pytest_configure resolved and validated: cheap, made for every run."""

    settings: S.Settings
    rootdir: Path
    baselines_root: Path
    report_dir: Optional[Path]
    aliases: S.DeviceAliases
    workers: int
    #: Registered models: name -> models.Registration.
    models: dict[str, Any]
    #: --llmperf-prompts, read and checked at start-up, and the file it names.
    prompts: Optional[tuple[str, ...]] = None
    prompts_path: Optional[Path] = None


# -- options and configuration -----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmperf", "LLM inference benchmarks (pytest-llmperf)")
    for opt in S.OPTIONS:
        kwargs: dict[str, Any] = {"dest": f"llmperf_{opt.name}", "default": None}
        if opt.flag:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = opt.name.upper()
        env = f" [env {opt.envvar}]" if opt.env else ""
        group.addoption(opt.cli, help=f"{opt.help}.{env} [ini {opt.ini}]", **kwargs)
        parser.addini(opt.ini, help=opt.help, default="")
    parser.addini(
        "llmperf_device_aliases",
        help="lines DEVICE_KEY = BASELINE_DEVICE_KEY: gate these devices against another "
        "device's baselines (also [tool.llmperf] device_aliases in pyproject.toml)",
        type="linelist",
        default=[],
    )
    parser.addini(
        "llmperf_models_file",
        help="a TOML or JSON file registering models by name (NAME = PATH, HF id or "
        "{config = ...}); also [tool.llmperf.models] in pyproject.toml",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name in BACKEND_NAMES:
        config.addinivalue_line("markers", f"{name}: the test runs on the {name} backend")
    config.addinivalue_line("markers", "devices(n): needs n devices of the test's backend")
    config.addinivalue_line("markers", "llmperf_model_tier(tier): set by parametrize_models")
    config.addinivalue_line(
        "markers",
        "llmperf(tolerance=, alpha=, rounds=, warmup=, gate=[metric,…], max_<metric>=, "
        "min_<metric>=): per-test overrides and absolute limits",
    )
    try:
        config.stash[CONFIG] = _resolve_config(config)
    except S.SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Collector(config), "llmperf-collector")
    else:
        _pin_worker(config.stash[CONFIG].settings)


def _pin_worker(settings: S.Settings) -> None:
    """pytest-xdist worker gwK: one device of each selected accelerator backend (devicelock),
    set before anything imports a vendor stack (the probes run later, at collection)."""
    from . import backends
    from .devicelock import pin_worker

    names = [n for n in settings.backend if n != "cpu"]
    if "auto" in names:
        names = [n for n in backends.names() if n != "cpu"]
    pin_worker([backends.get_backend(n) for n in dict.fromkeys(names) if n in backends.names()])


def _resolve_config(config: pytest.Config) -> _Config:
    S.check_environment(os.environ)
    settings = S.resolve(
        cli=lambda name: config.getoption(f"llmperf_{name}"),
        ini=config.getini,
        inifile=str(config.inipath) if config.inipath else None,
    )
    if os.environ.get(S.PROCESS_ENV):
        _as_child(settings)
    elif settings.processes > 1 and _workers(config) > 0:
        raise S.SettingError(
            f"{settings.sources['processes']}: the N processes run one at a time so that they "
            "never compete; pytest-xdist's -n runs tests side by side on the same device: drop "
            "-n (or set --llmperf-processes=1)"
        )
    cwd = Path(config.invocation_params.dir)
    inidir = Path(config.inipath).parent if config.inipath else None
    updating = bool(settings.update_baselines or settings.reset_baselines)
    baselines_root = _directory(settings, "baselines", cwd, inidir) or (inidir or cwd) / "baselines"
    S.check_directory(baselines_root, settings.sources["baselines"], must_write=updating)
    nvme = _directory(settings, "nvme_path", cwd, inidir)
    if nvme is not None:
        if not nvme.is_dir():
            raise S.SettingError(
                f"{settings.sources['nvme_path']}: {nvme}: no such directory (a directory on "
                "the mounted NVMe drive)"
            )
        S.check_directory(nvme, settings.sources["nvme_path"], must_write=True)
        # The engine reads it here and in every child (DeepSpeed ZeRO's offload='nvme').
        os.environ["LLMPERF_NVME_PATH"] = str(nvme)
    report_dir = _directory(settings, "report", cwd, inidir)
    if report_dir is not None:
        S.check_directory(report_dir, settings.sources["report"], must_write=True, create=True)
        for name in ("results.json", "summary.md"):
            target = report_dir / name
            if target.exists() and not target.is_file():
                raise S.SettingError(
                    f"{settings.sources['report']}: {target} exists and is not a file"
                )
        plots = report_dir / "plots"
        if plots.exists() and not plots.is_dir():
            raise S.SettingError(
                f"{settings.sources['report']}: {plots} exists and is not a directory (the "
                "report's plots go there)"
            )
    # [tool.llmperf] lives in the pyproject.toml pytest read, else in the rootdir's.
    ini = Path(config.inipath) if config.inipath else None
    pyproject = (
        ini if ini and ini.name == "pyproject.toml" else Path(config.rootpath) / "pyproject.toml"
    )
    where = f" in {config.inipath}" if config.inipath else ""
    aliases = S.device_aliases(config.getini("llmperf_device_aliases"), where, pyproject)
    registry = S.model_registry(
        config.getini("llmperf_models_file"), where, inidir or cwd, pyproject
    )
    _check_model_names(settings, registry)
    prompts_path = _directory(settings, "prompts", cwd, inidir)
    return _Config(
        settings,
        Path(config.rootpath),
        baselines_root,
        report_dir,
        aliases,
        _workers(config),
        registry,
        prompts=_read_prompts(prompts_path, settings.sources["prompts"]),
        prompts_path=prompts_path,
    )


def _as_child(settings: S.Settings) -> None:
    """A child of --llmperf-processes measures and reports to its parent, nothing else: it
    gates nothing, stores nothing and spawns nothing, whatever its command line and ini say."""
    source = f"env {S.PROCESS_ENV}={os.environ[S.PROCESS_ENV]}"
    for name, value in (
        ("processes", 1),
        ("no_gate", True),
        ("update_baselines", False),
        ("reset_baselines", False),
        ("strict", False),
        ("report", os.environ.get(S.PROCESS_REPORT_ENV) or None),
    ):
        setattr(settings, name, value)
        settings.sources[name] = source


def _read_prompts(path: Optional[Path], source: str) -> Optional[tuple[str, ...]]:
    """--llmperf-prompts at start-up: a bad file is one line naming the option, the file and
    the line, before any test has spent time on a model."""
    if path is None:
        return None
    from .prompts import PromptFileError, read_prompts

    try:
        return read_prompts(path)
    except PromptFileError as exc:
        raise S.SettingError(f"{source}: {exc}") from None


def _directory(
    settings: S.Settings, name: str, cwd: Path, inidir: Optional[Path]
) -> Optional[Path]:
    """An option's directory (or file): a relative ini value is read from the ini file's
    directory, a command-line or environment value from the directory pytest was started in, as
    a shell user expects. Never pytest's rootdir, which moves with the arguments."""
    value = settings.values[name]
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    base = inidir if settings.sources[name].startswith("ini ") and inidir else cwd
    return base / path


def _workers(config: pytest.Config) -> int:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return int(workerinput.get("workercount", 1))
    if getattr(config.option, "dist", "no") != "no":
        return len(getattr(config.option, "tx", None) or [])
    return 0


def _has_state(config: pytest.Config) -> bool:
    return STATE in config.stash


def _state(config: pytest.Config) -> RunState:
    """The run state, built the first time a test uses llmperf (imports the heavy parts)."""
    if STATE not in config.stash:
        from .state import RunState

        conf = config.stash[CONFIG]
        config.stash[STATE] = RunState.create(
            conf.settings,
            rootdir=conf.rootdir,
            baselines_root=conf.baselines_root,
            report_dir=conf.report_dir,
            aliases=conf.aliases,
            workers=conf.workers,
        )
    return config.stash[STATE]


def _uses_llmperf(item: pytest.Item) -> bool:
    return not LLMPERF_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))


# -- collection --------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "llmperf_backend" not in metafunc.fixturenames:
        return
    selected = _state(metafunc.config).selected_backends
    for name in selected:
        if name not in BACKEND_NAMES:  # a third-party backend gets its marker too
            metafunc.config.addinivalue_line("markers", f"{name}: runs on the {name} backend")
    metafunc.parametrize(
        "llmperf_backend",
        [pytest.param(n, marks=getattr(pytest.mark, n), id=n) for n in selected],
        indirect=True,
    )


#: What the generation and load suites run: causal LMs (``ModelSpec.task``).
CAUSAL_LM = ("causal-lm",)
#: What a forward-pass suite of encoders runs (reference 004).
ENCODERS = ("encoder", "image-encoder")


def parametrize_models(
    metafunc: pytest.Metafunc,
    argname: str = "model",
    families: Optional[tuple[str, ...]] = None,
    tasks: tuple[str, ...] = CAUSAL_LM,
) -> None:
    """Parametrize ``argname`` with the models --llmperf-models selects (see
    :func:`selected_models`)."""
    metafunc.parametrize(
        argname,
        [
            model_param(name, tier)
            for name, tier, family in selected_models(metafunc.config, tasks)
            if families is None or family is None or family in families
        ],
    )


def selected_models(
    config: pytest.Config, tasks: tuple[str, ...] = CAUSAL_LM
) -> list[tuple[str, Optional[str], Optional[str]]]:
    """(name, tier, family) of the models --llmperf-models selects, of those ``tasks`` only
    (``ModelSpec.task``; causal LMs unless asked: a generation suite given ``tiny`` or a list
    naming encoders leaves the encoders to a forward suite, and the reverse).

    A tier (``auto``, ``tiny``, ``full``) gives the catalog's suite models of that tier; with
    ``auto`` the tier follows the backend: tiny models on CPU, full ones on accelerators. When
    both kinds of backend are selected, both tiers are collected and each test instance whose
    model does not fit its backend's tier is skipped at setup. A list of names (catalog ids,
    registered names, checkpoint directories) runs exactly those of ``tasks``, on every backend
    (tier and family None: a name is not resolved while collecting; its task is read from its
    config.json, and a name whose task cannot be told that way is kept).
    """
    from . import models

    state = _state(config)
    chosen = state.settings.models
    if chosen not in S.MODEL_TIERS:
        return [
            (name, None, None)
            for name in chosen.split(",")
            if model_task(config, name) in (*tasks, None)
        ]
    tiers = (
        [chosen]
        if chosen != "auto"
        else sorted({"tiny" if b == "cpu" else "full" for b in state.selected_backends})
    )
    return [
        (model_id, t, models.get(model_id).family)
        for t in tiers
        for model_id in models.models_for_tier(t, tasks)
    ]


def model_task(config: pytest.Config, name: str) -> Optional[str]:
    """The task of a model name while collecting, without torch or transformers (a catalog
    entry's, else what its config.json says: ``models.registry.task_hint``); None when it
    cannot be told."""
    from .models.registry import task_hint

    return task_hint(name, config.stash[CONFIG].models)


def dataset_prompts(config: pytest.Config) -> tuple[str, ...]:
    """The prompts ``llmperf.generate_dataset`` runs when a test gives none: --llmperf-prompts,
    else the shipped file. A dataset suite names them in its parameters (by digest), so another
    file starts another baseline instead of being judged against this one's."""
    from . import prompts

    found = config.stash[CONFIG].prompts
    return found if found is not None else prompts.shipped()


def engine_id(model: str, engine: str, dtype: str, options: Optional[dict[str, Any]]) -> str:
    """A readable test id for a model run through an engine configuration (ids are for
    people: the baseline key comes from the parameters, not from this)."""
    extra = "".join(f"-{k}={v}" for k, v in sorted((options or {}).items()))
    return f"{model}-{engine}-{dtype}{extra}"


def model_param(name: str, tier: Optional[str], *more: Any, id: Optional[str] = None) -> Any:
    """``pytest.param(name, *more)`` marked with its tier, so a test instance whose model does
    not fit the backend's tier is skipped at setup."""
    marks = [pytest.mark.llmperf_model_tier(tier)] if tier else []
    return pytest.param(name, *more, marks=marks, id=id or name)


def _check_model_names(settings: S.Settings, registry: dict[str, Any]) -> None:
    """A name in --llmperf-models that is no catalog id, registered name, path or HF id is a
    typo: say so at start-up, not once per test. Catalog and registry only: no torch."""
    from .models.catalog import catalog

    if settings.models in S.MODEL_TIERS:
        return
    known = set(catalog()) | set(registry)
    for name in settings.models.split(","):
        if name in known or "/" in name or Path(name).expanduser().exists():
            continue
        close = difflib.get_close_matches(name, [*S.MODEL_TIERS, *sorted(known)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise S.SettingError(
            f"{settings.sources['models']}: unknown model {name!r}{hint}; expected a tier "
            f"({', '.join(S.MODEL_TIERS)}) or model names: catalog ids (llmperf models), "
            "registered names, checkpoint directories"
        )


def baseline_key(item: pytest.Item) -> str:
    """Test function + its parameters except the backend, sorted by name.

    Parametrize ids and the order of decorators can change without orphaning a baseline;
    only a change of the workload itself (a parameter's name or value) makes a new key.
    """
    func = getattr(item, "originalname", None) or item.name
    cls = getattr(item, "cls", None)
    if cls is not None:
        func = f"{cls.__name__}.{func}"
    callspec = getattr(item, "callspec", None)
    params = dict(callspec.params) if callspec is not None else {}
    parts = [
        f"{name}={_param_text(value)}"
        for name, value in sorted(params.items())
        if name != "llmperf_backend"
        and name not in BACKEND_FIXTURES
        and not (name in IMPLICIT_PARAMS and value == IMPLICIT_PARAMS[name])
    ]
    return f"{func}[{','.join(parts)}]" if parts else func


def _param_text(value: Any) -> str:
    """A parameter value as it appears in a baseline key: stable across runs and processes."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_param_text(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_param_text(v)}" for k, v in sorted(value.items())) + "}"
    name = getattr(value, "__name__", None)
    if name:
        return name
    text = repr(value)
    # A default repr holds a memory address: different in every process, useless as a key.
    return type(value).__name__ if " at 0x" in text else text


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the backend marks must exist before `-m cpu` deselects.
    _mark_and_key(config, items)
    try:
        _check_unique(items)
    except S.SettingError as exc:
        raise pytest.UsageError(str(exc)) from None


def _check_unique(items: list[pytest.Item]) -> None:
    """Two test files with one stem would share a baseline file, and two tests with one key
    one entry: each would overwrite and judge the other's numbers. Refuse at collection."""
    files: dict[str, Path] = {}
    keys: dict[tuple[str, str, str], str] = {}
    for item in items:
        if KEY not in item.stash:
            continue
        path = Path(str(item.path))
        other = files.setdefault(path.stem, path)
        if other != path:
            raise S.SettingError(
                f"{other} and {path} would share the baseline file <device>/{path.stem}.json: "
                "rename one of the test files"
            )
        callspec = getattr(item, "callspec", None)
        backend = str(callspec.params.get("llmperf_backend", "")) if callspec is not None else ""
        seen = keys.setdefault((path.stem, backend, item.stash[KEY]), item.nodeid)
        if seen != item.nodeid:
            raise S.SettingError(
                f"{seen} and {item.nodeid} have the same baseline key {item.stash[KEY]!r} "
                "(a parameter value without a stable text, e.g. an object without __repr__): "
                "give the values a __repr__ or name them with pytest.param(..., id=...) and a "
                "plain parameter"
            )


def _mark_and_key(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("llmperf")
        try:
            if marker is not None:
                if marker.args:
                    raise S.SettingError(
                        f"{item.nodeid}: marker llmperf takes keywords only, got {marker.args!r}"
                    )
                item.stash[MARKER] = S.parse_marker(marker.kwargs, item.nodeid)
            devices = item.get_closest_marker("devices")
            if devices is not None:
                _devices_count(devices, item.nodeid)
        except S.SettingError as exc:
            raise pytest.UsageError(str(exc)) from None
        if not _uses_llmperf(item):
            continue
        names = getattr(item, "fixturenames", ())
        for fixture, backend in BACKEND_FIXTURES.items():
            if fixture in names:
                item.add_marker(getattr(pytest.mark, backend))
        item.stash[KEY] = baseline_key(item)
        # Before -k/-m deselect: `llmperf baselines prune` must see every key the files produce.
        _state(config).collected_keys.add((Path(str(item.path)).stem, item.stash[KEY]))


def pytest_collection_finish(session: pytest.Session) -> None:
    _run_other_processes(session)
    # `llmperf baselines prune` collects in a subprocess and reads the keys back from here.
    out = os.environ.get(S.KEYS_OUT_ENV)
    if not out or hasattr(session.config, "workerinput"):
        return
    from . import backends

    state = _state(session.config)
    devices = []
    for name in state.selected_backends:
        backend = backends.get_backend(name)
        if backend.probe().available:
            devices.append(state.device_key(backend))
    data = {
        "keys": sorted(state.collected_keys),
        # Every collected test file, llmperf or not: only these files' baselines may be pruned.
        "suites": sorted({Path(str(item.path)).stem for item in session.items}),
        "devices": devices,
    }
    Path(out).write_text(json.dumps(data))


def _run_other_processes(session: pytest.Session) -> None:
    """--llmperf-processes=N: the N-1 child pytest runs, before this process runs its tests.

    Only where there is something to measure: not in a child, an xdist worker, --collect-only,
    after collection errors, or when no selected test uses llmperf. A child that crashes or
    hangs stops the run here, with its exit and output (pytest.exit: the session ends cleanly).
    """
    config = session.config
    conf = config.stash[CONFIG]
    total = conf.settings.processes
    if (
        total < 2
        or os.environ.get(S.PROCESS_ENV)
        or hasattr(config, "workerinput")
        or config.option.collectonly
        or session.testsfailed
        or not any(_uses_llmperf(item) for item in session.items)
        or os.environ.get(S.KEYS_OUT_ENV)
    ):
        return
    from . import processes

    state = _state(config)
    pool = processes.ProcessPool(total=total)
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def say(text: str) -> None:
        if reporter is not None:
            reporter.write_line(f"llmperf: {text}")

    command = processes.child_command(
        config.invocation_params.args, xdist=config.pluginmanager.hasplugin("xdist")
    )
    tests = sum(1 for item in session.items if _uses_llmperf(item))
    say(
        f"measuring in {total} processes: {total - 1} child pytest run(s) of the {tests} "
        "selected llmperf tests, one at a time, then this one"
    )
    limit = conf.settings.process_timeout or conf.settings.timeout
    for index in range(1, total):
        say(f"process {index} of {total} running (a child pytest, limit {limit:.0f} s)")
        run = processes.run_child(
            command,
            index=index,
            total=total,
            cwd=Path(config.invocation_params.dir),
            env=os.environ,
            timeout=limit,
        )
        if run.failed:
            # Indented: the child's own "INTERNALERROR>" lines are not this process's.
            tail = "\n".join(f"    {line}" for line in run.output_tail.rstrip().splitlines()[-25:])
            pytest.exit(
                f"llmperf: process {index} of {total} {run.problem}; nothing was judged. "
                f"Its command: {' '.join(command)}\n--- its output (tail) ---\n{tail}",
                returncode=pytest.ExitCode.TESTS_FAILED,
            )
        ok, count = sum(1 for r in run.records if r.ok), len(run.records)
        say(
            f"process {index} of {total} done in {run.wall_s:.0f} s: {count} "
            f"workload{'s' if count != 1 else ''} ({ok} ok)"
        )
        pool.add(run)
        if conf.settings.process_timeout is None:
            limit = 3 * pool.children[0].wall_s + 120
    say(f"process {total} of {total} (this one) runs the tests now")
    state.process_pool = pool


def pytest_report_collectionfinish(
    config: pytest.Config, start_path: Path, items: list[pytest.Item]
) -> list[str]:
    # After collection, and only when a test uses llmperf: an unrelated project in the same
    # environment hears nothing from this plugin.
    if any(_uses_llmperf(item) for item in items):
        return _state(config).header_lines()
    return []


def pytest_report_header(config: pytest.Config) -> list[str]:
    # A pytest-xdist controller collects nothing itself, so it reports here instead.
    if _workers(config) > 1 and not hasattr(config, "workerinput"):
        return _state(config).header_lines()
    return []


def _devices_count(marker: pytest.Mark, where: str) -> int:
    args = marker.args
    if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
        raise S.SettingError(f"{where}: marker devices(n) needs one positive integer, got {args!r}")
    return args[0]


# -- fixtures ----------------------------------------------------------------------------------


def _skip(item: pytest.Item, kind: str, reason: str) -> None:
    # The controller counts these in the "N of M judged" line (see RunState.coverage).
    item.stash[SKIP] = {"kind": kind, "reason": reason}
    pytest.skip(reason)


def _acquire(request: pytest.FixtureRequest, name: str) -> Backend:
    from . import backends

    backend = backends.get_backend(name)
    probe = backend.probe()
    if not probe.available:
        _skip(request.node, "backend", f"{name} backend unavailable: {probe.reason}")
    marker = request.node.get_closest_marker("devices")
    if marker is not None:
        need = _devices_count(marker, request.node.nodeid)
        have = backend.device_count()
        if have < need:
            _skip(
                request.node,
                "node",
                f"marker devices({need}): needs {need} {name} devices, this node has {have}",
            )
    return backend


@pytest.fixture
def llmperf_backend(request: pytest.FixtureRequest) -> Backend:
    """The backend this instance of the test runs on (parametrized over --llmperf-backend)."""
    return _acquire(request, request.param)


def _backend_fixture(name: str) -> Any:
    def fixture(request: pytest.FixtureRequest) -> Backend:
        return _acquire(request, name)

    fixture.__doc__ = f"The {name} backend; the test is skipped with the probe's reason without it."
    fixture.__name__ = f"{name}_backend"
    return pytest.fixture(fixture, name=f"{name}_backend")


cpu_backend = _backend_fixture("cpu")
cuda_backend = _backend_fixture("cuda")
hpu_backend = _backend_fixture("hpu")
neuron_backend = _backend_fixture("neuron")
xpu_backend = _backend_fixture("xpu")
mps_backend = _backend_fixture("mps")


@pytest.fixture
def llmperf(request: pytest.FixtureRequest, llmperf_backend: Backend) -> LLMPerf:
    """The measuring handle of this test, bound to its backend; verdicts apply at test end."""
    from .runner import LLMPerf, TestContext

    item = request.node
    state = _state(request.config)
    marker = item.stash.get(MARKER, S.MarkerOptions())
    settings = state.settings
    tier = item.get_closest_marker("llmperf_model_tier")
    if tier is not None and settings.models == "auto":
        wanted = "tiny" if llmperf_backend.name == "cpu" else "full"
        if tier.args[0] != wanted:
            pytest.skip(
                f"--llmperf-models=auto runs {wanted} models on {llmperf_backend.name}; "
                f"this one is {tier.args[0]}"
            )
    callspec = getattr(item, "callspec", None)
    params = {
        k: _param_text(v)
        for k, v in (callspec.params.items() if callspec is not None else ())
        if k != "llmperf_backend"
    }
    context = TestContext(
        key=item.stash.get(KEY, baseline_key(item)),
        suite=Path(str(item.path)).stem,
        nodeid=item.nodeid,
        rounds=settings.rounds if marker.rounds is None else marker.rounds,
        warmup=settings.warmup if marker.warmup is None else marker.warmup,
        device_key=state.device_key(llmperf_backend),
        provenance=state.provenance(llmperf_backend),
        params=params,
        shared_workers=_shared_workers(state.workers, llmperf_backend),
        launcher=marker.launcher or settings.launcher,
        models=item.config.stash[CONFIG].models,
        prompts=item.config.stash[CONFIG].prompts,
        prompts_source=str(item.config.stash[CONFIG].prompts_path or ""),
        oom_series=state.oom_series,
        progress=_progress_line(item.config),
    )
    state.launchers.locks.say = _say(item.config)
    handle = LLMPerf(llmperf_backend, context, state.launchers)
    item.stash[HANDLE] = handle
    return handle


def _shared_workers(workers: int, backend: Backend) -> int:
    """xdist workers that measure on this backend's device at the same time. A CPU host is
    shared by all of them, deliberately; an accelerator's workloads hold its device lock
    (devicelock), so workers pinned to one device take turns and none shares it while
    measuring (another worker active on it anyway shows in ``Record.device_users``)."""
    if backend.visible_devices_env:
        return 0
    return workers if workers > 1 else 0


def _say(config: pytest.Config) -> Any:
    """A line on pytest's terminal while a test runs (past output capture): how a workload
    waiting for a device another job holds says so. An xdist worker's goes to its stderr."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def say(text: str) -> None:
        import contextlib
        import sys

        if reporter is None or hasattr(config, "workerinput"):
            print(f"llmperf: {text}", file=sys.__stderr__, flush=True)
            return
        quiet = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with quiet:
            reporter.write_line(f"llmperf: {text}")

    return say


def _progress_line(config: pytest.Config) -> Optional[ProgressLine]:
    """The live progress line (progress.py) on pytest's terminal, made on first use; None
    where drawing would garble output or nobody watches: under -q, when the output is not a
    terminal (CI logs get the final table instead of a line per round), with -s, tee-sys
    capture or live logging (the test's own output would land in the line), on a dumb
    terminal, in an xdist worker (its output is not a terminal)."""
    if PROGRESS not in config.stash:
        config.stash[PROGRESS] = _make_progress_line(config)
    return config.stash[PROGRESS]


def _make_progress_line(config: pytest.Config) -> Optional[ProgressLine]:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if (
        reporter is None
        or not reporter.isatty
        or hasattr(config, "workerinput")
        or config.getoption("verbose", 0) < 0
        or config.getoption("capture", "fd") in ("no", "tee-sys")
        or config.getini("log_cli")
        or config.getoption("log_cli_level", None) is not None
        or os.environ.get("TERM") == "dumb"
    ):
        return None
    import contextlib

    from .progress import ProgressLine

    writer = config.get_terminal_writer()
    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(text: str) -> None:
        # Draws happen while the test runs, with its output captured: past the capture, raw
        # (pytest's idea of its current line, which aligns its [ 50%], stays as it was).
        quiet = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with quiet:
            writer.write_raw(text, flush=True)

    return ProgressLine(
        write, width=lambda: writer.fullwidth, column=lambda: writer.width_of_current_line
    )


def _clear_progress(config: pytest.Config) -> None:
    line = config.stash.get(PROGRESS, None)
    if line is not None:
        line.clear()


# -- running and judging -----------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    if HANDLE not in item.stash:
        return (yield)
    from .errors import SkipWorkload, UsageError
    from .measure import TokenCountError
    from .runner import WorkloadCrashed

    usage: Optional[str] = None
    skip: Optional[str] = None
    try:
        result = yield
    except (UsageError, WorkloadCrashed) as exc:
        # A crashed child's record (outcome error) is already in the report.
        usage = str(exc)
    except SkipWorkload as exc:
        skip = str(exc)
    except Exception as exc:
        # A crashed workload shows up as outcome "error" in the report (never stored).
        item.stash[HANDLE].record_error(exc)
        if not isinstance(exc, TokenCountError):
            raise
        # A wrong token count is the engine's fault, not the test's: one line is enough.
        usage = str(exc)
    # Outside the except blocks: pytest would otherwise print the chained exception too.
    if usage is not None:
        pytest.fail(usage, pytrace=False)
    if skip is not None:
        _skip(item, "node", skip)
    handle = item.stash[HANDLE]
    if not handle.records:
        pytest.fail(
            "this test asked for the llmperf fixture but measured nothing: call "
            "llmperf.generate(...) or llmperf.measure(...)",
            pytrace=False,
        )
    state = _state(item.config)
    outcome = state.judge(
        handle.records,
        item.stash.get(MARKER, S.MarkerOptions()),
        handle.overrides,
        handle.remeasure,
    )
    item.stash[VERDICTS] = outcome.verdicts
    for record, verdict in zip(handle.records, outcome.verdicts):
        item.user_properties.append((f"llmperf:{record.key}:outcome", record.outcome))
        if verdict is not None:
            item.user_properties.append((f"llmperf:{record.key}:verdict", verdict.worst.value))
        for name, value in sorted(record.metrics.items()):
            if value.value is not None:
                item.user_properties.append((f"llmperf:{record.key}:{name}", f"{value.value:.6g}"))
    if outcome.failure:
        item.stash[GATE_FAILED] = True
        pytest.fail(outcome.failure, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    # The report is logged next (the test's letter or PASSED): the progress line goes first.
    _clear_progress(item.config)
    if not _uses_llmperf(item):
        return report
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        # A skip raised in our fixtures or wrapper would point at plugin.py; -rs should show
        # the user's test.
        path, _line, reason = report.longrepr
        if Path(str(path)).name == "plugin.py" and Path(str(path)).parent.name == __package__:
            fspath, lineno, _ = item.reportinfo()
            report.longrepr = (str(fspath), (lineno or 0) + 1, reason)
    if report.skipped and SKIP in item.stash:
        report.llmperf_skip = item.stash[SKIP]
    handle = item.stash.get(HANDLE, None)
    if call.when == "call" and handle is not None and handle.records:
        from .report import verdict_json

        verdicts = item.stash.get(VERDICTS, [None] * len(handle.records))
        # Plain JSON on the report: pytest-xdist ships it to the controller unchanged.
        gate = _state(item.config).gating
        gate_failed = item.stash.get(GATE_FAILED, False)
        report.llmperf = [
            {
                "record": r.to_json(),
                "verdict": verdict_json(v),
                "gate": gate,
                "gate_failed": gate_failed,
            }
            for r, v in zip(handle.records, verdicts)
        ]
    if call.when == "teardown" and handle is not None:
        # The re-measure closures hold the loaded model, inputs and engine; the shared cache
        # keeps the one model the next test of the same parametrization reuses.
        handle.release()
        del item.stash[HANDLE]
    return report


class _Collector:
    """Gathers records from test reports in the process that owns the session.

    Registered per config (not a module global) so nested pytester sessions stay apart; on an
    xdist controller the reports arrive from the workers with the records attached.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rows = getattr(report, "llmperf", None)
        if rows:
            _state(self.config).collect(report.nodeid, report.outcome, rows)
        skip = getattr(report, "llmperf_skip", None)
        if skip:
            _state(self.config).note_skip(report.nodeid, skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Any:
    # Before yielding: every test has run, and the terminal summary (printed after the inner
    # hooks) must already know what the baseline update changed.
    config = session.config
    _clear_progress(config)  # an interrupted test's line, before the summary is written
    if not _has_state(config):
        return (yield)
    state = _state(config)
    state.close()  # child processes and the cached model, in workers too
    if not hasattr(config, "workerinput"):
        # pytest-benchmark saves --benchmark-json in its own wrapper, and only when its fixture
        # ran; otherwise it warns "Not saving anything". When only llmperf measured, the file
        # is ours to write.
        bs = getattr(config, "_benchmarksession", None)
        if bs is not None and getattr(bs, "json", None) and not bs.benchmarks:
            state.benchmark_json = _benchmark_json_path(bs.json, config)
            bs.json = None
        state.finish()
        if state.errors and session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return (yield)


def _benchmark_json_path(value: Any, config: pytest.Config) -> str:
    """pytest-benchmark's --benchmark-json: a Path (5.x) or an open file (older releases)."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(os.fspath(value))
    else:
        path = Path(getattr(value, "name", str(value)))
        close = getattr(value, "close", None)
        if close is not None:
            close()
    if not path.is_absolute():
        path = Path(config.invocation_params.dir) / path
    return str(path)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not _has_state(config):
        return
    state = _state(config)
    for line in state.summary_lines(width=terminalreporter._tw.fullwidth):
        if line.startswith("= "):
            terminalreporter.write_sep("=", line[2:])
        else:
            terminalreporter.write_line(line)
    cov = state.final_coverage or state.coverage()
    if cov.shown:
        color = {"green": cov.complete and not state.errors}
        if not cov.complete:
            color = {"yellow": True, "bold": True}
        terminalreporter.write_sep("=", cov.headline(), **color)
        for line in cov.lines():
            terminalreporter.write_line(line)
    for error in state.errors:
        terminalreporter.write_line(f"ERROR {error}", red=True, bold=True)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    if _has_state(config):
        output_json.setdefault("benchmarks", []).extend(_state(config).benchmark_entries())
