"""``llmperf ab``: ordering, pairing and the paired statistics on synthetic process medians, and
the whole command end to end with fake sides (scripts that stand in for ``python -m pytest`` and
write a results.json where the parent asked for it; no real pytest runs in a child)."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Optional

import pytest

from pytest_llmperf import ab, baselines, cli
from pytest_llmperf.results import MetricValue, Record

SUITE = "test_lat"
DEVICE = "fake-chip"
BLOOM = "test_lat[batch_size=1,model=tiny-bloom,new_tokens=100]"
LLAMA = "test_lat[batch_size=1,model=tiny-llama,new_tokens=100]"


def record(
    key: str,
    value: Optional[float],
    *,
    outcome: str = "ok",
    metric: str = "e2e_latency_s",
    versions: Optional[dict[str, str]] = None,
) -> Record:
    metrics = {} if value is None else {metric: MetricValue(metric, value, [value] * 3)}
    return Record(
        key=key,
        suite=SUITE,
        backend="cpu",
        device_key=DEVICE,
        outcome=outcome,
        metrics=metrics,
        provenance={"versions": versions or {"torch": "2.13.0"}, "env": {}},
    )


def runs(
    medians: dict[str, list[float]], versions: Optional[dict[str, str]] = None
) -> list[list[Record]]:
    """Each process's records from per-workload lists of process medians."""
    count = len(next(iter(medians.values())))
    return [[record(k, v[i], versions=versions) for k, v in medians.items()] for i in range(count)]


def noisy(rng: random.Random, base: float, n: int, sd: float = 0.03) -> list[float]:
    return [base * math.exp(rng.gauss(0, sd)) for _ in range(n)]


# -- ordering and statistics ------------------------------------------------------------------


def test_processes_alternate_abba_so_each_pair_is_adjacent():
    order = ab.abba_order(4)
    assert "".join(order) == "ABBAABBA"
    a_at = [i for i, s in enumerate(order) if s == "A"]
    b_at = [i for i, s in enumerate(order) if s == "B"]
    # Pair i = the i-th A process with the i-th B process: neighbours in the order.
    assert all(abs(x - y) == 1 for x, y in zip(a_at, b_at))
    assert "".join(ab.abba_order(3)) == "ABBAAB"


def test_identical_environments_call_nothing_different():
    rng = random.Random(11)
    a = {f"test_lat[model=m{i}]": noisy(rng, 0.1 * (i + 1), 8) for i in range(6)}
    b = {k: noisy(rng, 0.1 * (i + 1), 8) for i, k in enumerate(a)}
    comparison = ab.compare(runs(a), runs(b))
    assert comparison.compared == 6
    assert {row.verdict for row in comparison.rows} == {ab.SAME}
    assert not comparison.slower
    assert comparison.confidence == pytest.approx(1 - 0.05 / 6)


def test_a_b_slower_by_ten_percent_is_caught_with_an_interval_excluding_one():
    rng = random.Random(5)
    a = {BLOOM: noisy(rng, 0.1, 8, sd=0.01), LLAMA: noisy(rng, 0.2, 8, sd=0.01)}
    b = {BLOOM: [v * 1.10 * math.exp(rng.gauss(0, 0.01)) for v in a[BLOOM]], LLAMA: a[LLAMA]}
    comparison = ab.compare(runs(a), runs(b))
    slow, same = comparison.rows
    assert slow.verdict == ab.SLOWER
    assert slow.interval is not None and 1 < slow.interval.low < 1.10 < slow.interval.high
    assert slow.interval.ratio == pytest.approx(1.10, abs=0.02)
    assert same.verdict == ab.SAME
    assert comparison.slower == [slow]


def test_a_b_faster_beyond_the_tolerance_is_called_faster():
    rng = random.Random(6)
    a = {BLOOM: noisy(rng, 0.1, 6, sd=0.01)}
    b = {BLOOM: [v * 0.9 for v in a[BLOOM]]}
    (row,) = ab.compare(runs(a), runs(b)).rows
    assert row.verdict == ab.FASTER


def test_a_significant_change_within_the_tolerance_is_no_difference():
    a = {BLOOM: [0.100, 0.101, 0.099, 0.100, 0.102, 0.098, 0.100, 0.101]}
    b = {BLOOM: [v * 1.005 for v in a[BLOOM]]}  # exactly +0.5 % in every pair: significant
    (row,) = ab.compare(runs(a), runs(b), tolerance=0.02).rows
    assert row.interval is not None and row.interval.low > 1
    assert row.verdict == ab.SAME
    (row,) = ab.compare(runs(a), runs(b), tolerance=0.0).rows
    assert row.verdict == ab.SLOWER


def test_fewer_than_three_pairs_is_inconclusive():
    comparison = ab.compare(runs({BLOOM: [0.1, 0.1]}), runs({BLOOM: [0.2, 0.2]}))
    (row,) = comparison.rows
    assert row.verdict == ab.INCONCLUSIVE
    assert row.interval is None
    assert "2 pair(s), 3 needed" in row.note
    assert comparison.compared == 0


def test_higher_is_better_metrics_are_judged_the_other_way():
    # tokens/s: B at 0.9 × A produces fewer tokens per second, so B is the slower one.
    interval = ab.paired_interval([100.0, 101, 99, 100], [90.0, 91, 89.5, 90.2], 0.95)
    assert interval.high < 1
    assert ab.decide(interval, lower_is_better=False, tolerance=0.02) == ab.SLOWER
    assert ab.decide(interval, lower_is_better=True, tolerance=0.02) == ab.FASTER


def test_a_aa_run_calls_any_workload_different_in_at_most_5_percent_of_tables():
    # Bonferroni over m workloads: the family-wise rate is bounded even with no minimum effect.
    rng = random.Random(2026)
    m, pairs, tables = 6, 8, 600
    confidence = 1 - 0.05 / m
    alarms = 0
    for _ in range(tables):
        called = False
        for _ in range(m):
            a, b = noisy(rng, 0.1, pairs), noisy(rng, 0.1, pairs)
            interval = ab.paired_interval(a, b, confidence)
            called |= ab.decide(interval, lower_is_better=True, tolerance=0.0) != ab.SAME
        alarms += called
    assert alarms / tables <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / tables)


def test_a_workload_missing_or_failing_on_one_side_is_reported_not_crashed_on():
    rng = random.Random(3)
    gone = "test_lat[model=gone-in-b]"
    a = runs({BLOOM: noisy(rng, 0.1, 4), LLAMA: noisy(rng, 0.2, 4), gone: noisy(rng, 0.3, 4)})
    b = runs({BLOOM: noisy(rng, 0.1, 4), LLAMA: noisy(rng, 0.2, 4)})
    for process in b:  # B runs out of memory on llama in every process
        process[1] = record(LLAMA, None, outcome="oom")
    b[2][0] = record(BLOOM, None, outcome="error")  # and one B process failed bloom
    rows = {row.workload[2]: row for row in ab.compare(a, b).rows}
    assert rows[BLOOM].verdict == ab.SAME
    assert rows[BLOOM].note == "B: error in 1 of 4 processes"
    assert rows[BLOOM].interval is not None and rows[BLOOM].interval.pairs == 3
    assert rows[LLAMA].verdict == "B failed (oom)"
    assert rows[LLAMA].note == "B: oom in 4 of 4 processes"
    assert rows[gone].verdict == ab.NOT_COMPARED
    assert rows[gone].note == "B: not run in 4 of 4 processes"


def test_labels_drop_the_parameters_every_workload_shares():
    ids = [(DEVICE, SUITE, BLOOM), (DEVICE, SUITE, LLAMA + ":first")]
    labels, common = ab.short_labels(ids)
    assert labels == {
        ids[0]: "test_lat[model=tiny-bloom]",
        ids[1]: "test_lat[model=tiny-llama]:first",
    }
    assert common == ["batch_size=1", "new_tokens=100"]
    braces = [(DEVICE, SUITE, "t[e={offload:disk,x:1},m=a]"), (DEVICE, SUITE, "t[e=x,m=a]")]
    labels, common = ab.short_labels(braces)
    assert labels[braces[0]] == "t[e={offload:disk,x:1}]" and common == ["m=a"]


def test_the_table_says_the_versions_that_differ_and_the_correction():
    rng = random.Random(8)
    a = runs({BLOOM: noisy(rng, 0.1, 4), LLAMA: noisy(rng, 0.2, 4)}, {"transformers": "4.55.4"})
    b = runs({BLOOM: noisy(rng, 0.1, 4), LLAMA: noisy(rng, 0.2, 4)}, {"transformers": "5.23.0"})
    sides = {
        "A": ab.Side("A", "/venvs/old", ["/venvs/old/bin/python"], python="/venvs/old/bin/python"),
        "B": ab.Side("B", "/venvs/new", ["/venvs/new/bin/python"], {"OMP_NUM_THREADS": "1"}),
    }
    comparison = ab.compare(a, b)
    text = ab.render_text(comparison, sides)
    assert "versions that differ (A → B): transformers 4.55.4 → 5.23.0" in text
    assert "95% simultaneous intervals (Bonferroni over 2 workloads" in text
    assert "env OMP_NUM_THREADS=1" in text
    assert "every workload: batch_size=1, new_tokens=100" in text
    assert re.search(r"test_lat\[model=tiny-bloom\]\s+e2e_latency_s\s+\d+(\.\d+)? ms", text)
    markdown = ab.render_markdown(comparison, sides)
    assert "| workload | metric | A median | B median | B/A (interval) | pairs | verdict |" in (
        markdown
    )
    assert "| `test_lat[model=tiny-llama]` | e2e_latency_s |" in markdown


# -- the command, end to end with fake sides --------------------------------------------------

FAKE_SIDE = """#!{python}
import json, os, sys

if sys.argv[1:2] == ["-c"]:  # the up-front check: the real interpreter answers it
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
assert sys.argv[1:3] == ["-m", "pytest"], sys.argv
if os.environ.get("FAKE_CRASH"):
    print("Fatal Python error: Segmentation fault (fake)", file=sys.stderr)
    sys.exit(3)
index = int(os.environ["LLMPERF_PROCESS"].split("/")[0])
factor = float(os.environ.get("FAKE_FACTOR", "1"))
wobble = (-0.004, 0.003, 0.001, -0.002, 0.004, -0.001, 0.002, -0.003)[index % 8]
rows = []
for template in json.load(open(os.environ["FAKE_RECORDS"])):
    value = template["metrics"]["time_s"]["median"] * factor * (1 + wobble)
    template["metrics"]["time_s"].update(median=value, samples=[value] * 3)
    template["provenance"]["versions"]["fakelib"] = os.environ.get("FAKELIB", "1.0")
    template["provenance"]["run_id"] = f"{{os.getpid()}}"
    rows.append({{"record": template}})
report = os.environ["LLMPERF_PROCESS_REPORT"]
os.makedirs(report)
with open(os.path.join(report, "results.json"), "w") as f:
    json.dump({{"run": {{}}, "results": rows}}, f)
"""


@pytest.fixture
def fake_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv directory whose bin/python is the fake side; records of two workloads."""
    templates = [
        record(f"test_kernel[size={n}]", base, metric="time_s").to_json()
        for n, base in ((64, 0.010), (128, 0.040))
    ]
    (tmp_path / "records.json").write_text(json.dumps(templates))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_SIDE.format(python=sys.executable))
    python.chmod(0o755)
    monkeypatch.setenv("FAKE_RECORDS", str(tmp_path / "records.json"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    return venv


def ab_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["ab", *argv])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_same_environment_twice_reports_no_difference(fake_side, capsys):
    code, out, err = ab_cli(capsys, "--a", str(fake_side), "--b", str(fake_side), "--pairs", "3")
    assert code == 0, err
    assert "llmperf ab: process 2/6 (B): 2 workloads" in out
    assert "versions that differ: none" in out
    rows = [line for line in out.splitlines() if line.startswith("test_kernel[")]
    assert len(rows) == 2 and all(line.endswith(ab.SAME) for line in rows)


def test_sides_with_other_device_keys_are_still_paired():
    # OMP_NUM_THREADS=1 on one side makes its CPU another device key: same node, same workload.
    a = runs({BLOOM: [0.10, 0.11, 0.10, 0.12]})
    b = runs({BLOOM: [0.10, 0.11, 0.10, 0.12]})
    for process in b:
        process[0].device_key = "cpu-1t"
    comparison = ab.compare(a, b)
    (row,) = comparison.rows
    assert row.verdict == ab.SAME and row.interval is not None and row.interval.pairs == 4
    sides = {"A": ab.Side("A", "a", ["a"]), "B": ab.Side("B", "b", ["b"])}
    assert "device keys differ (A → B): fake-chip → cpu-1t" in ab.render_text(comparison, sides)


def test_a_slower_b_exits_1_with_the_table_and_markdown(fake_side, capsys, tmp_path):
    code, out, err = ab_cli(
        capsys,
        *("--a", str(fake_side), "--b", str(fake_side / "bin" / "python")),
        *("--b-env", "FAKE_FACTOR=1.10", "--b-env", "FAKELIB=2.0", "--pairs", "3"),
        *("--markdown", "ab.md", "--", "tests/", "-k", "kernel", "--junitxml=x.xml"),
    )
    assert code == 1, err
    assert "versions that differ (A → B): fakelib 1.0 → 2.0" in out
    assert "env FAKE_FACTOR=1.10 FAKELIB=2.0" in out
    row = next(line for line in out.splitlines() if line.startswith("test_kernel[size=64]"))
    ratio, low, high = (float(x) for x in re.findall(r"\d\.\d{3}", row)[:3])
    assert ratio == pytest.approx(1.10, abs=0.01) and low > 1 and row.endswith(ab.SLOWER)
    assert "**B slower**" in (tmp_path / "ab.md").read_text()


def test_a_side_that_crashes_stops_with_exit_1_naming_the_side(fake_side, capsys):
    code, out, err = ab_cli(
        capsys, "--a", str(fake_side), "--b", str(fake_side), "--b-env", "FAKE_CRASH=1"
    )
    assert code == 1
    assert f"side B (--b {fake_side}): process 2/16 exited with 3 (an internal error)" in err
    assert "Segmentation fault (fake)" in err
    assert "process 1/16 (A)" in out and "process 2/16" not in out


def test_a_venv_without_python_is_a_usage_error_naming_the_option(tmp_path, capsys):
    (tmp_path / "empty-venv").mkdir()
    code, out, err = ab_cli(capsys, "--a", str(tmp_path / "empty-venv"), "--b", sys.executable)
    assert code == 2
    assert err.strip() == (
        f"llmperf: error: --a {tmp_path / 'empty-venv'}: no python in "
        f"{tmp_path / 'empty-venv' / 'bin'} (expected a python executable, a venv directory "
        "or an executable wrapper script)"
    )


def test_a_side_without_the_plugin_is_a_usage_error_naming_it(tmp_path, capsys):
    wrapper = tmp_path / "old-python"
    wrapper.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'pytest_llmperf'\" >&2\nexit 1\n"
    )
    wrapper.chmod(0o755)
    code, out, err = ab_cli(capsys, "--a", sys.executable, "--b", str(wrapper))
    assert code == 2
    assert err.strip() == (
        f"llmperf: error: --b {wrapper}: cannot import pytest_llmperf and pytest with it "
        "(ModuleNotFoundError: No module named 'pytest_llmperf')"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--a", "x", "--b", "y", "--a-env", "NOEQUALS"], "'NOEQUALS': expected KEY=VALUE"),
        (["--a", "x", "--b", "y", "--pairs", "0"], "'0': expected a positive integer"),
        (["--a", "x", "--b", "y", "--tolerance", "2"], "expected a fraction in [0, 1)"),
        (["--a", "x"], "the following arguments are required: --b"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(capsys, argv, expected):
    code, out, err = ab_cli(capsys, *argv)
    assert code == 2 and expected in err and "Traceback" not in err


def test_update_baselines_from_b_stores_its_n_runs(fake_side, capsys, tmp_path):
    # An older stack's history is there, its file describing the device more fully than a
    # record can (the name): B's runs replace the history, the description stays.
    old = record(
        "test_kernel[size=64]",
        0.010,
        metric="time_s",
        versions={"fakelib": "1.0", "torch": "2.13.0"},
    )
    path = baselines.baseline_path(tmp_path / "stored", DEVICE, SUITE)
    device = {"key": DEVICE, "backend": "cpu", "name": "Fake Chip 9000"}
    baselines.update(path, [old], device=device, suite=SUITE)
    code, out, err = ab_cli(
        capsys,
        *("--a", str(fake_side), "--b", str(fake_side), "--b-env", "FAKE_FACTOR=1.5"),
        *("--b-env", "FAKELIB=2.0", "--pairs", "3"),
        *("--update-baselines-from", "b", "--baselines", "stored"),
    )
    assert code == 1, err  # B is slower, and still stored: the user asked for B's numbers
    assert f"B's 3 runs into {tmp_path / 'stored'}, 3 runs kept per entry:" in out
    assert (
        "test_kernel[size=64]: restarted (history restarted: fakelib 1.0 → 2.0); "
        "then 2 more run(s) appended (3 runs kept)"
    ) in out
    assert "test_kernel[size=128]: added (1 run); then 2 more run(s) appended" in out
    data = json.loads(path.read_text())
    assert data["device"]["name"] == "Fake Chip 9000"
    history = data["entries"]["test_kernel[size=64]"]["runs"]
    assert len(history) == 3
    assert all(run["metrics"]["time_s"]["median"] > 0.010 * 1.4 for run in history)
