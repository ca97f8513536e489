"""The minimum detectable regression: ``verdict.minimum_detectable`` and the MDE columns of
``llmperf baselines show`` (what a user reads to choose --llmperf-processes)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pytest_llmperf import baselines, cli
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.verdict import (
    GateSettings,
    between_run_spread,
    log_spread,
    minimum_detectable,
)

DATE = "2026-01-02T03:04:05Z"
KEY = "test_lat[batch_size=1,model=tiny-bloom]"


# -- the formula -----------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 4, 8, 16])
def test_without_spread_the_tolerance_is_all_the_gate_needs(processes):
    assert minimum_detectable(0.0, 5, processes, 0.01, 0.03) == pytest.approx(0.03)
    assert minimum_detectable(0.0, 5, processes, 0.01, 0.08) == pytest.approx(0.08)


def test_more_processes_detect_smaller_slowdowns_with_enough_stored_runs():
    mde = [minimum_detectable(0.03, 8, n, 0.01, 0.03) for n in (4, 8, 16)]
    assert mde[0] > mde[1] > mde[2] > 0.03


def test_a_noisier_machine_detects_only_larger_slowdowns():
    mde = [minimum_detectable(s, 5, 8, 0.01, 0.03) for s in (0.01, 0.02, 0.03, 0.04)]
    assert mde == sorted(mde) and len(set(mde)) == 4


def test_a_stricter_alpha_needs_a_larger_slowdown():
    assert minimum_detectable(0.03, 5, 8, 0.01 / 12, 0.03) > minimum_detectable(
        0.03, 5, 8, 0.01, 0.03
    )


def test_sigma_3_percent_5_runs_8_processes_is_about_8_percent():
    # By hand, the textbook approximation: Welch-Satterthwaite df with equal variances
    # = (1/5 + 1/8)^2 / (1/(5^2 * 4) + 1/(8^2 * 7)) = 0.105625 / 0.012232 = 8.64;
    # t_{0.99, 8.64} = 2.85, t_{0.90, 8.64} = 1.39; sqrt(1/5 + 1/8) = 0.570;
    # (2.85 + 1.39) * 0.03 * 0.570 = 0.0725 in logs, i.e. +7.5 % (above the 3 % tolerance).
    # That approximation reaches only ~83 % power (the 5 stored runs estimate their variance
    # poorly), so the simulated rule needs a little more: about +8.0 %.
    mde = minimum_detectable(0.03, 5, 8, 0.01, 0.03)
    assert 0.075 < mde < 0.085


def test_one_process_needs_the_allowance_plus_its_own_scatter():
    # allowed = max(3 %, 2 x 3 %) = 6 %; plus z_0.9 x sigma x sqrt(1 + (pi/2)/5)
    # = 1.2816 x 0.03 x 1.146 = 0.0441 in logs: log(1.06) + 0.0441 = 0.1023, i.e. about +10.8 %.
    mde = minimum_detectable(0.03, 5, 1, 0.01, 0.03)
    assert 0.10 < mde < 0.115


def test_the_answer_is_deterministic():
    first = minimum_detectable(0.021, 6, 8, 0.004, 0.05)
    minimum_detectable.__globals__["_detection_terms"].cache_clear()
    assert minimum_detectable(0.021, 6, 8, 0.004, 0.05) == first


def test_no_spread_or_a_single_run_has_no_answer():
    assert minimum_detectable(None, 5, 8, 0.01, 0.03) is None
    assert minimum_detectable(0.02, 1, 8, 0.01, 0.03) is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"spread": -0.01}, "spread"),
        ({"spread": math.nan}, "spread"),
        ({"processes_n": 0}, "processes_n"),
        ({"alpha": 1.5}, "alpha"),
        ({"power": 1.0}, "power"),
        ({"tolerance": -0.1}, "tolerance"),
    ],
)
def test_bad_input_is_an_error_naming_the_argument(kwargs, name):
    args = {"spread": 0.02, "runs_k": 5, "processes_n": 8, "alpha": 0.01, "tolerance": 0.03}
    with pytest.raises(ValueError, match=rf"^{name}="):
        minimum_detectable(**{**args, **kwargs})


# -- llmperf baselines show --------------------------------------------------------------------


def _store(root: Path, key: str, latencies: list[float], backend: str = "cpu") -> None:
    """One stored run per latency, as `llmperf baselines record --runs N` leaves them."""
    path = baselines.baseline_path(root, f"{backend}-box", "test_lat")
    for i, latency in enumerate(latencies):
        rec = Record(
            key=key,
            suite="test_lat",
            backend=backend,
            device_key=f"{backend}-box",
            outcome="ok",
            metrics={"e2e_latency_s": MetricValue.from_samples("e2e_latency_s", [latency] * 10)},
            provenance={"versions": {"torch": "2.1.0"}, "env": {}, "run_id": f"run{i}"},
            nodeid=f"test_lat.py::{key}",
        )
        baselines.update(
            path, [rec], device={"key": f"{backend}-box", "backend": backend}, suite="test_lat"
        )


def _show(capsys: pytest.CaptureFixture, *argv: str) -> tuple[str, list[str], dict[str, str]]:
    """(the MDE line, the header cells, the cells of the KEY row by header)."""
    assert cli.main(["baselines", "show", *argv]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head_at = next(i for i, line in enumerate(lines) if line.startswith("entry "))
    header = re.split(r"\s{2,}", lines[head_at].strip())
    row = next(line for line in lines if line.startswith(KEY + " "))
    cells = dict(zip(header, re.split(r"\s{2,}", row.strip())))
    return lines[head_at - 1], header, cells


MEDIANS = [1.00, 1.02, 0.99, 1.01, 1.03]


def test_show_gives_the_minimum_detectable_slowdown_per_process_count(tmp_path, capsys):
    _store(tmp_path, KEY, MEDIANS)
    _store(tmp_path, "test_one_run", [0.5])
    line, header, cells = _show(capsys, str(tmp_path))
    assert header[-6:] == ["log sd", "MDE N=1", "MDE N=4", "MDE N=8", "MDE N=16", "newest"]
    assert "alpha 0.01 per comparison" in line
    assert "tolerance 8.0% (the cpu backend's default)" in line
    spread = between_run_spread(MEDIANS)  # 1.4826 x MAD 0.01 / 1.01 = 1.47 %
    sd = log_spread(MEDIANS)  # sd of the logs: 1.57 %
    assert cells["between-run CV"] == f"{spread:.2%}" == "1.47%"
    assert cells["log sd"] == f"{sd:.2%}" == "1.57%"
    assert cells["MDE N=1"] == f"+{minimum_detectable(spread, 5, 1, 0.01, 0.08):.1%}"
    for n in (4, 8, 16):
        expected = minimum_detectable(sd, 5, n, 0.01, 0.08)
        assert cells[f"MDE N={n}"] == f"+{expected:.1%}"
    # A quiet machine: the 8 % tolerance limits; the median of the processes must clear it 9
    # times in 10, which needs a little more, the less the more processes there are.
    pct = [float(cells[f"MDE N={n}"].strip("+%")) for n in (4, 8, 16)]
    assert 8.0 < pct[2] < pct[1] < pct[0] < 11.0


def test_show_splits_the_run_wide_alpha_over_the_comparisons(tmp_path, capsys):
    _store(tmp_path, KEY, [1.00, 1.04, 0.97, 1.02, 1.06])
    _, _, wide = _show(capsys, str(tmp_path), "--tolerance", "0.03")
    line, _, strict = _show(capsys, str(tmp_path), "--tolerance", "0.03", "--comparisons", "12")
    assert "alpha 0.0042 per comparison (family alpha 0.05 / 12 gated comparisons)" in line
    assert "tolerance 3.0% (--tolerance)" in line
    sd = log_spread([1.00, 1.04, 0.97, 1.02, 1.06])
    level = GateSettings(comparisons=12).process_alpha
    assert strict["MDE N=8"] == f"+{minimum_detectable(sd, 5, 8, level, 0.03):.1%}"
    assert float(strict["MDE N=8"].strip("+%")) > float(wide["MDE N=8"].strip("+%"))
    assert strict["MDE N=1"] == wide["MDE N=1"]  # one process: no test, no alpha


def test_an_entry_with_one_run_has_no_spread_and_no_mde(tmp_path, capsys):
    _store(tmp_path, KEY, [1.0])
    _, _, cells = _show(capsys, str(tmp_path))
    assert cells["between-run CV"] == "(1 run)"
    assert [cells[f"MDE N={n}"] for n in (1, 4, 8, 16)] == ["-"] * 4


def test_one_slow_stored_run_shows_in_what_the_processes_can_detect(tmp_path, capsys):
    # The robust CV ignores the run 40 % slower (the one-process allowance must not widen),
    # but Welch's t sees its variance: with N processes the gate needs far more than +10 %.
    _store(tmp_path, KEY, [1.00, 1.01, 0.99, 1.00, 1.40])
    _, _, cells = _show(capsys, str(tmp_path))
    assert cells["between-run CV"] == "1.48%"  # 1.4826 x MAD 0.01 / 1.00
    assert float(cells["log sd"].strip("%")) > 14
    assert float(cells["MDE N=8"].strip("+%")) > 40
    assert float(cells["MDE N=1"].strip("+%")) < 12


def test_a_gate_that_cannot_see_a_doubling_says_so(tmp_path, capsys):
    _store(tmp_path, KEY, [1.0, 1.3])  # 2 runs, 21 % apart: Welch's t has 1 degree of freedom
    _, _, cells = _show(capsys, str(tmp_path))
    assert cells["MDE N=8"] == ">+100%"


def test_an_unknown_backend_falls_back_to_the_default_tolerance(tmp_path, capsys):
    _store(tmp_path, KEY, MEDIANS, backend="gone")
    line, _, _ = _show(capsys, str(tmp_path))
    assert "tolerance 3.0% (default; backend gone is not installed)" in line


@pytest.mark.parametrize(
    ("option", "value"), [("--tolerance", "8%"), ("--comparisons", "0"), ("--alpha", "2")]
)
def test_a_bad_option_is_a_one_line_error_naming_it(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["baselines", "show", str(tmp_path), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmperf baselines show: error: argument") and option in err
