"""Workloads as data, run by launchers: the spec crosses process boundaries, one execute()
path measures it everywhere, and a child that dies, exits or hangs is a record, not a lost
session.

The process-launcher tests start real children (``python -m pytest_llmperf.worker``) that
import the fake chip from the pytester project's conftest; the torchrun tests start real rank
groups over gloo on this CPU.
"""

from __future__ import annotations

import json
import os

import psutil
import pytest
from fakes import FakeBackend, FakeEngine, steady_e2e
from helpers import FAKE, GENERATE, read_results, record_of

from pytest_llmperf import engines
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.launchers import Launchers, LaunchSettings, _choose_name
from pytest_llmperf.launchers.process import ProcessLauncher
from pytest_llmperf.launchers.torchrun import TorchrunLauncher
from pytest_llmperf.spec import RecordContext, WorkloadSpec, freeze_options

SPEC = WorkloadSpec(
    kind="generate",
    model="tiny-bloom",
    engine="fake-engine",
    engine_options=freeze_options({"attn": "sdpa", "layers": [1, 2]}, "opts"),
    dtype="bf16",
    batch_size=2,
    new_tokens=10,
    prompt="DeepSpeed is a machine learning framework",
    rounds=5,
    warmup=1,
)
CONTEXT = RecordContext(key="test_gen", suite="test_s", device_key="fake-chip")


# -- the spec ----------------------------------------------------------------------------------


def test_a_spec_round_trips_through_json():
    text = json.dumps(SPEC.to_json())
    assert WorkloadSpec.from_json(json.loads(text)) == SPEC
    assert SPEC.to_json()["engine_options"] == {"attn": "sdpa", "layers": [1, 2]}
    again = RecordContext.from_json(json.loads(json.dumps(CONTEXT.to_json())))
    assert again == CONTEXT


def test_an_engine_option_that_is_not_json_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match=r"engine_options\['fn'\]=.*not a JSON value"):
        freeze_options({"fn": print}, "engine_options")
    with pytest.raises(UsageError, match=r"engine_options\['x'\]=nan: not a JSON value"):
        freeze_options({"x": float("nan")}, "engine_options")


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"batch_size": 0}, "batch_size=0: expected a positive integer"),
        ({"kind": "train"}, "kind='train'"),
        ({"fresh": "always"}, "fresh='always'"),
        ({"bogus": 1}, "unknown field(s) bogus"),
    ],
)
def test_a_malformed_spec_from_another_process_is_refused_by_field(change, problem):
    data = {**SPEC.to_json(), **change}
    with pytest.raises(
        (ValueError, UsageError), match=problem.replace("(", r"\(").replace(")", r"\)")
    ):
        WorkloadSpec.from_json(data)


# -- one execute() path --------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend()
    engines.register(FakeEngine())
    return backend


def test_execute_on_the_fake_chip_measures_exactly_what_the_clock_says(fake):
    record = execute(SPEC, CONTEXT, fake, ModelCache())
    assert record.outcome == "ok"
    assert record.metrics["e2e_latency_s"].samples == [steady_e2e(10)] * 5
    assert record.value("load_time_s") == 0.5
    assert record.workload["prompt_tokens"] == 7 and record.workload["engine_options"] == {
        "attn": "sdpa",
        "layers": [1, 2],
    }


def test_a_cached_model_reports_its_load_time_only_on_the_record_that_loaded_it(fake):
    cache = ModelCache()
    first = execute(SPEC, CONTEXT, fake, cache)
    second = execute(SPEC.again(), CONTEXT, fake, cache)
    assert first.value("load_time_s") == 0.5 and "model_reused" not in first.workload
    assert "load_time_s" not in second.metrics and second.workload["model_reused"] is True
    # Measured again, the same numbers: re-measuring is executing the same spec again.
    assert second.metrics["e2e_latency_s"].samples == first.metrics["e2e_latency_s"].samples


def test_an_engine_id_that_is_not_implemented_is_a_usage_error_not_a_skip(project):
    missing = [e for e in engines.ENGINE_IDS if e not in engines.implemented()]
    if not missing:
        pytest.skip("every documented engine id is implemented")
    project.makepyfile(
        test_ds=f"""
        def test_ds(llmperf):
            llmperf.generate(model="tiny-bloom", engine="{missing[0]}")
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*engine '{missing[0]}' is not implemented in this version (implemented: *"]
    )


@pytest.mark.parametrize(
    "requested, devices, fresh, expected",
    [
        ("auto", 1, "no", "inline"),
        ("auto", 2, "no", "torchrun"),
        ("auto", 1, "round", "process"),
        ("process", 1, "no", "process"),
        ("torchrun", 1, "no", "torchrun"),
        ("inline", 2, "no", "launcher='inline' runs one device; devices=2 needs"),
        ("process", 4, "no", "torchrun"),
        ("inline", 1, "workload", "the inline launcher cannot give one"),
        ("deepspeed", 1, "no", "deepspeed"),
        ("rocket", 1, "no", "expected one of auto, inline, process, torchrun, deepspeed"),
    ],
)
def test_the_launcher_follows_the_workload_and_refuses_what_it_cannot_do(
    requested, devices, fresh, expected
):
    spec = WorkloadSpec(kind="generate", model="tiny-bloom", devices=devices, fresh=fresh)
    if " " not in expected:
        assert _choose_name(spec, requested) == expected
    else:
        with pytest.raises(UsageError, match=expected.replace("(", r"\(")):
            _choose_name(spec, requested)


def test_inline_never_runs_several_devices_as_one(project, monkeypatch):
    """A 4-device workload on one device would be stored as a 4-device number."""
    monkeypatch.setenv("FAKE_DEVICES", "4")
    project.makepyfile(
        test_tp="""
        def test_tp(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", devices=4, launcher="inline")
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*launcher='inline' runs one device; devices=4 needs*"])


# -- the process launcher, with real children ---------------------------------------------------


@pytest.fixture
def children(project, monkeypatch):
    """Child workers import the fake chip from the project's conftest."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(project.path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "conftest")
    return project


CRASHES = """
    import pytest

    @pytest.mark.parametrize("engine", ["fake-segfault", "fake-exit", "fake-hang"])
    def test_crash(llmperf, engine):
        llmperf.generate(model="tiny-bloom", engine=engine, new_tokens=10)

    def test_after(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
"""


def test_a_child_measures_the_same_numbers_as_this_process(children):
    children.makepyfile(test_gate=GENERATE)
    children.runpytest(FAKE, "--llmperf-report=a").assert_outcomes(passed=1)
    args = (FAKE, "--llmperf-report=b", "--llmperf-launcher=process")
    children.runpytest(*args).assert_outcomes(passed=1)
    inline = record_of(read_results(children.path / "a"), "test_gen")
    child = record_of(read_results(children.path / "b"), "test_gen")
    assert (
        child["metrics"]["e2e_latency_s"]["samples"]
        == inline["metrics"]["e2e_latency_s"]["samples"]
    )
    assert child["output_digest"] == inline["output_digest"]


# 10 s, not less: the timeout covers starting the worker (importing torch), which takes seconds
# on a loaded 2-core CI host and made a 3 s limit time out the crashing children too.
def test_a_child_that_dies_exits_or_hangs_is_an_error_and_the_session_goes_on(
    children, monkeypatch, tmp_path
):
    monkeypatch.setenv("FAKE_TEST_TAG", str(tmp_path))
    children.makepyfile(test_crash=CRASHES)
    result = children.runpytest(
        FAKE, "--llmperf-launcher=process", "--llmperf-timeout=10", "--llmperf-report=r"
    )
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*test_crash*engine=fake-segfault*worker died with SIGSEGV (signal 11); stderr tail:*",
            "*test_crash*engine=fake-exit*worker exited with code 3*",
            "*test_crash*engine=fake-hang*timed out after 10 s (--llmperf-timeout)*",
        ]
    )
    rows = read_results(children.path / "r")
    segv = record_of(rows, "test_crash[engine=fake-segfault]")
    assert segv["outcome"] == "error"
    assert "fake: about to dereference a bad pointer" in segv["note"]
    assert record_of(rows, "test_after")["outcome"] == "ok"
    assert processes_tagged(str(tmp_path)) == []


def test_a_workload_can_ask_for_a_fresh_process_per_round(children, fake):
    launchers = Launchers()
    spec = WorkloadSpec(
        kind="generate",
        model="tiny-bloom",
        engine="fake-engine",
        new_tokens=10,
        rounds=3,
        warmup=0,
        fresh="round",
    )
    try:
        record = launchers.choose(spec, "auto").run(spec, CONTEXT, fake)
    finally:
        launchers.close()
    assert record.outcome == "ok", record.note
    # Every round paid the first call of a fresh process (the fake chip's compile step).
    assert record.metrics["e2e_latency_s"].samples == [steady_e2e(10) + 2.0] * 3
    assert record.metrics["load_time_s"].samples == [0.5] * 3
    assert record.note.startswith("each round measured in a fresh process")


# -- torchrun, with real ranks over gloo --------------------------------------------------------


def test_two_ranks_generate_like_one_process_and_return_one_record(project, tmp_path):
    project.makepyfile(
        test_tp="""
        import pytest

        @pytest.mark.parametrize("devices", [1, 2])
        def test_tp(llmperf, devices):
            r = llmperf.generate(model="tiny-llama", new_tokens=10, devices=devices)
            assert r.ok, r.note
        """
    )
    result = project.runpytest_subprocess(
        "--llmperf-backend=cpu",
        "--llmperf-report=r",
        f"--llmperf-cache-dir={tmp_path}",
        "-p",
        "no:cacheprovider",
    )
    assert result.ret == 0, result.stdout.str()[-4000:]
    result.assert_outcomes(passed=2)
    rows = read_results(project.path / "r")
    one, two = record_of(rows, "test_tp"), record_of(rows, "test_tp[devices=2]")
    assert two["workload"]["devices"] == 2
    assert two["output_digest"] == one["output_digest"]  # the same weights, the same tokens
    assert len(two["metrics"]["e2e_latency_s"]["samples"]) == 10


def test_a_rank_that_crashes_fails_the_workload_with_its_exit_code(children, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_DEVICES", "2")
    children.makepyfile(
        test_tp="""
        def test_tp(llmperf):
            llmperf.generate(model="tiny-llama", engine="fake-rank-crash", new_tokens=10, devices=2)

        def test_after(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
        """
    )
    result = children.runpytest(FAKE, f"--llmperf-cache-dir={tmp_path}", "--llmperf-timeout=120")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["*torchrun exited with code 1 (first failure: rank 1, exit code 7)*"]
    )


# -- faults of the launchers' own machinery -----------------------------------------------------


def run_with_python(tmp_path, backend, script: str):
    """Run a workload through the process launcher with ``script`` standing in for Python."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(0o755)
    launcher = ProcessLauncher(LaunchSettings(python=str(python), timeout=30))
    spec = WorkloadSpec(kind="generate", model="tiny-bloom", engine="fake-engine")
    try:
        return launcher.run(spec, CONTEXT, backend)
    finally:
        launcher.close()


@pytest.mark.parametrize(
    "script, why",
    [
        ("echo 'Segmentation fault (core dumped)'", "worker answered something other than JSON"),
        ("exit 0", "worker exited (code 0) without replying"),
        (
            "echo 'broken install' >&2; exit 1",
            "worker exited with code 1; stderr tail:\nbroken install",
        ),
    ],
)
def test_a_worker_that_prints_garbage_or_nothing_is_an_error_with_its_stderr(
    tmp_path, fake, script, why
):
    record = run_with_python(tmp_path, fake, script)
    assert record.outcome == "error"
    assert why in record.note


def test_torchrun_missing_is_a_skip_with_the_reason(fake, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch.distributed.run" else real(name, *a),
    )
    spec = WorkloadSpec(kind="generate", model="tiny-llama", engine="fake-engine", devices=2)
    with pytest.raises(
        SkipWorkload, match="torchrun unavailable: torch.distributed.run cannot be imported"
    ):
        TorchrunLauncher(LaunchSettings()).run(spec, CONTEXT, fake)


@pytest.mark.parametrize("value", ["0.5", "abc", "nan", "-3"])
def test_a_timeout_below_one_second_or_not_a_number_is_a_usage_error(project, value):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, f"--llmperf-timeout={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: --llmperf-timeout={value}: expected a number of seconds ≥ 1"]
    )


def test_a_child_the_kernels_oom_killer_took_is_an_oom_not_an_error(tmp_path, fake, monkeypatch):
    """On a CPU host an out-of-memory is a SIGKILL; the cgroup's oom_kill count tells it."""
    from pytest_llmperf.launchers import process

    counts = iter([3, 4])
    monkeypatch.setattr(process, "oom_kills", lambda: next(counts))
    record = run_with_python(tmp_path, fake, "kill -9 $$")
    assert record.outcome == "oom"
    assert record.note.startswith("worker killed by the kernel's OOM killer")


def processes_tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (ours, however they were re-parented)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FAKE_TEST_TAG") == tag:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_a_rank_group_that_hangs_is_killed_whole_at_the_timeout(children, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_DEVICES", "2")
    monkeypatch.setenv("FAKE_TEST_TAG", str(tmp_path))
    children.makepyfile(
        test_tp="""
        def test_tp(llmperf):
            llmperf.generate(model="tiny-llama", engine="fake-hang", new_tokens=10, devices=2)
        """
    )
    result = children.runpytest(FAKE, f"--llmperf-cache-dir={tmp_path}", "--llmperf-timeout=25")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*timed out after 25 s (--llmperf-timeout); the rank group was killed*"]
    )
    # The ranks run in sessions of their own: look for them wherever they were re-parented.
    assert processes_tagged(str(tmp_path)) == []
