"""pytest glue: options, markers, backend parametrization, fixtures, the gate and the summary.

Everything that measures, judges or stores lives in plain modules; this file only connects
them to pytest's hooks. It must stay import-light: collecting tests on a CPU box imports
neither torch nor transformers (a backend probe imports torch only when device nodes exist).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pytest

from . import backends
from . import report as report_mod
from . import settings as S
from .measure import TokenCountError
from .runner import LLMPerf, SkipWorkload, UsageError, Workload
from .state import RunState

BACKEND_NAMES = ("cpu", "cuda", "hpu", "neuron", "xpu", "mps")
BACKEND_FIXTURES = {f"{n}_backend": n for n in BACKEND_NAMES}

STATE = pytest.StashKey[RunState]()
KEY = pytest.StashKey[str]()
MARKER = pytest.StashKey[dict]()
HANDLE = pytest.StashKey[LLMPerf]()
VERDICTS = pytest.StashKey[list]()


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


def pytest_configure(config: pytest.Config) -> None:
    for name in backends.names():
        config.addinivalue_line("markers", f"{name}: the test runs on the {name} backend")
    config.addinivalue_line("markers", "devices(n): needs n devices of the test's backend")
    config.addinivalue_line("markers", "llmperf_model_tier(tier): set by parametrize_models")
    config.addinivalue_line(
        "markers",
        "llmperf(tolerance=, alpha=, rounds=, warmup=, gate=[metric,…], max_<metric>=, "
        "min_<metric>=): per-test overrides and absolute limits",
    )
    try:
        settings = S.resolve(
            cli=lambda name: config.getoption(f"llmperf_{name}"),
            ini=config.getini,
            inifile=str(config.inipath) if config.inipath else None,
        )
    except S.SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[STATE] = RunState.create(
        settings,
        rootdir=Path(config.rootpath),
    )
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Collector(config), "llmperf-collector")


def _state(config: pytest.Config) -> RunState:
    return config.stash[STATE]


# -- collection --------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "llmperf_backend" not in metafunc.fixturenames:
        return
    selected = _state(metafunc.config).selected_backends
    metafunc.parametrize(
        "llmperf_backend",
        [pytest.param(n, marks=getattr(pytest.mark, n), id=n) for n in selected],
        indirect=True,
    )


def parametrize_models(
    metafunc: pytest.Metafunc, argname: str = "model", families: Optional[tuple[str, ...]] = None
) -> None:
    """Parametrize ``argname`` with the catalog models of the selected tier (--llmperf-models).

    With ``auto`` the tier follows the backend: tiny models on CPU, full ones on accelerators.
    When both kinds of backend are selected, both tiers are collected and each test instance
    whose model does not fit its backend's tier is skipped at setup.
    """
    from . import models

    state = _state(metafunc.config)
    tier = state.settings.models
    tiers = (
        [tier]
        if tier != "auto"
        else sorted({"tiny" if b == "cpu" else "full" for b in state.selected_backends})
    )
    params = []
    for t in tiers:
        for model_id in models.models_for_tier(t):
            spec = models.get(model_id)
            if families is None or spec.family in families:
                params.append(
                    pytest.param(model_id, marks=pytest.mark.llmperf_model_tier(t), id=model_id)
                )
    metafunc.parametrize(argname, params)


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
        if name != "llmperf_backend" and name not in BACKEND_FIXTURES
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
    state = _state(config)
    for item in items:
        names = getattr(item, "fixturenames", ())
        for fixture, backend in BACKEND_FIXTURES.items():
            if fixture in names:
                item.add_marker(getattr(pytest.mark, backend))
        item.stash[KEY] = baseline_key(item)
        # Before -k/-m deselect: `llmperf baselines prune` must see every key the files produce.
        state.collected_keys.add((Path(str(item.path)).stem, item.stash[KEY]))
        marker = item.get_closest_marker("llmperf")
        try:
            item.stash[MARKER] = S.parse_marker(marker.kwargs, item.nodeid) if marker else {}
            if marker is not None and marker.args:
                raise S.SettingError(
                    f"{item.nodeid}: marker llmperf takes keywords only, got {marker.args!r}"
                )
            devices = item.get_closest_marker("devices")
            if devices is not None:
                _devices_count(devices, item.nodeid)
        except S.SettingError as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_collection_finish(session: pytest.Session) -> None:
    # `llmperf baselines prune` collects in a subprocess and reads the keys back from here.
    out = os.environ.get("LLMPERF_KEYS_OUT")
    if out and not hasattr(session.config, "workerinput"):
        state = _state(session.config)
        devices = []
        for name in state.selected_backends:
            backend = backends.get_backend(name)
            if backend.probe().available:
                devices.append(state.device_key(backend))
        data = {"keys": sorted(state.collected_keys), "devices": devices}
        Path(out).write_text(json.dumps(data))


def _devices_count(marker: pytest.Mark, where: str) -> int:
    args = marker.args
    if len(args) != 1 or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
        raise S.SettingError(f"{where}: marker devices(n) needs one positive integer, got {args!r}")
    return args[0]


# -- fixtures ----------------------------------------------------------------------------------


def _acquire(request: pytest.FixtureRequest, name: str) -> backends.Backend:
    backend = backends.get_backend(name)
    probe = backend.probe()
    if not probe.available:
        pytest.skip(f"{name} backend unavailable: {probe.reason}")
    marker = request.node.get_closest_marker("devices")
    if marker is not None:
        need = _devices_count(marker, request.node.nodeid)
        have = backend.device_count()
        if have < need:
            pytest.skip(
                f"marker devices({need}): needs {need} {name} devices, this node has {have}"
            )
    return backend


@pytest.fixture
def llmperf_backend(request: pytest.FixtureRequest) -> backends.Backend:
    """The backend this instance of the test runs on (parametrized over --llmperf-backend)."""
    return _acquire(request, request.param)


def _backend_fixture(name: str) -> Any:
    def fixture(request: pytest.FixtureRequest) -> backends.Backend:
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
def llmperf(request: pytest.FixtureRequest, llmperf_backend: backends.Backend) -> LLMPerf:
    """The measuring handle of this test, bound to its backend; verdicts apply at test end."""
    item = request.node
    state = _state(request.config)
    marker = item.stash.get(MARKER, {})
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
    context = Workload(
        key=item.stash.get(KEY, baseline_key(item)),
        suite=Path(str(item.path)).stem,
        nodeid=item.nodeid,
        rounds=marker.get("rounds", settings.rounds),
        warmup=marker.get("warmup", settings.warmup),
        device_key=state.device_key(llmperf_backend),
        provenance=state.provenance(llmperf_backend),
        workload=params,
    )
    handle = LLMPerf(llmperf_backend, context, cache=state.cache)
    item.stash[HANDLE] = handle
    return handle


# -- running and judging -----------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    usage: Optional[str] = None
    skip: Optional[str] = None
    try:
        result = yield
    except UsageError as exc:
        usage = str(exc)
    except SkipWorkload as exc:
        skip = str(exc)
    except Exception as exc:
        # A crashed workload shows up as outcome "error" in the report (never stored).
        handle = item.stash.get(HANDLE, None)
        if handle is not None:
            handle.record_error(exc)
        if not isinstance(exc, TokenCountError):
            raise
        # A wrong token count is the engine's fault, not the test's: one line is enough.
        usage = str(exc)
    # Outside the except blocks: pytest would otherwise print the chained exception too.
    if usage is not None:
        pytest.fail(usage, pytrace=False)
    if skip is not None:
        pytest.skip(skip)
    handle = item.stash.get(HANDLE, None)
    if handle is None:
        return result
    if not handle.records:
        pytest.fail(
            "this test asked for the llmperf fixture but measured nothing: call "
            "llmperf.generate(...) or llmperf.measure(...)",
            pytrace=False,
        )
    state = _state(item.config)
    outcome = state.judge(
        handle.records, item.stash.get(MARKER, {}), handle.overrides, handle.remeasure
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
        pytest.fail(outcome.failure, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        # A skip raised in our fixtures or wrapper would point at plugin.py; -rs should show
        # the user's test.
        path, _line, reason = report.longrepr
        if Path(str(path)).name == "plugin.py" and Path(str(path)).parent.name == __package__:
            fspath, lineno, _ = item.reportinfo()
            report.longrepr = (str(fspath), (lineno or 0) + 1, reason)
    if call.when == "call":
        handle = item.stash.get(HANDLE, None)
        if handle is not None and handle.records:
            verdicts = item.stash.get(VERDICTS, [None] * len(handle.records))
            # Plain JSON on the report: pytest-xdist ships it to the controller unchanged.
            gate = _state(item.config).gating
            report.llmperf = [
                {"record": r.to_json(), "verdict": report_mod.verdict_json(v), "gate": gate}
                for r, v in zip(handle.records, verdicts)
            ]
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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Any:
    # Before yielding: every test has run, and the terminal summary (printed after the inner
    # hooks) must already know what the baseline update changed.
    config = session.config
    if not hasattr(config, "workerinput"):
        state = _state(config)
        # pytest-benchmark saves --benchmark-json in its own wrapper, and only when its fixture
        # ran; otherwise it warns "Not saving anything". When only llmperf measured, the file
        # is ours to write.
        bs = getattr(config, "_benchmarksession", None)
        if bs is not None and getattr(bs, "json", None) and not bs.benchmarks:
            state.benchmark_json = str(getattr(bs.json, "name", bs.json))
            bs.json = None
        state.finish()
        if state.errors and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return (yield)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    for line in _state(config).summary_lines(width=terminalreporter._tw.fullwidth):
        if line.startswith("= "):
            terminalreporter.write_sep("=", line[2:])
        else:
            terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    output_json.setdefault("benchmarks", []).extend(_state(config).benchmark_entries())


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = _state(config)
    lines = [f"llmperf: backends {', '.join(state.selected_backends)}; {state.describe()}"]
    if os.environ.get("CI") and not state.settings.no_gate and state.settings.update_baselines:
        lines.append("llmperf: updating baselines in CI: results are not gated")
    return lines
