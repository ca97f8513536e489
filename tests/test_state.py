"""The gate's settings as the run state assembles them for one record."""

from pathlib import Path

from pytest_llmperf.settings import MarkerOptions, resolve
from pytest_llmperf.state import RunState


def state(cli: dict) -> RunState:
    settings = resolve(cli=lambda name: cli.get(name), ini=lambda key: "", inifile=None, environ={})
    return RunState.create(settings, rootdir=Path("."))


def test_cpu_gets_its_measured_default_tolerance_and_accelerators_keep_3_percent():
    run = state({})
    assert run.gate_settings(MarkerOptions(), None, backend="cpu").tolerance == 0.08
    assert run.gate_settings(MarkerOptions(), None, backend="cuda").tolerance == 0.03
    assert "cpu 8.0%" in run.describe()


def test_a_tolerance_the_user_sets_wins_over_the_backend_default():
    assert (
        state({"tolerance": "0.05"}).gate_settings(MarkerOptions(), None, backend="cpu").tolerance
        == 0.05
    )
    marker = MarkerOptions(tolerance={"*": 0.2})
    assert state({}).gate_settings(marker, None, backend="cpu").tolerance == 0.2
    call = {"tolerance": {"*": 0.3}}
    assert state({}).gate_settings(marker, call, backend="cpu").tolerance == 0.3
