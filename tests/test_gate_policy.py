"""The gate policy (gate.decide) on synthetic records: confirmation, contention, strictness,
and when a run counts as a new level. Pure: no pytest project, no clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_llmperf.gate import GatePolicy, decide
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.verdict import GateSettings

BASE = [1.00, 1.01, 0.99, 1.00, 1.00]  # five runs, e2e median 1.0 s


def history() -> list[dict]:
    return [
        {
            "date": f"2026-11-{10 + i}T00:00:00Z",
            "outcome": "ok",
            "provenance": {},
            "metrics": {"e2e_latency_s": {"median": m, "samples": [m] * 10}},
        }
        for i, m in enumerate(BASE)
    ]


def rec(seconds: float, *, busy: float | None = None) -> Record:
    return Record(
        key="test_x",
        suite="test_s",
        backend="cpu",
        device_key="cpu-x",
        outcome="ok",
        metrics={"e2e_latency_s": MetricValue.from_samples("e2e_latency_s", [seconds] * 10)},
        busy_load=busy,
    )


class Remeasure:
    """Hands out the next measurement, and counts how often it was asked."""

    def __init__(self, *seconds: float) -> None:
        self.values: Iterator[float] = iter(seconds)
        self.calls = 0

    def __call__(self) -> Record:
        self.calls += 1
        return rec(next(self.values))


GATING = GatePolicy(gating=True, confirm=2)
UPDATING = GatePolicy(gating=False, confirm=2, updating=True)


def test_a_burst_is_re_measured_and_passes_without_a_new_level():
    again = Remeasure(1.0)
    d = decide(rec(1.5), history(), GateSettings(), GATING, again)
    assert not d.failed and again.calls == 1
    assert d.record.median == 1.0 and d.record.change is None
    assert "not confirmed: re-measured 1x (1.5 s, 1 s), judged on the best" in d.record.note


def test_a_real_regression_fails_after_every_measurement_regressed():
    again = Remeasure(1.4, 1.45)
    d = decide(rec(1.5), history(), GateSettings(), GATING, again)
    assert d.failed and again.calls == 2
    assert d.record.change == "regressed"
    assert d.record.measurements == [1.5, 1.4, 1.45]


def test_an_improvement_is_not_re_measured_while_only_gating():
    again = Remeasure()
    d = decide(rec(0.7), history(), GateSettings(), GATING, again)
    assert not d.failed and again.calls == 0 and d.record.change is None


def test_an_improvement_confirmed_while_updating_is_a_new_level():
    d = decide(rec(0.7), history(), GateSettings(), UPDATING, Remeasure(0.72, 0.71))
    assert d.record.change == "improved" and d.record.median == 0.72  # the worst of three


def test_an_improvement_with_a_slow_re_measurement_keeps_its_verdict_and_never_fails():
    """A slow re-measurement (a neighbour's job) must not turn an improvement into a red."""
    d = decide(rec(0.7), history(), GateSettings(), UPDATING, Remeasure(14.0))
    assert not d.verdict.failed and d.record.median == 0.7
    assert d.record.change is None
    assert "improvement not confirmed" in d.record.note


def test_a_regression_that_re_measures_as_an_improvement_is_no_level_change():
    d = decide(rec(1.5), history(), GateSettings(), UPDATING, Remeasure(0.7))
    assert d.record.change is None


@pytest.mark.parametrize("strict", [False, True])
def test_a_regression_on_a_busy_machine_is_inconclusive_unless_strict(strict):
    policy = GatePolicy(gating=True, confirm=0, strict=strict)
    d = decide(rec(1.5, busy=9.0), history(), GateSettings(), policy, None)
    assert d.failed is strict and d.inconclusive is not strict
    assert (d.verdict.worst.value == "inconclusive") is not strict
    assert d.record.change is None  # contended numbers never start a history


def test_an_absolute_limit_fails_even_on_a_busy_machine_and_is_no_level():
    settings = GateSettings(limits={"max_e2e_latency_s": 0.5})
    d = decide(rec(1.0, busy=9.0), history(), settings, GatePolicy(confirm=0), None)
    assert d.failed and not d.inconclusive and d.record.change is None


def test_with_confirmation_off_one_measurement_decides():
    d = decide(rec(1.5), history(), GateSettings(), GatePolicy(confirm=0), Remeasure())
    assert d.failed and d.record.change == "regressed"


def test_no_gate_reports_a_confirmed_regression_without_failing():
    policy = GatePolicy(gating=False, confirm=2)
    d = decide(rec(1.5), history(), GateSettings(), policy, Remeasure(1.5, 1.5))
    assert not d.failed and d.verdict.failed and d.record.change == "regressed"


def test_strict_asks_for_a_baseline():
    d = decide(rec(1.0), [], GateSettings(), GatePolicy(strict=True), None)
    assert d.missing_baseline and not d.failed


def test_rounds_scattered_beyond_a_quiet_device_make_a_regression_inconclusive():
    """The load average lags a minute behind a neighbour's job; the rounds' scatter does not."""
    record = rec(1.5)
    record.scatter = 0.55
    d = decide(record, history(), GateSettings(), GatePolicy(confirm=0), None)
    assert d.inconclusive and not d.failed and d.record.change is None


def test_confirmations_that_disagree_wildly_are_inconclusive_not_a_confirmed_regression():
    d = decide(rec(1.5), history(), GateSettings(), GATING, Remeasure(3.0, 4.2))
    assert d.record.scatter == pytest.approx(4.2 / 1.5 - 1)
    assert d.inconclusive and not d.failed


def test_the_scatter_of_rounds_is_measured_robustly():
    from pytest_llmperf.noise import scatter

    assert scatter([0.1] * 10) is None
    assert scatter([0.100, 0.101, 0.099, 0.100, 0.102]) is None
    noisy = [0.528, 0.532, 0.297, 0.199, 0.412, 0.244, 0.296, 0.175, 0.021, 0.023]
    assert scatter(noisy) > 0.5  # a run a trial user saw pass without a word
