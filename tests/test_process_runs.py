"""--llmperf-processes=N: child pytest runs (fake children), combining their records, the
multi-process verdict and its false-alarm rate on synthetic data."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes import steady_e2e
from helpers import FAKE, GENERATE, baseline_file, no_traceback, one_line_error, read_results

from pytest_llmperf import processes
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.verdict import GateSettings, Verdict, compare_metric, two_sample_p

# -- the child's command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kept",
    [
        (["suites", "--llmperf-processes", "8", "-k", "fp32"], ["suites", "-k", "fp32"]),
        (["--llmperf-processes=8", "-q"], ["-q"]),
        (["--llmperf-report", "out", "--junitxml=j.xml", "-x"], ["-x"]),
        (["-n", "2", "-nauto", "-n4", "--dist", "load", "t.py"], ["t.py"]),
        (["--llmperf-update-baselines", "--benchmark-json", "b.json", "-m", "cpu"], ["-m", "cpu"]),
        (["--llmperf-reset-baselines", "--llmperf-rounds=20"], ["--llmperf-rounds=20"]),
    ],
)
def test_child_args_drop_what_must_happen_once(args: list[str], kept: list[str]) -> None:
    assert processes.child_args(args) == kept


def test_child_args_turn_off_xdist_from_the_ini_file() -> None:
    # An `addopts = -n auto` would otherwise distribute the child's tests.
    assert processes.child_args(["-q"], xdist=True) == ["-q", "-n0"]


# -- one child (fake children: small python scripts) ---------------------------------------------

RECORD = {
    "key": "test_gen",
    "suite": "test_x",
    "backend": "fake",
    "device_key": "fake-chip",
    "outcome": "ok",
    "metrics": {"e2e_latency_s": {"median": 0.5, "samples": [0.5, 0.5]}},
}


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys, signal, subprocess, time\n"
        "from pathlib import Path\n"
        "report = Path(os.environ['LLMPERF_PROCESS_REPORT'])\n"
        "def write(rows):\n"
        "    report.mkdir(parents=True, exist_ok=True)\n"
        "    (report / 'results.json').write_text(json.dumps({'results': rows}))\n" + body
    )
    return [sys.executable, str(script)]


def _run(command: list[str], tmp_path: Path, **kw: Any) -> processes.ChildRun:
    env = {
        **os.environ,
        "LLMPERF_PROCESSES": "8",
        "LLMPERF_UPDATE_BASELINES": "1",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
    }
    return processes.run_child(command, index=2, total=4, cwd=tmp_path, env=env, **kw)


def test_a_child_reports_its_records_and_cannot_spawn_children(tmp_path: Path) -> None:
    body = (
        f"rec = dict({RECORD!r})\n"
        "env = os.environ\n"
        "rec['note'] = ','.join([env['LLMPERF_PROCESS'], env.get('LLMPERF_PROCESSES', '-'),\n"
        "    env.get('LLMPERF_UPDATE_BASELINES', '-'), env.get('GITHUB_STEP_SUMMARY', '-')])\n"
        "write([{'record': rec}])\n"
    )
    run = _run(_child(tmp_path, body), tmp_path)
    assert run.problem is None and run.returncode == 0
    assert [r.key for r in run.records] == ["test_gen"]
    # Process 2 of 4; it inherits neither the process count, the update flag nor the job's
    # step summary (the parent writes that one).
    assert run.records[0].note == "2/4,-,-,-"


def test_a_child_whose_tests_failed_still_counts(tmp_path: Path) -> None:
    run = _run(_child(tmp_path, f"write([{{'record': {RECORD!r}}}])\nsys.exit(1)\n"), tmp_path)
    assert run.problem is None and len(run.records) == 1


@pytest.mark.parametrize(
    "body, problem",
    [
        ("print('collecting boom'); sys.exit(4)\n", "exited with 4 (a usage error)"),
        ("print('collecting boom'); os.kill(os.getpid(), signal.SIGSEGV)\n", "killed by SIGSEGV"),
        ("print('collecting boom'); sys.exit(0)\n", "exited with 0 without writing results"),
        (
            "print('collecting boom'); report.mkdir(); (report / 'results.json').write_text('{')\n",
            "wrote unreadable results",
        ),
    ],
)
def test_a_crashed_child_is_a_problem_with_its_output(
    tmp_path: Path, body: str, problem: str
) -> None:
    run = _run(_child(tmp_path, body), tmp_path)
    assert run.failed and problem in str(run.problem)
    assert "collecting boom" in run.output_tail
    assert run.records == []


def test_a_hung_child_is_killed_with_its_own_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    body = (
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"Path({str(pidfile)!r}).write_text(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    ticks = iter(range(0, 10_000, 50))  # every clock read is 50 s later
    seen: list[float] = []
    run = _run(
        _child(tmp_path, body),
        tmp_path,
        timeout=60.0,
        clock=lambda: float(next(ticks)),
        poll=seen.append,
    )
    assert run.returncode is None
    assert run.problem == "did not finish within 60 s and was killed"
    assert seen == [50.0]  # one progress tick, then the limit
    # The grandchild went down with the child's process group: gone, or a zombie nobody
    # has reaped yet. SIGKILL is delivered asynchronously, so allow it a few seconds to die
    # (a grandchild left running would still be running after them).
    pid = int(pidfile.read_text())
    assert _dies_within(pid, seconds=10.0)


def _dies_within(pid: int, seconds: float) -> bool:
    import time

    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


# -- combining the processes' records ------------------------------------------------------------


def _record(median: float, *, outcome: str = "ok", key: str = "test_gen", **kw: Any) -> Record:
    metrics = (
        {
            "e2e_latency_s": MetricValue("e2e_latency_s", median, [median, median * 1.01]),
            "peak_memory_bytes": MetricValue("peak_memory_bytes", 2**20),
        }
        if outcome == "ok"
        else {}
    )
    return Record(
        key=key,
        suite="test_x",
        backend="fake",
        device_key="fake-chip",
        outcome=outcome,
        metrics=metrics,
        gated=["e2e_latency_s", "peak_memory_bytes"] if outcome == "ok" else [],
        **kw,
    )


def _pool(*children: list[Record], total: int | None = None) -> processes.ProcessPool:
    pool = processes.ProcessPool(total=total or len(children) + 1)
    for i, records in enumerate(children, 1):
        pool.add(processes.ChildRun(index=i, returncode=0, wall_s=1.0, records=records))
    return pool


def test_combined_record_is_the_median_of_the_process_medians() -> None:
    pool = _pool([_record(0.30)], [_record(0.10)])
    combined = pool.combine(_record(0.20))
    latency = combined.metrics["e2e_latency_s"]
    assert latency.processes == [0.30, 0.10, 0.20]  # children in order, the parent last
    assert latency.value == 0.20
    assert len(latency.samples) == 6
    assert combined.processes == 3
    assert combined.note.startswith("median of 3 processes")
    # What results.json carries reads back the same.
    again = Record.from_json(json.loads(json.dumps(combined.to_json())))
    assert again.metrics["e2e_latency_s"].processes == [0.30, 0.10, 0.20]
    assert again.processes == 3


def test_a_workload_a_child_did_not_run_or_ran_out_of_memory_is_said() -> None:
    pool = _pool([_record(0.3, key="other")], [_record(0.1, outcome="oom")], total=4)
    pool.add(processes.ChildRun(index=3, returncode=0, wall_s=1.0, records=[_record(0.25)]))
    combined = pool.combine(_record(0.2))
    assert combined.processes == 2
    assert "1 process(es) left out (oom)" in combined.note
    assert "1 process(es) did not run this workload" in combined.note


def test_differing_greedy_outputs_between_processes_are_noted() -> None:
    pool = _pool([_record(0.3, output_digest="a")])
    combined = pool.combine(_record(0.2, output_digest="b"))
    assert "greedy output differs between processes (2 digests)" in combined.note


def test_an_update_stores_every_process_as_a_run_and_a_new_level_starts_with_the_first() -> None:
    pool = _pool([_record(0.3)], [_record(0.1)])
    combined = pool.combine(_record(0.2))
    combined.change = "regressed"
    stored = pool.stored_records([combined])
    assert [r.value("e2e_latency_s") for r in stored] == [0.3, 0.1, 0.2]
    assert [r.change for r in stored] == ["regressed", None, None]
    assert all(r.metrics["e2e_latency_s"].processes == [] for r in stored)


def test_gated_comparisons_count_one_process() -> None:
    pool = _pool([_record(0.3), _record(0.3, key="b")], [_record(0.1)])
    assert pool.gated_comparisons() == 4


# -- the multi-process verdict -------------------------------------------------------------------


def _runs(medians: list[float]) -> list[dict[str, Any]]:
    return [
        {"outcome": "ok", "metrics": {"e2e_latency_s": {"median": m, "samples": [m]}}}
        for m in medians
    ]


def _current(values: list[float]) -> MetricValue:
    return MetricValue("e2e_latency_s", statistics.median(values), list(values), list(values))


def test_processes_are_judged_by_the_two_sample_rule_and_say_so() -> None:
    base = _runs([0.100, 0.102, 0.099, 0.101, 0.103])
    slower = [0.110, 0.111, 0.112, 0.109, 0.113, 0.110, 0.111, 0.112]
    mv = compare_metric("e2e_latency_s", _current(slower), base, GateSettings(comparisons=6))
    assert mv.verdict is Verdict.REGRESSED and mv.processes == 8
    assert "median of 8 processes vs 5 baseline runs" in mv.detail
    assert "alpha 0.05 over 6 gated comparisons" in mv.detail
    same = [0.101, 0.100, 0.102, 0.099, 0.101, 0.103, 0.100, 0.102]
    mv = compare_metric("e2e_latency_s", _current(same), base, GateSettings(comparisons=6))
    assert mv.verdict is Verdict.PASS


def test_a_significant_change_below_the_tolerance_passes() -> None:
    base = _runs([0.1000, 0.1001, 0.0999, 0.1000, 0.1001])
    # +2 %, measured very precisely: real, but below the 3 % worth a red.
    cur = [0.1020, 0.1021, 0.1019, 0.1020, 0.1021, 0.1020]
    mv = compare_metric("e2e_latency_s", _current(cur), base, GateSettings(tolerance=0.03))
    assert mv.verdict is Verdict.PASS and mv.p_value is not None and mv.p_value < 1e-6


def test_constant_values_need_no_test() -> None:
    assert two_sample_p([2.0, 2.0], [1.0, 1.0], greater=True) == 0.0
    assert two_sample_p([2.0, 2.0], [1.0, 1.0], greater=False) == 1.0
    assert two_sample_p([1.0, 1.0], [1.0, 1.0], greater=True) == 1.0


def test_bonferroni_lowers_the_level_with_the_number_of_comparisons() -> None:
    assert GateSettings(alpha=0.01, family_alpha=0.05, comparisons=2).process_alpha == 0.01
    assert GateSettings(alpha=0.01, family_alpha=0.05, comparisons=50).process_alpha == 0.001


def _rate(
    rng: random.Random, trials: int, k: int, n: int, factor: float, sd_base: float, sd_cur: float
) -> float:
    settings = GateSettings(tolerance=0.03, comparisons=12)
    red = 0
    for _ in range(trials):
        base = [0.1 * math.exp(rng.gauss(0, sd_base)) for _ in range(k)]
        cur = [0.1 * factor * math.exp(rng.gauss(0, sd_cur)) for _ in range(n)]
        v = compare_metric("e2e_latency_s", _current(cur), _runs(base), settings)
        red += v.verdict is Verdict.REGRESSED
    return red / trials


def test_false_alarm_rate_stays_within_its_bound_on_synthetic_processes() -> None:
    """A/A with process medians scattered 3 % (this host's between-process noise), K = 5
    stored runs and N = 8 processes: the per-comparison false-alarm rate must stay at or under
    the Bonferroni level (0.05 / 12 ≈ 0.42 %) plus three binomial standard errors, also when the
    stored runs come from a noisier day than this run (Welch, not a pooled variance)."""
    rng = random.Random(11)
    trials = 3000
    level = 0.05 / 12
    bound = level + 3 * math.sqrt(level * (1 - level) / trials)
    assert _rate(rng, trials, 5, 8, 1.0, 0.03, 0.03) <= bound
    assert _rate(rng, trials, 5, 8, 1.0, 0.05, 0.01) <= bound
    assert _rate(rng, trials, 5, 8, 1.0, 0.01, 0.05) <= bound


def test_a_ten_percent_slowdown_is_caught_on_quiet_processes() -> None:
    rng = random.Random(12)
    assert _rate(rng, 1000, 5, 8, 1.10, 0.015, 0.015) >= 0.95


# -- the plugin: N processes end to end, on the fake chip ----------------------------------------


def test_processes_judge_on_process_medians_and_store_n_runs(project: pytest.Pytester) -> None:
    project.makepyfile(test_x=GENERATE)
    # Fewer runs kept than processes measured: all three are kept all the same.
    result = project.runpytest(
        FAKE, "--llmperf-processes=3", "--llmperf-update-baselines", "--llmperf-baseline-runs=2"
    )
    result.assert_outcomes(passed=1)
    no_traceback(result)
    result.stdout.fnmatch_lines(
        [
            "*measuring in 3 processes: 2 child pytest run(s) of the 1 selected llmperf tests*",
            "*process 1 of 3 done in * s: 1 workload (1 ok)*",
            "*process 2 of 3 done*",
        ]
    )
    entry = baseline_file(project.path, "test_x")["entries"]["test_gen"]["runs"]
    assert len(entry) == 3  # three processes, three runs of history
    medians = [run["metrics"]["e2e_latency_s"]["median"] for run in entry]
    assert medians == [pytest.approx(steady_e2e(100), rel=1e-5)] * 3


def test_an_injected_slowdown_fails_and_identical_code_passes(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_x=GENERATE)
    project.runpytest(FAKE, "--llmperf-processes=3", "--llmperf-update-baselines")
    same = project.runpytest(FAKE, "--llmperf-processes=3", "--llmperf-report=out")
    same.assert_outcomes(passed=1)
    row = read_results(project.path / "out")[0]
    assert row["record"]["processes"] == 3
    processes_s = row["record"]["metrics"]["e2e_latency_s"]["processes"]
    assert processes_s == [pytest.approx(steady_e2e(100), rel=1e-5)] * 3
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.1")
    slower = project.runpytest(FAKE, "--llmperf-processes=3")
    slower.assert_outcomes(failed=1)
    slower.stdout.fnmatch_lines(["*median of 3 processes vs 3 baseline runs*"])


def test_a_crashing_child_fails_the_run_with_its_output(project: pytest.Pytester) -> None:
    project.makepyfile(test_x=GENERATE)
    conftest = project.path / "conftest.py"
    conftest.write_text(
        conftest.read_text() + "\nimport pytest\n\ndef pytest_sessionstart(session):\n"
        "    if os.environ.get('LLMPERF_PROCESS') == '1/3':\n"
        "        pytest.exit('child about to crash', returncode=3)\n"
    )
    result = project.runpytest(FAKE, "--llmperf-processes=3")
    assert result.ret == 1
    text = result.stdout.str() + result.stderr.str()
    assert "process 1 of 3 exited with 3 (an internal error); nothing was judged" in text
    assert "child about to crash" in text
    assert "INTERNALERROR" not in text


def test_a_test_one_child_did_not_collect_is_judged_on_the_others(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_x=GENERATE + "\n\ndef test_two(llmperf):\n" + GENERATE.split("\n", 2)[2]
    )
    conftest = project.path / "conftest.py"
    conftest.write_text(
        conftest.read_text() + "\ndef pytest_collection_modifyitems(config, items):\n"
        "    if os.environ.get('LLMPERF_PROCESS') == '1/3':\n"
        "        items[:] = [i for i in items if i.originalname != 'test_two']\n"
    )
    result = project.runpytest(FAKE, "--llmperf-processes=3", "--llmperf-report=out")
    result.assert_outcomes(passed=2)
    notes = {row["record"]["key"]: row["record"] for row in read_results(project.path / "out")}
    assert notes["test_two"]["processes"] == 2
    assert "1 process(es) did not run this workload" in notes["test_two"]["note"]
    assert notes["test_gen"]["processes"] == 3


def test_processes_refuse_xdist(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    project.makepyfile(test_x=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-processes=3", "-n", "2")
    assert "drop -n" in one_line_error(result)
    assert "--llmperf-processes=3" in one_line_error(result)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_process_counts_are_one_line_errors(project: pytest.Pytester, value: str) -> None:
    project.makepyfile(test_x=GENERATE)
    result = project.runpytest(FAKE, f"--llmperf-processes={value}")
    assert one_line_error(result).startswith(f"ERROR: --llmperf-processes={value}: expected")


def test_collect_only_runs_no_children(project: pytest.Pytester) -> None:
    project.makepyfile(test_x=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-processes=3", "--collect-only")
    assert "measuring in 3 processes" not in result.stdout.str()
