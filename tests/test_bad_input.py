"""Hostile and mistaken input: each gets one line that names what is wrong, never a traceback,
a hang, a silently green run or a lost baseline."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest
from helpers import FAKE, GENERATE, baseline_file, no_traceback, one_line_error

from pytest_llmperf import baselines as bl
from pytest_llmperf import cli

# -- markers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ("gate=5", "expected a metric name or a list of metric names"),
        ("gate=None", "expected a metric name or a list of metric names"),
        ("gate=['e2e_latency_s', 3]", "unknown metric 3"),
        ("max_time_s=float('nan')", "expected a finite number ≥ 0"),
        ("max_time_s=-1", "expected a finite number ≥ 0"),
        ("min_tokens_per_s=float('inf')", "expected a finite number ≥ 0"),
        ("max_time_s=[1]", "expected a number ≥ 0"),
        ("rounds=5.5", "expected an integer ≥ 5"),
        ("tolerance=float('nan')", "expected a tolerance fraction"),
    ],
)
def test_a_bad_marker_value_is_a_one_line_usage_error(project, kwargs, problem):
    project.makepyfile(
        test_m=f"""
        import pytest

        @pytest.mark.llmperf({kwargs})
        def test_fn(llmperf):
            llmperf.measure(lambda: llmperf.backend.advance(0.25))
        """
    )
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = one_line_error(result)
    assert "test_m.py::test_fn" in line and problem in line, line
    no_traceback(result)


# -- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["café", "SDK2", "a b", "-x", ""])
def test_a_label_that_could_collide_with_another_is_refused(project, label):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, f"--llmperf-label={label}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "lowercase ASCII" in one_line_error(result)


def test_label_suggests_the_folded_name(project):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-label=SDK 1.21")
    assert "(e.g. 'sdk-1.21')" in one_line_error(result)


# -- calls -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, problem",
    [
        ('prompt=""', "llmperf.generate(prompt=''): expected non-empty text"),
        (
            "prompt_tokens=1000, new_tokens=100",
            "1000 prompt tokens + 100 new tokens exceed its context of 1024 positions",
        ),
        (
            'prompt="word " * 1100, new_tokens=10',
            "1100 prompt tokens + 10 new tokens exceed its context of 1024 positions",
        ),
    ],
)
def test_a_prompt_that_cannot_run_fails_with_one_line(project, call, problem):
    project.makepyfile(
        test_p=f"""
        def test_gen(llmperf):
            llmperf.generate(model="tiny-gpt2", engine="fake-engine", {call})
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{problem}*"])
    no_traceback(result)


def test_measuring_a_function_that_returns_a_generator_is_refused_and_stores_nothing(project):
    project.makepyfile(
        test_g="""
        def work():
            yield 1

        def test_gen(llmperf):
            llmperf.measure(work)
        """
    )
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*llmperf.measure(fn): fn returned a generator, so nothing ran while it was timed*"]
    )
    assert not (project.path / "baselines").exists()


# -- baseline files ----------------------------------------------------------------------------

HUGE_INT = "1" + "0" * 400


def recorded_file(project: pytest.Pytester) -> Path:
    project.makepyfile(test_gate=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    return project.path / "baselines" / "fake-chip" / "test_gate.json"


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda t: t.replace('"median": ', f'"median": {HUGE_INT} + 0 * ', 1), "not valid JSON"),
        (lambda t: t.replace("0.835938", HUGE_INT, 1), "expected a number ≥ 0"),
        (lambda t: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_a_corrupt_baseline_fails_with_one_line_in_the_gate_and_in_show(
    project, capsys, corrupt, problem
):
    path = recorded_file(project)
    path.write_text(corrupt(path.read_text()))
    before = path.read_bytes()
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{path}: *{problem}*"])
    assert "RecursionError" not in result.stdout.str()
    code = cli.main(["baselines", "show", str(project.path / "baselines")])
    _, err = capsys.readouterr()
    assert code == 2 and problem in err and len(err.splitlines()) == 1
    assert path.read_bytes() == before


def test_a_fifo_at_the_baseline_path_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "cpu-x" / "test_a.json"
    path.parent.mkdir()
    os.mkfifo(path)
    outcome: list[object] = []

    def load() -> None:
        try:
            bl.load(path)
        except bl.BaselineError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "loading a FIFO blocked"
    assert "is not a regular file" in str(outcome[0])


def test_an_unreadable_baseline_is_one_line_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "cpu-x" / "test_a.json"
    path.parent.mkdir()
    path.write_text("{}")

    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    # chmod 000 does not stop root, who runs CI here: make the read itself fail.
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(bl.BaselineError) as exc:
        bl.load(path)
    assert str(exc.value) == (f"{path}: cannot read (Permission denied); check its permissions")


def test_a_read_only_baseline_keeps_its_mode_when_updated(project):
    path = recorded_file(project)
    path.chmod(0o444)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert len(baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"]) == 2


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlinked_baseline_is_never_replaced_by_a_regular_file(project, tmp_path, dangling):
    path = recorded_file(project)
    target = tmp_path / "real.json"
    if not dangling:
        target.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(target)
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    assert path.is_symlink()
    if dangling:
        result.stdout.fnmatch_lines(
            [f"*{path}: is a symbolic link to {target}, which does not exist*"]
        )
    else:
        result.stdout.fnmatch_lines([f"ERROR baselines not updated: {path}: is a symbolic link*"])
    assert result.ret != 0


def test_a_full_disk_names_the_file_and_keeps_the_old_one(project, monkeypatch):
    path = recorded_file(project)
    before = path.read_bytes()
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(
        [f"ERROR baselines not updated: {path}: not written (No space left on device)*"]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_no_lock_file_lands_next_to_the_baselines(project):
    path = recorded_file(project)
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_gate.json"]


# -- the report command ------------------------------------------------------------------------


def test_report_into_a_missing_directory_is_one_line(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text('{"results": []}')
    code = cli.main(["report", str(results), "-o", str(tmp_path / "nodir" / "x.md")])
    _, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert "nodir/x.md" in line and "No such file or directory" in line


def test_show_names_a_fifo_instead_of_skipping_it(tmp_path, capsys):
    (tmp_path / "cpu-x").mkdir()
    os.mkfifo(tmp_path / "cpu-x" / "test_a.json")
    code = cli.main(["baselines", "show", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "test_a.json: is not a regular file" in err


def test_a_markdown_cell_with_a_pipe_stays_one_cell():
    from pytest_llmperf.report import summary_markdown

    row = {
        "nodeid": "t.py::test_x",
        "test_outcome": "passed",
        "record": {
            "key": "test_x[op=a|b]",
            "backend": "cpu",
            "device_key": "cpu-x",
            "outcome": "error",
            "note": "boom | bang",
        },
        "verdict": None,
    }
    text = summary_markdown([row])
    assert r"| `test_x[op=a\|b]` | outcome |" in text and r"boom \| bang" in text


def test_microsecond_timings_are_not_printed_as_zero():
    from pytest_llmperf.units import format_metric

    assert format_metric(4.2e-6, "time_s") == "4.20 µs"
    assert format_metric(0.0123, "time_s") == "12.30 ms"
