"""Accepting new numbers: the command a failure recommends must make the next run pass.

The flow a user follows: record a baseline (three runs), the code gets slower, the gate fails,
the user accepts the new numbers (``--llmperf-update-baselines`` on the node, or
``llmperf baselines accept`` on the failing run's results.json downloaded from CI), and the
next plain run passes. A run that merely passed appends to the history as before.
"""

from __future__ import annotations

import json

import pytest
from fakes import COMPILE_S, steady_e2e
from helpers import FAKE, GENERATE, baseline_file

from pytest_llmperf import cli

SLOWER = "1.3"


@pytest.fixture
def three_runs(project: pytest.Pytester) -> pytest.Pytester:
    project.makepyfile(test_gate=GENERATE)
    for _ in range(3):  # what `llmperf baselines record --runs 3` does, in-process
        project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    assert len(runs(project)) == 3
    return project


def runs(project: pytest.Pytester) -> list[dict]:
    return baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"]


def medians(project: pytest.Pytester) -> list[float]:
    return [r["metrics"]["e2e_latency_s"]["median"] for r in runs(project)]


def test_update_after_a_confirmed_regression_starts_a_new_level_and_the_next_run_passes(
    three_runs, monkeypatch
):
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    failed = project.runpytest(FAKE)
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(
        ["*if the new numbers are right: pytest ... --llmperf-update-baselines*"]
    )
    before = medians(project)

    accepted = project.runpytest(FAKE, "--llmperf-update-baselines")
    accepted.assert_outcomes(passed=1)
    accepted.stdout.fnmatch_lines(
        [
            "test_gen: restarted (new level: history restarted (regressed, confirmed by "
            "re-measuring; 3 old run(s) dropped))"
        ]
    )
    assert len(runs(project)) == 1 and medians(project)[0] > max(before)

    project.runpytest(FAKE).assert_outcomes(passed=1)


def test_an_update_whose_run_passed_appends_to_the_history(three_runs):
    result = three_runs.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(["test_gen: appended (4 runs kept)"])


def test_a_burst_that_does_not_survive_confirmation_appends_instead_of_restarting(
    three_runs, monkeypatch
):
    # The first measurement is slow (a neighbour's job), the re-measurement is not.
    monkeypatch.setenv("FAKE_BURST", "1.5:12")
    result = three_runs.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(["test_gen: appended (4 runs kept)"])


def test_record_appends_runs_2_to_n_to_the_history_run_1_restarted(three_runs, monkeypatch, capfd):
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    code = cli.main(["baselines", "record", "--runs", "3", "--", FAKE, "-p", "no:cacheprovider"])
    out, _ = capfd.readouterr()
    assert code == 0
    assert "new level: history restarted" in out
    assert len(runs(project)) == 3  # run 1 restarted, runs 2 and 3 appended


def test_accept_stores_the_failing_runs_results_and_the_next_run_passes(
    three_runs, monkeypatch, capfd
):
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    project.runpytest(FAKE, "--llmperf-report=ci").assert_outcomes(failed=1)
    results = project.path / "ci" / "results.json"
    row = json.loads(results.read_text())["results"][0]
    assert row["gate_failed"] and row["record"]["change"] == "regressed"

    code = cli.main(["baselines", "accept", str(results)])
    out, _ = capfd.readouterr()
    assert code == 0
    assert f"{results}: 1 of 1 results into {project.path / 'baselines'}" in out
    assert "  test_gen: restarted (new level: history restarted" in out
    (run,) = runs(project)
    assert run["provenance"]["hostname"] == row["record"]["provenance"]["hostname"]
    project.runpytest(FAKE).assert_outcomes(passed=1)

    # Accepting the same file again stores nothing twice.
    assert cli.main(["baselines", "accept", str(results)]) == 0
    out, _ = capfd.readouterr()
    assert "test_gen: unchanged (this run is already stored)" in out
    assert len(runs(project)) == 1


def test_accept_skips_results_whose_test_failed_for_its_own_reason(project, capfd):
    project.makepyfile(
        test_gate="""
        def test_gen(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
            assert False, "the test's own check"
        """
    )
    project.runpytest(FAKE, "--llmperf-report=ci").assert_outcomes(failed=1)
    code = cli.main(["baselines", "accept", str(project.path / "ci" / "results.json")])
    out, _ = capfd.readouterr()
    assert code == 0
    assert "0 of 1 results into" in out and "; 1 not accepted" in out
    assert "nothing to accept" in out
    assert not (project.path / "baselines").exists()


def test_accept_keeps_the_runs_label(three_runs, capfd):
    project = three_runs
    project.runpytest(FAKE, "--llmperf-label=sdk2", "--llmperf-report=ci").assert_outcomes(passed=1)
    assert cli.main(["baselines", "accept", str(project.path / "ci" / "results.json")]) == 0
    out, _ = capfd.readouterr()
    assert "(label sdk2)" in out
    assert baseline_file(project.path, "test_gate", device="fake-chip@sdk2")["entries"]["test_gen"]


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\xff\xfe not utf-8", "not UTF-8 text"),
        (b'{"results": [{"verdict": null}]}', "results[0]: expected an object with a 'record'"),
        (
            b'{"results": [{"record": {"key": 1}}]}',
            "results[0].record.key: missing or not a string",
        ),
        (b"[" * 100000, "not valid JSON"),
    ],
)
def test_accept_of_a_bad_results_file_is_one_line_naming_the_file(
    tmp_path, capsys, content, problem
):
    bad = tmp_path / "results.json"
    bad.write_bytes(content)
    for command in (["baselines", "accept"], ["report"]):
        code = cli.main([*command, str(bad)])
        _, err = capsys.readouterr()
        assert code == 2
        (line,) = err.splitlines()
        assert line.startswith(f"llmperf: error: {bad}") and problem in line


def test_a_regression_on_a_busy_device_is_appended_and_says_why_not_a_new_level(
    three_runs, monkeypatch
):
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    monkeypatch.setenv("FAKE_LOAD", "50")
    strict = project.runpytest(FAKE, "--llmperf-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(
        ["*measured on a busy or shared device: accepting stores this run*"]
    )
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(
        [
            "test_gen: appended (4 runs kept; measured on a busy or shared device, so never a "
            "new level)"
        ]
    )


def test_a_kept_re_measurement_carries_the_first_measurements_warm_up_and_load_time(
    three_runs, monkeypatch
):
    """Re-measurements reuse the warm model and warm up once: their warm-up time is not the
    workload's, and an accepted run would otherwise store a halved warmup_s."""
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    monkeypatch.setenv("FAKE_BURST", "1.5:12")  # the first measurement is slower still
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    run = runs(project)[-1]
    # Stored with six significant digits.
    assert run["metrics"]["e2e_latency_s"]["median"] == pytest.approx(steady_e2e(100, 1.3), 1e-5)
    # Kept: the re-measurement's rounds, with the first measurement's load and warm-up
    # (the compile step plus two calls at the burst's speed).
    assert run["metrics"]["load_time_s"]["median"] == 0.5
    assert run["metrics"]["warmup_s"]["median"] == pytest.approx(
        COMPILE_S + 2 * steady_e2e(100, 1.3 * 1.5), rel=1e-5
    )


def test_accept_stores_into_the_projects_baselines_from_a_subdirectory(
    three_runs, monkeypatch, capfd
):
    project = three_runs
    monkeypatch.setenv("FAKE_SLOWDOWN", SLOWER)
    project.makefile(".ini", pytest="[pytest]\n")
    project.runpytest(FAKE, "--llmperf-report=ci").assert_outcomes(failed=1)
    results = project.path / "ci" / "results.json"
    data = json.loads(results.read_text())
    data["run"]["baselines"] = "/nonexistent/ci/node/baselines"  # a CI node's path
    results.write_text(json.dumps(data))
    sub = project.path / "tests" / "sub"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert cli.main(["baselines", "accept", str(results)]) == 0
    out, _ = capfd.readouterr()
    assert f"into {project.path / 'baselines'}" in out
    assert not (sub / "baselines").exists()
    assert cli.main(["baselines", "show"]) == 0  # from the subdirectory too
    assert "fake-chip / test_gate.json" in capfd.readouterr()[0]


def test_accept_refuses_a_label_that_could_collide(three_runs, capsys):
    project = three_runs
    project.runpytest(FAKE, "--llmperf-report=ci").assert_outcomes(passed=1)
    code = cli.main(
        ["baselines", "accept", str(project.path / "ci" / "results.json"), "--label", "Café"]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "label 'Café': expected a name of lowercase ASCII" in err
