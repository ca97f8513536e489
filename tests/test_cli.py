"""The ``llmperf`` command: models, baselines show/diff/prune/record, report.

Read-only commands run in-process (``cli.main``) with their output captured; ``record`` and
``prune`` run for real, since they start pytest processes on a pytester project of the fake chip.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from helpers import FAKE, baseline_file

from pytest_llmperf import baselines, cli, report
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.units import format_value

KEY = "test_lat[batch_size=1,model=tiny-bloom]"
DATE = "2026-01-02T03:04:05Z"


def record(
    key: str = KEY,
    latency: float = 1.0,
    *,
    torch: str = "2.1.0",
    suite: str = "test_lat",
    device: str = "fake-chip",
    backend: str = "fake",
) -> Record:
    return Record(
        key=key,
        suite=suite,
        backend=backend,
        device_key=device,
        outcome="ok",
        metrics={"e2e_latency_s": MetricValue.from_samples("e2e_latency_s", [latency] * 10)},
        provenance={"versions": {"torch": torch, "pytest-llmperf": "0.1.0"}, "env": {}},
        nodeid=f"{suite}.py::{key}",
    )


def store(root: Path, *records: Record, device: str = "fake-chip", suite: str = "test_lat") -> Path:
    path = baselines.baseline_path(root, device, suite)
    baselines.update(
        path, list(records), device={"key": device, "backend": "fake"}, suite=suite, now=DATE
    )
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run a command that must fail as a usage error; return its one error line."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    # "llmperf: error: ..." or, from argparse, "llmperf baselines diff: error: ..."
    errors = [line for line in err.splitlines() if re.match(r"llmperf( [a-z]+)*: error: ", line)]
    assert len(errors) == 1, err
    return errors[0]


# -- models --------------------------------------------------------------------------------


def test_models_lists_the_catalog_with_bytes_per_dtype(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "name",
        "family",
        "task",
        "selected",
        "parameters",
        "fp32",
        "bf16",
        "int8",
        "int4",
        "source",
    ]
    ids = [line.split()[0] for line in lines[2:]]
    assert {"tiny-bloom", "bloom-176b", "mixtral-8x7b", "tiny-qwen2"} <= set(ids)
    bloom = next(line for line in lines if line.startswith("bloom-176b"))
    assert "bigscience/bloom" in bloom and " full " in bloom and "328.29 GiB" in bloom
    mixtral = next(line for line in lines if line.startswith("mixtral-8x7b"))
    assert "46,702.8 M" in mixtral and "by name" in mixtral


def test_models_lists_the_projects_registered_models(capsys, tmp_path, monkeypatch):
    (tmp_path / "shape.json").write_text(
        '{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, '
        '"num_hidden_layers": 2, "num_key_value_heads": 2, "intermediate_size": 128, '
        '"vocab_size": 512}',
        encoding="utf-8",
    )
    (tmp_path / "pyproject.toml").write_text(
        '[tool.llmperf.models]\nmy-shape = "shape.json"\ngone = "./missing"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "models")
    assert code == 1  # one registered model is broken: listed as an error, the rest shown
    row = next(line for line in out.splitlines() if line.startswith("my-shape"))
    assert "mistral" in row and "registered" in row and "seeded weights" in row
    assert "gone: no such checkpoint directory" in err


# -- baselines show ------------------------------------------------------------------------


def test_show_lists_entries_with_runs_median_and_between_run_spread(tmp_path, capsys):
    store(tmp_path, record(latency=1.0))
    store(tmp_path, record(latency=1.02))
    store(tmp_path, record("test_other", latency=0.5))
    code, out, _ = run_cli(capsys, "baselines", "show", str(tmp_path))
    assert code == 0
    assert "fake-chip / test_lat.json  (2 entries)" in out
    row = next(line for line in out.splitlines() if line.startswith(KEY)).split()
    cv = statistics.stdev([1.0, 1.02]) / statistics.mean([1.0, 1.02])
    assert row[1:4] == ["2", "ok", "e2e_latency_s"]
    assert " ".join(row[4:6]) == format_value(1.01, "s")
    assert row[6] == f"{cv:.2%}"
    assert row[-1] == DATE  # after the MDE columns (tests/test_mde_show.py)
    other = next(line for line in out.splitlines() if line.startswith("test_other"))
    assert "(1 run)" in other


def test_show_of_an_empty_directory_says_so(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "baselines", "show", str(tmp_path))
    assert code == 0
    assert out.strip() == f"no baseline files under {tmp_path}"


def test_show_of_a_corrupt_file_is_a_one_line_error_naming_it(tmp_path, capsys):
    path = store(tmp_path, record())
    path.write_text("{")
    line = usage_error(capsys, "baselines", "show", str(tmp_path))
    assert str(path) in line


def test_show_of_a_missing_directory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    line = usage_error(capsys, "baselines", "show", str(tmp_path / "nope"))
    assert line == f"llmperf: error: {tmp_path / 'nope'}: no such baseline directory"
    monkeypatch.chdir(tmp_path)  # the default, ./baselines, is not there either
    assert usage_error(capsys, "baselines", "show").endswith(
        "baselines: no such baseline directory"
    )


# -- baselines diff ------------------------------------------------------------------------


def _old_and_new(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    store(old, record(latency=1.0, torch="2.1.0"), record("test_same", 0.5), record("test_gone"))
    store(new, record(latency=1.2, torch="2.2.0"), record("test_same", 0.5), record("test_new"))
    return old, new


def test_diff_shows_old_new_ratio_and_the_versions_that_changed(tmp_path, capsys):
    old, new = _old_and_new(tmp_path)
    code, out, _ = run_cli(capsys, "baselines", "diff", str(old), str(new))
    assert code == 0
    lines = out.splitlines()
    slower = next(line for line in lines if f"`{KEY}` | e2e_latency_s" in line)
    cells = [cell.strip() for cell in slower.split("|")]
    assert cells[1:7] == [
        "fake-chip / test_lat",
        f"`{KEY}`",
        "e2e_latency_s",
        format_value(1.0, "s"),
        format_value(1.2, "s"),
        "×1.200",
    ]
    assert cells[7].startswith("regressed")
    # test_same holds the very same run on both sides: history, not a change.
    assert not any("`test_same`" in line for line in lines)
    assert "1 entries unchanged (no run added on the new side)." in lines
    assert any("`test_gone`" in line and "(removed)" in line for line in lines)
    assert any("`test_new`" in line and "added" in line for line in lines)
    assert lines[-2:] == ["Versions that changed:", "- fake-chip / test_lat: torch 2.1.0 → 2.2.0"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_diff_against_a_git_revision(tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    store(repo / "baselines", record(latency=1.0, torch="2.1.0"))
    git("add", "baselines")
    git("commit", "-q", "-m", "baseline")
    # The accepted new numbers, rewritten in the working tree as --llmperf-update-baselines does.
    store(repo / "baselines", record(latency=1.2, torch="2.2.0"))
    monkeypatch.chdir(repo)
    code, out, _ = run_cli(capsys, "baselines", "diff", "git:HEAD", "baselines")
    assert code == 0
    assert any(f"`{KEY}` | e2e_latency_s" in line and "×1.200" in line for line in out.splitlines())
    assert "- fake-chip / test_lat: torch 2.1.0 → 2.2.0" in out
    line = usage_error(capsys, "baselines", "diff", "git:no-such-rev", "baselines")
    assert "git:no-such-rev" in line and "unknown revision" in line


def test_diff_of_a_directory_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    store(tmp_path / "new", record())
    line = usage_error(capsys, "baselines", "diff", str(tmp_path / "nope"), str(tmp_path / "new"))
    assert "nope: no such baseline directory (use git:REV for a git revision)" in line


# -- report --------------------------------------------------------------------------------


def _results(path: Path, *records: Record) -> Path:
    rows = [
        {"nodeid": r.nodeid, "test_outcome": "passed", "record": r.to_json(), "verdict": None}
        for r in records
    ]
    return report.write_results(path, rows, {"label": None})


def test_report_merges_results_from_several_nodes(tmp_path, capsys, monkeypatch):
    a = _results(tmp_path / "node-a", record("test_a", 1.0))
    b = _results(tmp_path / "node-b", record("test_b", 2.0, device="cpu-x-2t", backend="cpu"))
    code, out, _ = run_cli(capsys, "report", str(a), str(b))
    assert code == 0
    assert "## fake: fake-chip" in out
    assert "## cpu: cpu-x-2t" in out
    assert "`test_a`" in out and "`test_b`" in out
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "report", str(a), str(b), "-o", "merged.md")
    assert code == 0
    assert out.strip() == "wrote merged.md (2 results from 2 files)"
    merged = (tmp_path / "merged.md").read_text()
    assert "## fake: fake-chip" in merged and "## cpu: cpu-x-2t" in merged


def test_report_of_a_file_that_is_not_results_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"benchmarks": []}))
    line = usage_error(capsys, "report", str(bogus))
    assert str(bogus) in line and "not an llmperf results.json" in line
    line = usage_error(capsys, "report", str(tmp_path / "missing.json"))
    assert "missing.json: cannot read (No such file or directory)" in line


# -- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "required: command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["baselines"], "required: action"),
        (["baselines", "diff", "only-one"], "required: new"),
        (["baselines", "record", "--runs", "many"], "'many': expected a positive integer"),
        (["baselines", "record", "--runs", "0"], "'0': expected a positive integer"),
        (["baselines", "diff", "a", "b", "--alpha", "5"], "expected a significance level"),
        (["baselines", "diff", "a", "b", "--alpha", "nan"], "expected a significance level"),
        (["baselines", "accept"], "required: results"),
        (["baselines", "accept", "r.json", "--baseline-runs", "0"], "expected a positive"),
        (["report"], "required: results"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(capsys, argv, expected):
    assert expected in usage_error(capsys, *argv)


# -- record and prune, for real ------------------------------------------------------------

MEASURED = """
    def test_a(llmperf):
        llmperf.measure(lambda: llmperf.backend.advance(0.25))

    def test_b(llmperf):
        llmperf.measure(lambda: llmperf.backend.advance(0.5), name="first")
"""


def test_record_appends_one_run_per_fresh_pytest_process(project, capfd):
    project.makepyfile(test_prj=MEASURED)
    code = cli.main(["baselines", "record", "--runs", "2", "--", FAKE, "-p", "no:cacheprovider"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "llmperf: recording run 1/2" in out
    assert "llmperf: recording run 2/2" in out
    entries = baseline_file(project.path, "test_prj")["entries"]
    assert sorted(entries) == ["test_a", "test_b:first"]
    assert [len(entry["runs"]) for entry in entries.values()] == [2, 2]


def test_record_stops_at_the_first_failing_run(project, capfd):
    project.makepyfile(
        test_prj="""
        def test_broken(llmperf):
            llmperf.measure(lambda: llmperf.backend.advance(0.25))
            assert False, "the workload's own check failed"
        """
    )
    code = cli.main(["baselines", "record", "--runs", "3", "--", FAKE, "-p", "no:cacheprovider"])
    out, err = capfd.readouterr()
    assert code == 1
    assert "llmperf: recording run 1/3" in out
    assert "recording run 2/3" not in out
    assert "llmperf: run 1 exited with 1; stopping (runs already recorded are kept)" in err
    assert not (project.path / "baselines").exists()


SCOPE = "pruning entries of fake-chip (other devices' entries are kept; --all-devices for all)"


def _stale_project(project: pytest.Pytester) -> tuple[Path, Path]:
    project.makepyfile(test_prj=MEASURED)
    root = project.path / "baselines"
    live = store(
        root,
        record("test_a", suite="test_prj"),
        record("test_b:first", suite="test_prj"),
        record("test_b:second", suite="test_prj"),
        record("test_gone", suite="test_prj"),
        suite="test_prj",
    )
    dead = store(root, record("test_x", suite="test_old"), suite="test_old")
    return live, dead


def _prune(yes: bool, capfd: pytest.CaptureFixture) -> tuple[int, list[str]]:
    argv = ["baselines", "prune", "--dir", "baselines"] + (["--yes"] if yes else [])
    code = cli.main(argv + ["--", FAKE, "-p", "no:cacheprovider"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    return code, out.splitlines()


KEPT = (
    "kept (their test files were not collected): fake-chip/test_old.json; if a suite was "
    "deleted, remove its baseline file by hand"
)


def test_prune_dry_run_lists_entries_no_collected_test_produces(project, capfd):
    live, dead = _stale_project(project)
    before = live.read_bytes(), dead.read_bytes()
    _, lines = _prune(False, capfd)
    assert lines == [
        KEPT,
        SCOPE,
        "would remove: baselines/fake-chip/test_prj.json: test_gone",
        "1 stale entries (1 from baselines/fake-chip/test_prj.json); run again with --yes to "
        "remove them",
    ]
    assert (live.read_bytes(), dead.read_bytes()) == before


def test_prune_yes_removes_them_and_keeps_named_workloads_of_live_tests(project, capfd):
    live, dead = _stale_project(project)
    _, lines = _prune(True, capfd)
    assert lines == [
        KEPT,
        SCOPE,
        "removed: baselines/fake-chip/test_prj.json: test_gone",
        "removed 1 stale entries: 1 from baselines/fake-chip/test_prj.json",
    ]
    assert dead.exists()  # test_old.py was not collected: its entries are not ours to judge
    assert sorted(baseline_file(project.path, "test_prj")["entries"]) == [
        "test_a",
        "test_b:first",
        "test_b:second",
    ]
    _, lines = _prune(True, capfd)
    assert lines == [
        KEPT,
        "nothing to prune under baselines (fake-chip): every entry is produced by a test",
    ]


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _prune_refused(project: pytest.Pytester, capfd: pytest.CaptureFixture, *paths: str) -> str:
    root = project.path / "baselines"
    before = _all_files(root)
    code = cli.main(["baselines", "prune", "--yes", "--", FAKE, "-p", "no:cacheprovider", *paths])
    out, err = capfd.readouterr()
    assert code == 2, out + err
    assert _all_files(root) == before  # nothing deleted, the @label directory included
    return err


def test_prune_of_an_empty_directory_refuses_and_deletes_nothing(project, capfd):
    _stale_project(project)
    labelled = baselines.baseline_path(project.path / "baselines", "fake-chip", "test_prj", "sdk2")
    labelled.parent.mkdir(parents=True)
    shutil.copy(project.path / "baselines" / "fake-chip" / "test_prj.json", labelled)
    (project.path / "emptydir").mkdir()
    err = _prune_refused(project, capfd, "emptydir")
    assert "pytest collected no tests" in err and "nothing pruned" in err


def test_prune_when_collection_fails_refuses_and_deletes_nothing(project, capfd):
    _stale_project(project)
    project.makepyfile(test_broken="import no_such_module_anywhere\n")
    err = _prune_refused(project, capfd)
    assert "collecting tests failed" in err and "nothing pruned" in err


def test_prune_of_one_file_leaves_the_entries_of_the_other_files_alone(project, capfd):
    """`prune test_b.py` must not call every entry of test_a.py stale."""
    _stale_project(project)
    project.makepyfile(test_other=MEASURED)
    other = store(
        project.path / "baselines", record("test_a", suite="test_other"), suite="test_other"
    )
    code = cli.main(
        ["baselines", "prune", "--yes", "--", FAKE, "-p", "no:cacheprovider", "test_other.py"]
    )
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "test_prj.json" in out and "removed:" not in out
    assert sorted(baseline_file(project.path, "test_prj")["entries"]) == [
        "test_a",
        "test_b:first",
        "test_b:second",
        "test_gone",
    ]
    assert other.exists()


def test_prune_keeps_other_devices_entries_and_takes_yes_after_the_paths(project, capfd):
    """A CPU box collects only tiny models: a Gaudi entry must not look stale there."""
    _stale_project(project)
    gaudi = record("test_gone", suite="test_prj", device="hpu-gaudi2", backend="hpu")
    other = store(project.path / "baselines", gaudi, suite="test_prj", device="hpu-gaudi2")
    before = other.read_bytes()
    code = cli.main(["baselines", "prune", "--", FAKE, "-p", "no:cacheprovider", "--yes"])
    out, _ = capfd.readouterr()
    assert code == 0 and "removed: baselines/fake-chip/test_prj.json: test_gone" in out
    assert other.read_bytes() == before
    code = cli.main(["baselines", "prune", "--all-devices", "--", FAKE, "-p", "no:cacheprovider"])
    out, _ = capfd.readouterr()
    assert "would remove: baselines/hpu-gaudi2/test_prj.json: test_gone" in out


def test_prune_does_not_call_deselected_tests_stale(project, capfd):
    _stale_project(project)
    code = cli.main(["baselines", "prune", "--", FAKE, "-p", "no:cacheprovider", "-k", "test_a"])
    out, _ = capfd.readouterr()
    assert code == 0
    assert "test_b:first" not in out and "test_prj.json: test_gone" in out


def test_prune_of_a_missing_baselines_directory_is_a_one_line_error(project, capfd):
    project.makepyfile(test_prj=MEASURED)
    code = cli.main(["baselines", "prune", "--dir", "nope", "--", FAKE, "-p", "no:cacheprovider"])
    _, err = capfd.readouterr()
    assert code == 2
    assert err.strip() == "llmperf: error: nope: no such baseline directory"


def test_report_tells_nodes_apart_when_several_share_a_device(tmp_path, capsys):
    def on(host: str, key: str) -> Record:
        rec = record(key)
        rec.provenance = {**rec.provenance, "hostname": host}
        return rec

    a = _results(tmp_path / "node-a", on("gpu-node-1", "test_a"))
    b = _results(tmp_path / "node-b", on("gpu-node-2", "test_a"))
    code, out, _ = run_cli(capsys, "report", str(a), str(b))
    assert code == 0
    assert "## fake: fake-chip on gpu-node-1" in out and "## fake: fake-chip on gpu-node-2" in out
