"""Batch-size series with OOM cells, and the memory cap (--llmperf-memory-limit) that shows
them on any machine: the seed throughput tables' ``oom`` columns as a user meets them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import FAKE, baseline_file, no_traceback, one_line_error, read_results, record_of

from pytest_llmperf import models
from pytest_llmperf.backends.cpu import CpuBackend
from pytest_llmperf.launchers import Launchers, LaunchSettings
from pytest_llmperf.settings import MEMORY_LIMIT_ENV
from pytest_llmperf.spec import WorkloadSpec

SERIES = """
    import pytest

    @pytest.mark.parametrize("engine", ["fake-batch-oom", "fake-engine"])
    @pytest.mark.parametrize("batch_size", [1, 8, 16, 32])
    def test_tp(llmperf, engine, batch_size):
        result = llmperf.generate(
            model="tiny-bloom", engine=engine, batch_size=batch_size, new_tokens=20
        )
        assert result.outcome in ("ok", "oom"), result.note
"""


def key(engine: str, batch_size: int) -> str:
    return f"test_tp[batch_size={batch_size},engine={engine}]"


def test_after_an_oom_cell_the_larger_batch_sizes_of_that_series_are_oom_without_running(
    project, monkeypatch
):
    monkeypatch.setenv("FAKE_OOM_BATCH", "8")
    project.makepyfile(test_series=SERIES)
    result = project.runpytest(FAKE, "--llmperf-report=out", "-p", "no:randomly")
    result.assert_outcomes(passed=8)
    rows = read_results(project.path / "out")
    assert record_of(rows, key("fake-batch-oom", 1))["outcome"] == "ok"
    measured = record_of(rows, key("fake-batch-oom", 8))
    assert measured["outcome"] == "oom"
    assert "out of memory while generating: fake: batch 8 does not fit" in measured["note"]
    for size in (16, 32):
        cell = record_of(rows, key("fake-batch-oom", size))
        assert cell["outcome"] == "oom"
        assert cell["note"].startswith("not run: batch size 8 of this series")
        assert cell["metrics"] == {}
    # Another engine is another series: its large batch sizes still run.
    for size in (1, 8, 16, 32):
        assert record_of(rows, key("fake-engine", size))["outcome"] == "ok"


def test_a_cell_that_was_ok_in_the_baseline_and_is_now_oom_fails(project, monkeypatch):
    project.makepyfile(test_series=SERIES)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=8)
    stored = baseline_file(project.path, "test_series")
    assert key("fake-batch-oom", 32) in stored["entries"]

    monkeypatch.setenv("FAKE_OOM_BATCH", "16")
    result = project.runpytest(FAKE, "-p", "no:randomly")
    result.assert_outcomes(passed=6, failed=2)
    no_traceback(result)
    text = result.stdout.str()
    assert "new-oom" in text
    for size in (16, 32):
        result.stdout.fnmatch_lines([f"FAILED *test_tp*{size}*fake-batch-oom*"])


def test_an_oom_cell_in_the_baseline_that_stays_oom_passes(project, monkeypatch):
    monkeypatch.setenv("FAKE_OOM_BATCH", "16")
    project.makepyfile(test_series=SERIES)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=8)
    entry = baseline_file(project.path, "test_series")["entries"][key("fake-batch-oom", 32)]
    assert "oom" in str(entry)
    project.runpytest(FAKE).assert_outcomes(passed=8)


def test_memory_limit_makes_the_estimate_record_large_batches_oom(project):
    spec = models.get("bloom-560m")  # the fake engine only counts its weights
    need_64 = models.estimate_generation_bytes(spec, "bf16", 64, models.SEED_PROMPT_TOKENS, 100)
    need_1 = models.estimate_generation_bytes(spec, "bf16", 1, models.SEED_PROMPT_TOKENS, 100)
    cap = (need_1 + need_64) // 2
    assert cap > 2**30
    project.makepyfile(
        test_cap="""
        import pytest

        @pytest.mark.parametrize("batch_size", [1, 64, 128])
        def test_cap(llmperf, batch_size):
            llmperf.generate(model="bloom-560m", engine="fake-engine", batch_size=batch_size)
        """
    )
    result = project.runpytest(FAKE, "--llmperf-report=out", f"--llmperf-memory-limit={cap}")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"llmperf: memory capped at * (--llmperf-memory-limit={cap})*"])
    rows = read_results(project.path / "out")
    assert record_of(rows, "test_cap[batch_size=1]")["outcome"] == "ok"
    big = record_of(rows, "test_cap[batch_size=64]")
    assert big["outcome"] == "oom"
    assert big["note"].startswith("not run: estimated need ")
    assert record_of(rows, "test_cap[batch_size=128]")["note"].startswith(
        "not run: batch size 64 of this series"
    )
    # Without the cap the same workloads all run.
    project.runpytest(FAKE, "--llmperf-report=out2").assert_outcomes(passed=3)
    assert all(r["record"]["outcome"] == "ok" for r in read_results(project.path / "out2"))


@pytest.mark.parametrize("value", ["-1", "2G", "lots", "0", "450MiB", "99999999999TiB"])
def test_a_bad_memory_limit_is_a_one_line_error_naming_the_option(project, value):
    project.makepyfile(test_x="def test_x(): pass")
    result = project.runpytest(FAKE, f"--llmperf-memory-limit={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--llmperf-memory-limit={value}" in one_line_error(result)


def test_under_a_memory_cap_a_cpu_workload_runs_in_a_capped_child_process():
    spec = WorkloadSpec(kind="generate", model="tiny-bloom")
    capped = Launchers(LaunchSettings(memory_limit=2**31))
    assert type(capped.choose(spec, "auto", CpuBackend())).__name__ == "ProcessLauncher"
    assert capped.settings.child_env()[MEMORY_LIMIT_ENV] == str(2**31)
    plain = Launchers(LaunchSettings())
    assert type(plain.choose(spec, "auto", CpuBackend())).__name__ == "InlineLauncher"
    assert MEMORY_LIMIT_ENV not in plain.settings.child_env()


def test_a_capped_cpu_worker_turns_a_too_large_allocation_into_an_oom_not_a_kill():
    # In a child, as a worker is: the cap is a real limit there, so it must not touch pytest.
    code = textwrap.dedent(
        """
        import torch
        from pytest_llmperf.backends.cpu import CpuBackend
        from pytest_llmperf.execute import is_oom

        backend = CpuBackend()
        backend.limit_memory(768 * 2**20, in_worker=True)
        usable = backend.usable_memory_bytes()
        assert 0 < usable < 768 * 2**20, usable
        try:
            torch.ones(2**30 // 4)
        except Exception as exc:
            print("oom" if is_oom(exc, backend) else f"other: {exc!r}")
        print("after", torch.ones(1000).sum().item())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["oom", "after", "1000.0"], out.stderr


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 1288490188 bytes. Error code 12 (Cannot allocate memory)",
        "unable to mmap 497774208 bytes from file </c/model.safetensors>: Cannot allocate "
        "memory (12)",
    ],
)
def test_what_a_capped_cpu_process_raises_is_recorded_as_oom_not_as_a_crash(message):
    from pytest_llmperf.execute import is_oom

    assert is_oom(RuntimeError(message), CpuBackend())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), CpuBackend())
