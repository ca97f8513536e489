"""A green run must say what it checked: how many workloads were judged against a baseline,
why the others were not, and --llmperf-strict fails a run that checked nothing.

Also where the baselines are looked up: a directory that does not move with pytest's rootdir,
and device aliases that let a pool of mixed SKUs share one baseline set deliberately.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FAKE, GENERATE, baseline_file, no_traceback, one_line_error

HEADLINE = "*= llmperf: {judged} of {total} workloads judged against a baseline =*"


@pytest.fixture
def recorded(project: pytest.Pytester) -> pytest.Pytester:
    project.makepyfile(test_gate=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    return project


def move_device(project: pytest.Pytester, new_key: str) -> None:
    """The baselines were recorded on another device (another SKU of the pool)."""
    root = project.path / "baselines"
    (root / "fake-chip").rename(root / new_key)


def test_a_run_with_its_baseline_says_every_workload_was_judged(recorded):
    result = recorded.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([HEADLINE.format(judged=1, total=1)])


def test_no_baselines_for_this_device_key_says_0_of_n_names_the_others_and_the_fix(recorded):
    move_device(recorded, "fake-board")
    result = recorded.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    root = recorded.path / "baselines"
    result.stdout.fnmatch_lines(
        [
            HEADLINE.format(judged=0, total=1),
            f"  1 not judged: no baselines for device key fake-chip in {root}",
            f"  {root} has baselines for: fake-board",
            "  to gate fake-chip against fake-board's baselines deliberately, add to "
            "pyproject.toml:",
            "      [[]tool.llmperf]",
            '      device_aliases = { "fake-chip" = "fake-board" }',
            "  to record baselines on this node: llmperf baselines record --runs 3 *",
        ]
    )


def test_strict_fails_a_run_that_judged_nothing(recorded):
    move_device(recorded, "fake-board")
    result = recorded.runpytest(FAKE, "--llmperf-strict")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([HEADLINE.format(judged=0, total=1)])


def test_an_entry_missing_from_the_file_is_named(recorded):
    recorded.makepyfile(
        test_gate=GENERATE
        + """
    def test_new(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
    """
    )
    result = recorded.runpytest(FAKE)
    path = recorded.path / "baselines" / "fake-chip" / "test_gate.json"
    result.stdout.fnmatch_lines(
        [HEADLINE.format(judged=1, total=2), f"  1 not judged: no entry for it in {path}"]
    )


def test_device_aliases_in_pyproject_gate_against_the_other_device_and_show_it(recorded):
    move_device(recorded, "fake-board")
    recorded.makefile(
        ".toml",
        pyproject='[tool.llmperf]\ndevice_aliases = { "fake-*" = "fake-board" }\n',
    )
    recorded.makefile(".ini", pytest="[pytest]\n")  # the rootdir keeps its ini file
    result = recorded.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "llmperf: device aliases (*pyproject.toml: [[]tool.llmperf] device_aliases): "
            "fake-* → fake-board",
            HEADLINE.format(judged=1, total=1),
        ]
    )
    # An update writes into the shared set and records which device measured it.
    recorded.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    runs = baseline_file(recorded.path, "test_gate", device="fake-board")["entries"]["test_gen"]
    assert runs["runs"][-1]["provenance"]["device_key"] == "fake-chip"


def test_device_aliases_as_ini_lines(recorded):
    move_device(recorded, "fake-board")
    recorded.makeini("[pytest]\nllmperf_device_aliases =\n    fake-chip = fake-board\n")
    result = recorded.runpytest(FAKE)
    result.stdout.fnmatch_lines([HEADLINE.format(judged=1, total=1)])


@pytest.mark.parametrize(
    "toml, problem",
    [
        ('device_aliases = { "fake-chip" = "Fake Board" }', "the target must be a device key"),
        ('device_aliases = { "fake-chip" = 3 }', "the target must be a device key"),
        ('device_aliases = "fake-board"', "expected a table of DEVICE_KEY = BASELINE_DEVICE_KEY"),
        # pytest reads pyproject.toml itself and reports broken TOML (one line, the file named)
        ("device_aliases = {", "pyproject.toml"),
    ],
)
def test_a_bad_device_alias_is_a_one_line_usage_error_naming_the_file(project, toml, problem):
    project.makepyfile(test_gate=GENERATE)
    # With a pytest.ini, pytest itself leaves pyproject.toml alone: the plugin reads it.
    project.makefile(".ini", pytest="[pytest]\n")
    project.makefile(".toml", pyproject=f"[tool.llmperf]\n{toml}\n")
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = one_line_error(result)
    assert "pyproject.toml" in line and problem in line


# -- every selected backend unavailable -------------------------------------------------------


def test_every_selected_backend_unavailable_is_said_and_fails_under_strict(project):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest("--llmperf-backend=fakeoff")
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*= llmperf: nothing measured: every selected backend was unavailable =*",
            "  1 test not run: fakeoff backend unavailable: ModuleNotFoundError: *fake_sdk*",
        ]
    )
    strict = project.runpytest("--llmperf-backend=fakeoff", "--llmperf-strict")
    assert strict.ret == pytest.ExitCode.TESTS_FAILED
    strict.stdout.fnmatch_lines(["ERROR --llmperf-strict: fakeoff backend unavailable*"])


def test_strict_fails_when_one_selected_backend_is_missing(recorded):
    result = recorded.runpytest("--llmperf-backend=fake,fakeoff", "--llmperf-strict")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [HEADLINE.format(judged=1, total=2), "  1 test not run: fakeoff backend unavailable*"]
    )


# -- where the baselines are ------------------------------------------------------------------


def test_a_report_option_with_a_space_does_not_move_the_baselines(
    recorded, tmp_path_factory, monkeypatch
):
    """`--llmperf-report /tmp/x/rep` once made pytest's rootdir /tmp/x, and every workload
    silently had no baseline; a +60% slowdown passed."""
    (recorded.path / "pytest.ini").unlink(missing_ok=True)
    elsewhere = tmp_path_factory.mktemp("x") / "rep"
    elsewhere.mkdir()  # pytest takes an existing path for a test path when it picks rootdir
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.6")
    result = recorded.runpytest_subprocess(
        FAKE, "test_gate.py", "--llmperf-report", str(elsewhere), "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"llmperf: *baselines {recorded.path / 'baselines'};*"])
    assert (elsewhere / "results.json").is_file()


def test_baselines_sit_next_to_the_ini_file_when_run_from_a_subdirectory(recorded):
    recorded.makeini("[pytest]\n")
    sub = recorded.path / "sub"
    sub.mkdir()
    shutil.move(str(recorded.path / "test_gate.py"), sub / "test_gate.py")
    recorded.chdir()
    import os

    os.chdir(sub)
    result = recorded.runpytest(FAKE, "test_gate.py")
    result.stdout.fnmatch_lines([HEADLINE.format(judged=1, total=1)])


def test_a_relative_baselines_option_is_read_from_where_pytest_was_started(recorded):
    (recorded.path / "baselines").rename(recorded.path / "elsewhere")
    result = recorded.runpytest(FAKE, "--llmperf-baselines=elsewhere")
    result.stdout.fnmatch_lines([HEADLINE.format(judged=1, total=1)])


@pytest.mark.parametrize(
    "option, make",
    [
        ("--llmperf-report", "file"),
        ("--llmperf-baselines", "file"),
        ("--llmperf-report", "file-parent"),
    ],
)
def test_a_path_option_that_cannot_be_a_directory_stops_before_anything_runs(
    recorded, option, make
):
    before = (recorded.path / "baselines" / "fake-chip" / "test_gate.json").read_bytes()
    (recorded.path / "afile").write_text("not a directory\n")
    value = "afile" if make == "file" else "afile/rep"
    result = recorded.runpytest(FAKE, f"{option}={value}", "--llmperf-update-baselines")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = one_line_error(result)
    assert f"{option}={value}" in line and "afile" in line
    no_traceback(result)
    after = (recorded.path / "baselines" / "fake-chip" / "test_gate.json").read_bytes()
    assert after == before  # nothing ran, nothing was written


def test_results_json_names_the_run_and_device(recorded):
    recorded.runpytest(FAKE, "--llmperf-report=rep").assert_outcomes(passed=1)
    data = json.loads((recorded.path / "rep" / "results.json").read_text())
    assert data["run"]["devices"]["fake-chip"]["name"] == "Fake Chip"
    assert Path(data["run"]["baselines"]) == recorded.path / "baselines"


# -- keys that would collide -------------------------------------------------------------------


def test_two_test_files_with_one_name_are_refused_before_they_share_a_baseline_file(project):
    for pkg in ("a", "b"):
        project.mkpydir(pkg)
        (project.path / pkg / "test_x.py").write_text(
            "def test_k(llmperf):\n    llmperf.measure(lambda: llmperf.backend.advance(0.25))\n"
        )
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = one_line_error(result)
    assert "a/test_x.py and" in line and "b/test_x.py would share" in line
    assert "rename one of the test files" in line


def test_parameters_without_a_stable_text_that_collapse_to_one_key_are_refused(project):
    project.makepyfile(
        test_obj="""
        import pytest

        class Cfg:
            def __init__(self, n):
                self.n = n

        @pytest.mark.parametrize("cfg", [Cfg(1), Cfg(2)])
        def test_obj(llmperf, cfg):
            llmperf.measure(lambda: llmperf.backend.advance(0.25 * cfg.n))
        """
    )
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "have the same baseline key 'test_obj[cfg=Cfg]'" in one_line_error(result)


# -- settings nobody reads -------------------------------------------------------------------


def test_a_misspelt_environment_variable_is_refused(project, monkeypatch):
    project.makepyfile(test_gate=GENERATE)
    monkeypatch.setenv("LLMPERF_TOLERENCE", "0.5")
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "LLMPERF_TOLERENCE: unknown variable (did you mean 'LLMPERF_TOLERANCE'?)" in (
        one_line_error(result)
    )


def test_an_unknown_tool_llmperf_key_is_refused(project):
    project.makepyfile(test_gate=GENERATE)
    project.makefile(".ini", pytest="[pytest]\n")
    project.makefile(".toml", pyproject='[tool.llmperf]\ndevice_alias = { "a" = "b" }\n')
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "device_alias: unknown key (did you mean 'device_aliases'?)" in one_line_error(result)


def test_an_alias_onto_a_device_without_baselines_says_the_alias_is_wrong(recorded):
    recorded.makefile(
        ".ini", pytest="[pytest]\nllmperf_device_aliases =\n    fake-chip = fake-nothing\n"
    )
    result = recorded.runpytest(FAKE)
    result.stdout.fnmatch_lines(
        [
            HEADLINE.format(judged=0, total=1),
            "*device_aliases (*) maps fake-chip onto fake-nothing, which has no baselines there*",
        ]
    )


def test_a_label_without_baselines_points_at_the_unlabelled_ones(recorded):
    result = recorded.runpytest(FAKE, "--llmperf-label=sdk2")
    result.stdout.fnmatch_lines(
        [
            "*no baselines for device key fake-chip@sdk2 in * (fake-chip without the label has "
            "baselines)",
            "*llmperf baselines record --runs 3 <your pytest arguments> --llmperf-label=sdk2",
        ]
    )


def test_what_this_node_cannot_run_is_said_but_does_not_make_the_count_short(recorded):
    """An 8-device test on a 2-device node is skipped by design: the count stays complete."""
    recorded.makepyfile(
        test_gate=GENERATE
        + """
    def test_eight(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10, devices=8)
    """
    )
    result = recorded.runpytest(FAKE)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            HEADLINE.format(judged=1, total=1),
            "  1 test skipped on this node: needs 8 fake devices, this node has 1",
        ]
    )
    only = recorded.runpytest(FAKE, "-k", "eight", "--llmperf-strict")
    only.stdout.fnmatch_lines(["*= llmperf: nothing measured: 1 tests skipped on this node =*"])
    assert only.ret == pytest.ExitCode.TESTS_FAILED
