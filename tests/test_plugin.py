"""The pytest plugin as a user meets it: a project, a pytest command, what the terminal and the
files say afterwards.

Every project here runs on the fake chip of ``tests/fakes.py`` (``--llmperf-backend=fake``):
its clock moves only when the fake engine generates, so every number is known in advance and
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fakes import (
    COMPILE_S,
    DECODE_S,
    LOAD_S,
    PEAK_BYTES,
    PREFILL_S,
    steady_e2e,
)
from helpers import (
    FAKE,
    GENERATE,
    baseline_file,
    no_traceback,
    one_line_error,
    read_results,
    record_of,
    samples,
)

import pytest_llmperf
from pytest_llmperf import models
from pytest_llmperf.units import format_value

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR

# -- 1. selecting and skipping by backend ------------------------------------------------------

SELECTION = """
    import pytest

    def test_model(llmperf_backend):
        assert llmperf_backend.name in ("fake", "cpu")

    def test_host(cpu_backend):
        assert cpu_backend.name == "cpu"

    def test_plain():
        pass
"""


def test_backend_marker_selects_the_tests_that_run_on_that_backend(project):
    project.makepyfile(test_sel=SELECTION)
    result = project.runpytest("--llmperf-backend=fake,cpu", "--strict-markers", "-m", "fake", "-v")
    result.assert_outcomes(passed=1, deselected=3)
    result.stdout.fnmatch_lines(["*test_sel.py::test_model[[]fake[]] PASSED*"])


def test_cpu_backend_fixture_puts_its_test_under_the_cpu_marker(project):
    project.makepyfile(test_sel=SELECTION)
    result = project.runpytest("--llmperf-backend=fake,cpu", "--strict-markers", "-m", "cpu", "-v")
    result.assert_outcomes(passed=2, deselected=2)
    result.stdout.fnmatch_lines(
        ["*test_sel.py::test_model[[]cpu[]] PASSED*", "*test_sel.py::test_host PASSED*"]
    )


def test_auto_runs_on_the_accelerator_present_and_not_also_on_cpu(project):
    project.makepyfile(test_sel=SELECTION)
    result = project.runpytest("-v", "-k", "test_model")
    # The fake chip counts as an accelerator (so would a real GPU on the machine running this).
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*test_model[[]fake[]] PASSED*"])
    assert "test_model[cpu]" not in result.stdout.str()


def test_backend_whose_sdk_is_missing_is_skipped_with_the_probe_reason(project):
    project.makepyfile(test_sel=SELECTION)
    result = project.runpytest("--llmperf-backend=fakeoff", "-rs", "-k", "test_model")
    result.assert_outcomes(skipped=1, deselected=2)
    result.stdout.fnmatch_lines(
        ["SKIPPED*fakeoff backend unavailable: ModuleNotFoundError: No module named 'fake_sdk'"]
    )


def _cuda_available() -> bool:
    from pytest_llmperf import backends

    return backends.get_backend("cuda").probe().available


@pytest.mark.skipif("_cuda_available()", reason="this machine has CUDA: nothing to skip")
def test_cuda_on_a_machine_without_it_is_skipped_with_the_probe_reason(project):
    from pytest_llmperf import backends

    reason = backends.get_backend("cuda").probe().reason
    project.makepyfile(test_sel=SELECTION)
    result = project.runpytest("--llmperf-backend=cuda", "-rs", "-k", "test_model")
    result.assert_outcomes(skipped=1, deselected=2)
    skipped = [line for line in result.stdout.lines if line.startswith("SKIPPED")]
    assert len(skipped) == 1
    assert skipped[0].endswith(f"cuda backend unavailable: {reason}")


DEVICES = """
    import pytest

    @pytest.mark.devices(4)
    def test_tensor_parallel(llmperf_backend):
        pass
"""


def test_devices_marker_skips_on_a_node_with_too_few_devices(project):
    project.makepyfile(test_tp=DEVICES)
    result = project.runpytest(FAKE, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*needs 4 fake devices, this node has 1*"])


def test_devices_marker_runs_on_a_node_with_enough_devices(project, monkeypatch):
    monkeypatch.setenv("FAKE_DEVICES", "4")
    project.makepyfile(test_tp=DEVICES)
    project.runpytest(FAKE).assert_outcomes(passed=1)


def test_generate_on_more_devices_than_the_node_has_is_skipped(project):
    project.makepyfile(
        test_tp="""
        def test_tp(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", devices=2)
        """
    )
    result = project.runpytest(FAKE, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*needs 2 fake devices, this node has 1*"])


@pytest.mark.parametrize("arg", ["0", '"x"', "1, 2"])
def test_devices_marker_without_one_positive_integer_is_a_usage_error(project, arg):
    project.makepyfile(
        test_tp=f"""
        import pytest

        @pytest.mark.devices({arg})
        def test_tp(llmperf_backend):
            pass
        """
    )
    result = project.runpytest(FAKE)
    assert result.ret == USAGE_ERROR
    assert "marker devices(n) needs one positive integer" in one_line_error(result)
    no_traceback(result)


# -- 2. token count ----------------------------------------------------------------------------


def test_engine_that_returns_too_few_tokens_fails_the_test_naming_both_counts(project):
    project.makepyfile(
        test_short="""
        def test_short(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-short", new_tokens=100)
        """
    )
    result = project.runpytest(FAKE, "--llmperf-update-baselines", "--llmperf-report=out")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*generate returned 99 new tokens but 100 were requested*"])
    # Reported as an error, and an error never becomes a baseline.
    result.stdout.re_match_lines([r"test_short\s+fake\s+error\s"])
    record = record_of(read_results(project.path / "out"), "test_short")
    assert record["outcome"] == "error"
    assert record["note"].startswith("TokenCountError: round 1: generate returned 99")
    assert not (project.path / "baselines").exists()


# -- 3./4. warm-up, rounds, TTFT/TPOT ----------------------------------------------------------


def test_warmup_calls_are_timed_apart_from_the_rounds(project):
    project.makepyfile(test_gen=GENERATE)
    result = project.runpytest(
        FAKE, "--llmperf-rounds=7", "--llmperf-warmup=2", "--llmperf-report=out"
    )
    result.assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    steady = steady_e2e(100)
    # The first call compiles; it and the second call are warm-up, none of it in the rounds.
    assert record["metrics"]["warmup_s"]["median"] == COMPILE_S + 2 * steady
    assert samples(record, "e2e_latency_s") == [steady] * 7
    assert record["metrics"]["e2e_latency_s"]["median"] == steady
    assert record["workload"]["rounds"] == 7
    assert record["metrics"]["load_time_s"]["median"] == LOAD_S


def test_ttft_and_tpot_are_the_prefill_and_decode_steps_and_add_up_to_e2e(project):
    project.makepyfile(test_gen=GENERATE)
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    ttft = record["metrics"]["ttft_s"]["median"]
    tpot = record["metrics"]["tpot_s"]["median"]
    e2e = record["metrics"]["e2e_latency_s"]["median"]
    assert samples(record, "ttft_s") == [PREFILL_S] * 10
    assert samples(record, "tpot_s") == [DECODE_S] * 10
    assert ttft + 99 * tpot == pytest.approx(e2e, rel=0.02)
    assert record["metrics"]["ms_per_token"]["median"] == pytest.approx(e2e / 100 * 1000)
    assert record["metrics"]["tokens_per_s"]["median"] == pytest.approx(100 / e2e)
    assert record["note"] == ""


def test_time_spent_outside_the_tokens_is_flagged_in_the_notes(project):
    project.makepyfile(
        test_gen="""
        def test_gen(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-overhead", new_tokens=100)
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["notes:", "  test_gen: ttft + (new_tokens-1)*tpot differs from e2e by *time is spent*"]
    )


# -- 5. out of memory --------------------------------------------------------------------------


def test_oom_is_recorded_and_the_next_test_still_runs(project):
    project.makepyfile(
        test_oom="""
        def test_too_big(llmperf):
            result = llmperf.generate(model="tiny-bloom", engine="fake-oom")
            assert result.outcome == "oom"

        def test_after(llmperf):
            assert llmperf.generate(model="tiny-bloom", engine="fake-engine").outcome == "ok"
        """
    )
    result = project.runpytest(FAKE, "--llmperf-report=out")
    result.assert_outcomes(passed=2)
    rows = read_results(project.path / "out")
    oom = record_of(rows, "test_too_big")
    assert oom["outcome"] == "oom"
    assert "out of memory while generating: fake: tried to allocate 2.00 GiB" in oom["note"]
    assert record_of(rows, "test_after")["outcome"] == "ok"
    result.stdout.re_match_lines([r"test_too_big\s+fake\s+oom\s"])


def test_workload_estimated_not_to_fit_is_recorded_oom_without_running(project, monkeypatch):
    spec = models.get("tiny-bloom")
    weights = spec.weight_bytes("bf16")
    need = models.estimate_generation_bytes(spec, "bf16", 64, models.SEED_PROMPT_TOKENS, 100)
    assert need > 2 * weights
    monkeypatch.setenv("FAKE_AVAILABLE_BYTES", str((weights + need) // 2))
    project.makepyfile(
        test_mem="""
        def test_batch_64(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", batch_size=64)

        def test_batch_1(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", batch_size=1)
        """
    )
    result = project.runpytest(FAKE, "--llmperf-report=out")
    result.assert_outcomes(passed=2)
    rows = read_results(project.path / "out")
    big = record_of(rows, "test_batch_64")
    assert big["outcome"] == "oom"
    assert big["note"].startswith("not run: estimated need ")
    assert "e2e_latency_s" not in big["metrics"]
    assert record_of(rows, "test_batch_1")["outcome"] == "ok"


def test_memory_estimate_uses_the_length_of_a_text_prompt(project, monkeypatch):
    words = 2000
    spec = models.get("tiny-bloom")
    short = models.estimate_generation_bytes(spec, "bf16", 1, models.SEED_PROMPT_TOKENS, 100)
    long = models.estimate_generation_bytes(spec, "bf16", 1, words, 100)
    assert long > 2 * short
    monkeypatch.setenv("FAKE_AVAILABLE_BYTES", str((short + long) // 2))
    project.makepyfile(
        test_mem=f"""
        def test_long_prompt(llmperf):
            llmperf.generate(
                model="tiny-bloom", engine="fake-engine", new_tokens=100, prompt="word " * {words}
            )
        """
    )
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_long_prompt")
    assert record["workload"].get("prompt_tokens", words) == words
    assert record["outcome"] == "oom"
    assert record["note"].startswith("not run: estimated need ")


def test_a_text_prompt_that_fits_is_measured_not_recorded_oom(project, monkeypatch):
    words = 1000  # the fake tokenizer makes one token per word; "word " is 5 bytes
    spec = models.get("tiny-bloom")
    real = models.estimate_generation_bytes(spec, "bf16", 1, words, 100)
    by_bytes = models.estimate_generation_bytes(spec, "bf16", 1, 5 * words, 100)
    monkeypatch.setenv("FAKE_AVAILABLE_BYTES", str((real + by_bytes) // 2))
    project.makepyfile(
        test_mem=f"""
        def test_prompt(llmperf):
            llmperf.generate(
                model="tiny-bloom", engine="fake-engine", new_tokens=100, prompt="word " * {words}
            )
        """
    )
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_prompt")
    assert record["outcome"] == "ok", record["note"]
    assert record["workload"]["prompt_tokens"] == words


def test_model_whose_weights_cannot_load_is_skipped_with_needed_and_available(project):
    need_gib = models.get("bloom-176b").weight_bytes("bf16") / 2**30
    project.makepyfile(
        test_big="""
        def test_bloom(llmperf):
            llmperf.generate(model="bloom-176b", engine="fake-engine")
        """
    )
    result = project.runpytest(FAKE, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED*bloom-176b cannot load on fake: its bf16 weights need "
            f"{need_gib:.2f} GiB, 64.00 GiB available"
        ]
    )


TWO_LARGE_MODELS = """
    def test_llama(llmperf):
        r = llmperf.generate(model="llama-2-7b", dtype="bf16", engine="fake-engine", new_tokens=2)
        assert r.outcome == "ok", r.note

    def test_bloomz(llmperf):
        r = llmperf.generate(model="bloomz-7b1", dtype="bf16", engine="fake-engine", new_tokens=2)
        assert r.outcome == "ok", r.note
"""


@pytest.mark.parametrize("order", ["llama first", "bloomz first"])
def test_two_large_models_in_a_row_fit_as_they_do_alone(project, monkeypatch, order):
    """A test's result must not depend on the test before it: the model a finished test
    loaded is freed (or counted as free) before the next model's memory check."""
    bloomz = models.get("bloomz-7b1").weight_bytes("bf16")
    llama = models.get("llama-2-7b").weight_bytes("bf16")
    # Room for either model alone, not for both at once.
    monkeypatch.setenv("FAKE_TOTAL_BYTES", str(max(bloomz, llama) + 2**30))
    project.makepyfile(test_big=TWO_LARGE_MODELS)
    first = "test_llama" if order == "llama first" else "test_bloomz"
    second = "test_bloomz" if first == "test_llama" else "test_llama"
    for alone in (first, second):
        project.runpytest(FAKE, "-k", alone).assert_outcomes(passed=1)
    result = project.runpytest(FAKE, "-rs", "-k", f"{first} or {second}", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_the_model_a_crashed_test_left_in_the_cache_counts_as_free(project, monkeypatch):
    """The next model's memory check counts the cached model it will replace as free."""
    project.makepyfile(
        test_big="""
        def test_llama(llmperf):
            llmperf.generate(model="llama-2-7b", dtype="bf16", engine="fake-crash", new_tokens=2)

        def test_bloomz(llmperf):
            llmperf.generate(model="bloomz-7b1", dtype="bf16", engine="fake-engine", new_tokens=2)
        """
    )
    monkeypatch.setenv(
        "FAKE_TOTAL_BYTES", str(models.get("bloomz-7b1").weight_bytes("bf16") + 2**30)
    )
    result = project.runpytest(FAKE, "-rs")
    result.assert_outcomes(failed=1, passed=1)


# -- 6. settings: validation and precedence ----------------------------------------------------


@pytest.mark.parametrize(
    "args, env, ini, source, allowed",
    [
        (["--llmperf-rounds=abc"], {}, "", "--llmperf-rounds=abc", "integer ≥ 5"),
        (["--llmperf-rounds=3"], {}, "", "--llmperf-rounds=3", "integer ≥ 5"),
        (["--llmperf-tolerance=1.5"], {}, "", "--llmperf-tolerance=1.5", "between 0 and 1"),
        (["--llmperf-tolerance=-0.1"], {}, "", "--llmperf-tolerance=-0.1", "between 0 and 1"),
        (["--llmperf-tolerance=ttft=0.1"], {}, "", "--llmperf-tolerance", "'ttft'; known: "),
        (["--llmperf-alpha=0.9"], {}, "", "--llmperf-alpha=0.9", "(0, 0.5]"),
        (["--llmperf-backend=tpu"], {}, "", "--llmperf-backend=tpu", "allowed: auto, cpu, cuda"),
        (["--llmperf-models=huge"], {}, "", "--llmperf-models=huge", "auto, tiny, full"),
        (["--llmperf-label=a/b"], {}, "", "--llmperf-label=a/b", "letters, digits"),
        ([], {"LLMPERF_ROUNDS": "x"}, "", "env LLMPERF_ROUNDS=x", "integer ≥ 5"),
        ([], {"LLMPERF_NO_GATE": "maybe"}, "", "env LLMPERF_NO_GATE=maybe", "true/false"),
        ([], {}, "llmperf_rounds = x", "ini llmperf_rounds=x in ", "integer ≥ 5"),
        ([], {}, "llmperf_alpha = 2", "ini llmperf_alpha=2 in ", "(0, 0.5]"),
    ],
)
def test_bad_setting_is_a_one_line_usage_error_naming_source_and_allowed_values(
    project, monkeypatch, args, env, ini, source, allowed
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        project.makeini(f"[pytest]\n{ini}\n")
    project.makepyfile(test_gen=GENERATE)
    result = project.runpytest(*args)
    assert result.ret == USAGE_ERROR
    line = one_line_error(result)
    assert source in line
    assert allowed in line
    no_traceback(result)


ROUNDS_PROJECT = """
    import pytest

    def test_plain(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)

    @pytest.mark.llmperf(rounds=6)
    def test_marker(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)

    @pytest.mark.llmperf(rounds=6)
    def test_call(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10, rounds=5)
"""


@pytest.mark.parametrize(
    "cli, env, ini, expected",
    [
        ("8", "9", "7", 8),
        (None, "9", "7", 9),
        (None, None, "7", 7),
        (None, None, None, 10),
    ],
    ids=["cli-beats-env-and-ini", "env-beats-ini", "ini-beats-default", "default"],
)
def test_rounds_come_from_call_then_marker_then_cli_env_ini(
    project, monkeypatch, cli, env, ini, expected
):
    if env:
        monkeypatch.setenv("LLMPERF_ROUNDS", env)
    if ini:
        project.makeini(f"[pytest]\nllmperf_rounds = {ini}\n")
    project.makepyfile(test_rounds=ROUNDS_PROJECT)
    args = [FAKE, "--llmperf-report=out"] + ([f"--llmperf-rounds={cli}"] if cli else [])
    project.runpytest(*args).assert_outcomes(passed=3)
    rows = read_results(project.path / "out")
    rounds = {
        key: len(samples(record_of(rows, key), "e2e_latency_s"))
        for key in ("test_plain", "test_marker", "test_call")
    }
    assert rounds == {"test_plain": expected, "test_marker": 6, "test_call": 5}


def test_marker_with_an_unknown_keyword_is_a_usage_error(project):
    project.makepyfile(
        test_gen="""
        import pytest

        @pytest.mark.llmperf(tolerence=0.1)
        def test_gen(llmperf):
            pass
        """
    )
    result = project.runpytest(FAKE)
    assert result.ret == USAGE_ERROR
    line = one_line_error(result)
    assert "test_gen" in line
    assert "unknown keyword 'tolerence' (did you mean 'tolerance'?); allowed: tolerance" in line
    no_traceback(result)


def test_marker_with_a_bad_value_is_a_usage_error_naming_the_marker(project):
    project.makepyfile(
        test_gen="""
        import pytest

        @pytest.mark.llmperf(rounds=2)
        def test_gen(llmperf):
            pass
        """
    )
    result = project.runpytest(FAKE)
    assert result.ret == USAGE_ERROR
    assert "marker llmperf(rounds=2): expected an integer ≥ 5" in one_line_error(result)
    no_traceback(result)


def test_unknown_model_is_a_one_line_failure_listing_the_known_ids(project):
    project.makepyfile(
        test_gen="""
        def test_gen(llmperf):
            llmperf.generate(model="nope", engine="fake-engine")
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    message = "llmperf.generate(model=...): unknown model 'nope': not a catalog id, "
    body = [line for line in result.stdout.lines if line.startswith(message)]
    assert len(body) == 1
    assert "tiny-bloom" in body[0]
    assert "During handling" not in result.stdout.str()
    no_traceback(result)


def test_unknown_model_and_dtype_fail_the_test_with_what_is_known(project):
    project.makepyfile(
        test_gen="""
        def test_model(llmperf):
            llmperf.generate(model="nope", engine="fake-engine")

        def test_dtype(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", dtype="fp8")

        def test_engine(llmperf):
            llmperf.generate(model="tiny-bloom", engine="vllm")
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "llmperf.generate(model=...): unknown model 'nope': *known: *bloom-176b*tiny-bloom*",
            "llmperf.generate(dtype='fp8'): unknown dtype; known: fp32, fp16, bf16, int8, int4",
            "llmperf.generate(engine=...): unknown engine 'vllm'; known: *transformers*",
        ]
    )
    no_traceback(result)


# -- 7. llmperf.measure ------------------------------------------------------------------------

MEASURE = """
    def test_fn(llmperf):
        llmperf.measure(lambda: llmperf.backend.advance(0.25))

    def test_named(llmperf):
        step = llmperf.backend.advance
        llmperf.measure(lambda: step(0.25), name="encode", tokens=50, batch_size=2)
        llmperf.measure(lambda: llmperf.backend.advance(0.5), name="decode")
"""


def test_measure_times_a_plain_function_for_the_configured_rounds(project):
    project.makepyfile(test_mine=MEASURE)
    project.runpytest(FAKE, "--llmperf-rounds=6", "--llmperf-report=out").assert_outcomes(passed=2)
    rows = read_results(project.path / "out")
    assert sorted(row["record"]["key"] for row in rows) == [
        "test_fn",
        "test_named:decode",
        "test_named:encode",
    ]
    assert samples(record_of(rows, "test_fn"), "time_s") == [0.25] * 6
    encode = record_of(rows, "test_named:encode")
    assert encode["metrics"]["ms_per_token"]["median"] == 0.25 / (2 * 50) * 1000
    assert encode["metrics"]["tokens_per_s"]["median"] == 2 * 50 / 0.25
    assert samples(record_of(rows, "test_named:decode"), "time_s") == [0.5] * 6


def test_the_result_of_a_call_reads_like_the_readme(project):
    """The result object: outcome, the headline median and samples, any metric by name."""
    project.makepyfile(
        test_r=f"""
        def test_gen(llmperf):
            r = llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
            assert r.ok and r.outcome == "ok"
            assert r.main_metric == "e2e_latency_s"
            assert r.median == r.e2e_latency_s == {steady_e2e(10)!r}
            assert r.samples == [{steady_e2e(10)!r}] * 10
            assert r.ttft_s == {PREFILL_S!r} and r.metrics["tpot_s"].unit == "s"
            assert r.key == "test_gen" and r.workload["new_tokens"] == 10

        def test_fn(llmperf):
            r = llmperf.measure(lambda: llmperf.backend.advance(0.25), tokens=10)
            assert (r.main_metric, r.median, r.ms_per_token) == ("time_s", 0.25, 25.0)
        """
    )
    project.runpytest(FAKE).assert_outcomes(passed=2)


def test_two_unnamed_workloads_in_one_test_fail_asking_for_names(project):
    project.makepyfile(
        test_two="""
        def test_two(llmperf):
            llmperf.measure(lambda: llmperf.backend.advance(0.25))
            llmperf.measure(lambda: llmperf.backend.advance(0.5))
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "a second workload in this test has the key 'test_two': give each one a name=",
            # ... and the first workload's record is not mistaken for an unusable baseline
            "  1 not judged: their test failed before its workloads were judged",
        ]
    )


def test_test_that_asks_for_llmperf_but_measures_nothing_fails(project):
    project.makepyfile(
        test_nothing="""
        def test_nothing(llmperf):
            assert llmperf is not None
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["this test asked for the llmperf fixture but measured nothing*"])


# -- 8. baseline keys --------------------------------------------------------------------------

KEYS_A = """
    import pytest

    @pytest.mark.parametrize("model", ["tiny-bloom"], ids=["bloom"])
    @pytest.mark.parametrize("batch_size", [1, 2], ids=["bs-one", "bs-two"])
    def test_lat(llmperf, model, batch_size):
        llmperf.generate(model=model, batch_size=batch_size, engine="fake-engine", new_tokens=10)
"""

# The same workloads after a refactor: decorators swapped, ids renamed.
KEYS_B = """
    import pytest

    @pytest.mark.parametrize("batch_size", [1, 2], ids=lambda b: f"batch{b}")
    @pytest.mark.parametrize("model", ["tiny-bloom"], ids=["the-model"])
    def test_lat(llmperf, batch_size, model):
        llmperf.generate(model=model, batch_size=batch_size, engine="fake-engine", new_tokens=10)
"""


def test_renaming_ids_or_reordering_parametrize_keeps_the_baselines(project):
    project.makepyfile(test_keys=KEYS_A)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=2)
    keys = sorted(baseline_file(project.path, "test_keys")["entries"])
    assert keys == [
        "test_lat[batch_size=1,model=tiny-bloom]",
        "test_lat[batch_size=2,model=tiny-bloom]",
    ]
    project.makepyfile(test_keys=KEYS_B)
    result = project.runpytest(FAKE, "--llmperf-strict", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_lat[[]fake-the-model-batch1[]] PASSED*"])
    result.stdout.re_match_lines([r"test_lat\[batch_size=1,model=tiny-bloom\]\s+fake\s+ok.*pass$"])


def test_key_leaves_out_the_backend_and_names_a_class(project):
    project.makepyfile(
        test_cls="""
        class TestSuite:
            def test_gen(self, llmperf):
                llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
        """
    )
    project.runpytest("--llmperf-backend=fake,cpu", "--llmperf-update-baselines", "-k", "fake")
    assert list(baseline_file(project.path, "test_cls")["entries"]) == ["TestSuite.test_gen"]


def test_different_tuple_parameters_get_different_baseline_entries(project):
    project.makepyfile(
        test_shapes="""
        import pytest

        @pytest.mark.parametrize("shape", [(1, 16), (2, 16)])
        def test_shape(llmperf, shape):
            batch_size, n = shape
            llmperf.generate(
                model="tiny-bloom", engine="fake-engine", batch_size=batch_size, new_tokens=n
            )
        """
    )
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=2)
    assert len(baseline_file(project.path, "test_shapes")["entries"]) == 2


# -- 9. the gate -------------------------------------------------------------------------------


@pytest.fixture
def recorded(project):
    """A project whose one generate test has a baseline recorded at normal speed."""
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.assert_outcomes(passed=1)
    return project, result


def test_update_baselines_writes_the_device_file_and_says_what_changed(recorded):
    project, result = recorded
    data = baseline_file(project.path, "test_gate")
    assert data["device"]["key"] == "fake-chip"
    (run,) = data["entries"]["test_gen"]["runs"]
    assert run["outcome"] == "ok"
    assert run["metrics"]["e2e_latency_s"]["median"] == pytest.approx(steady_e2e(100), rel=1e-5)
    result.stdout.fnmatch_lines(["*llmperf baselines*", "test_gen: added (1 run)"])


def test_second_update_appends_a_run(recorded):
    project, _ = recorded
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(["test_gen: appended (2 runs kept)"])
    assert len(baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"]) == 2


def test_a_failing_test_does_not_update_its_baseline(project):
    project.makepyfile(
        test_gate="""
        def test_gen(llmperf):
            result = llmperf.generate(model="tiny-bloom", engine="fake-engine")
            assert result.tpot_s > 1, "the test's own check"
        """
    )
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["no baseline changed"])
    assert not (project.path / "baselines").exists()


def test_reset_baselines_starts_the_history_afresh(recorded):
    project, _ = recorded
    project.runpytest(FAKE, "--llmperf-update-baselines")
    result = project.runpytest(FAKE, "--llmperf-reset-baselines")
    result.stdout.fnmatch_lines(["test_gen: reset (history reset: 2 old run(s) dropped)"])
    assert len(baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"]) == 1


def test_baseline_runs_caps_the_history_kept(recorded):
    project, _ = recorded
    for _ in range(2):
        result = project.runpytest(FAKE, "--llmperf-update-baselines", "--llmperf-baseline-runs=2")
    result.stdout.fnmatch_lines(["test_gen: appended (2 runs kept, 1 oldest dropped)"])
    assert len(baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"]) == 2


def test_sdk_upgrade_restarts_the_history_and_says_why(recorded, monkeypatch):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SDK_VERSION", "2.0")
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(["test_gen: restarted (history restarted: fake-sdk 1.0 → 2.0)"])


OOM_BY_MEMORY = """
    def test_gen(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", batch_size=64)
"""


def _squeeze_memory(monkeypatch) -> None:
    spec = models.get("tiny-bloom")
    weights = spec.weight_bytes("bf16")
    need = models.estimate_generation_bytes(spec, "bf16", 64, models.SEED_PROMPT_TOKENS, 100)
    monkeypatch.setenv("FAKE_AVAILABLE_BYTES", str((weights + need) // 2))


def test_new_oom_where_the_baseline_ran_fails_the_gate(project, monkeypatch):
    project.makepyfile(test_gate=OOM_BY_MEMORY)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    _squeeze_memory(monkeypatch)
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  new-oom: out of memory now; the baseline was ok*"])


def test_oom_in_the_baseline_too_passes_and_fixing_it_is_noted(project, monkeypatch):
    project.makepyfile(test_gate=OOM_BY_MEMORY)
    with monkeypatch.context() as m:
        _squeeze_memory(m)
        project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
        assert (
            baseline_file(project.path, "test_gate")["entries"]["test_gen"]["runs"][0]["outcome"]
            == "oom"
        )
        project.runpytest(FAKE, "--llmperf-strict").assert_outcomes(passed=1)
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["  test_gen: fixed-oom: runs now; the baseline was out of memory*"]
    )


def test_changed_output_is_reported_and_fails_only_with_check_outputs(recorded, monkeypatch):
    project, _ = recorded
    monkeypatch.setenv("FAKE_OUTPUT_SHIFT", "1")
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "  test_gen: output-changed: output changed: first diverging token at position 0 "
            "(baseline 5, now 6) (not gated: --llmperf-check-outputs is off)"
        ]
    )
    result = project.runpytest(FAKE, "--llmperf-check-outputs")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  output-changed: output changed: first diverging token at*"])


def test_absolute_limit_in_the_marker_fails_without_any_baseline(project):
    ms_per_token = steady_e2e(100) * 10
    project.makepyfile(
        test_gate=f"""
        import pytest

        @pytest.mark.llmperf(max_ms_per_token={ms_per_token / 2})
        def test_gen(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)

        @pytest.mark.llmperf(max_ms_per_token={ms_per_token * 2})
        def test_ok(llmperf):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)
        """
    )
    result = project.runpytest(FAKE, "-v")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*test_ok[[]fake[]] PASSED*"])
    result.stdout.fnmatch_lines([f"*max_ms_per_token={ms_per_token / 2:g}*"])


def test_updating_baselines_in_ci_says_the_results_are_not_gated(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.stdout.fnmatch_lines(["llmperf: updating baselines in CI: results are not gated"])


def test_unchanged_code_passes_the_gate(recorded):
    project, _ = recorded
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"test_gen\s+fake\s+ok\s.*\spass$"])


def test_slowdown_fails_with_metric_baseline_now_ratio_tolerance_and_what_changed(
    recorded, monkeypatch
):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    monkeypatch.setenv("FAKE_SDK_VERSION", "1.1")
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    before = format_value(steady_e2e(100), "s")
    after = format_value(steady_e2e(100, 1.2), "s")
    result.stdout.fnmatch_lines(
        [
            "test_gen on fake-chip:",
            f"  regressed: e2e_latency_s {before} → {after} (×1.200, +20.0%), allowed +3.0%*",
            "  changed since the baseline: fake-sdk 1.0 → 1.1",
            "*--llmperf-update-baselines*",
        ]
    )


def test_a_burst_of_noise_is_re_measured_and_does_not_fail(recorded, monkeypatch):
    project, _ = recorded
    # compile + 2 warm-up + 10 rounds: the whole first measurement is 1.8x slow, not later ones
    monkeypatch.setenv("FAKE_BURST", "1.8:13")
    result = project.runpytest(FAKE, "--llmperf-report=out")
    result.assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    assert record["metrics"]["e2e_latency_s"]["median"] == steady_e2e(100)
    assert "not confirmed: re-measured 1x" in record["note"]
    # without confirmation the same burst is a red test
    result = project.runpytest(FAKE, "--llmperf-confirm=0")
    result.assert_outcomes(failed=1)


def test_a_real_slowdown_is_confirmed_by_every_re_measurement(recorded, monkeypatch):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    result = project.runpytest(FAKE, "--llmperf-confirm=3", "--llmperf-report=out")
    result.assert_outcomes(failed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    assert "regression confirmed by 4 measurements" in record["note"]


@pytest.mark.parametrize("how", ["cli", "env"])
def test_no_gate_measures_and_reports_a_slowdown_without_failing(recorded, monkeypatch, how):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    if how == "env":
        monkeypatch.setenv("LLMPERF_NO_GATE", "1")
    result = project.runpytest(FAKE, *(["--llmperf-no-gate"] if how == "cli" else []))
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"test_gen\s+fake\s+ok\s.*regressed$"])


def test_improvement_beyond_tolerance_passes_with_a_stale_baseline_hint(recorded, monkeypatch):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SLOWDOWN", "0.8")
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["verdicts:", "  test_gen: improved: e2e_latency_s *(baseline is stale, consider updating)"]
    )


@pytest.mark.parametrize(
    "how",
    ["marker", "call", "cli", "cli-per-metric", "ini"],
)
def test_a_wider_tolerance_lets_the_slowdown_pass(project, monkeypatch, how):
    test = {
        "marker": """
            import pytest

            @pytest.mark.llmperf(tolerance=0.5)
            def test_gen(llmperf):
                llmperf.generate(model="tiny-bloom", engine="fake-engine")
        """,
        "call": """
            def test_gen(llmperf):
                llmperf.generate(model="tiny-bloom", engine="fake-engine", tolerance=0.5)
        """,
    }.get(how, GENERATE)
    args = {
        "cli": ["--llmperf-tolerance=0.5"],
        "cli-per-metric": ["--llmperf-tolerance=e2e_latency_s=0.5"],
    }.get(how, [])
    if how == "ini":
        project.makeini("[pytest]\nllmperf_tolerance = 0.5\n")
    project.makepyfile(test_gate=test)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    project.runpytest(FAKE, *args).assert_outcomes(passed=1)
    # ...and the tolerance is what made the difference.
    if how in ("cli", "cli-per-metric"):
        project.runpytest(FAKE).assert_outcomes(failed=1)


def test_strict_fails_a_test_without_baseline(project):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-strict")
    result.assert_outcomes(failed=1)
    path = project.path / "baselines" / "fake-chip" / "test_gate.json"
    result.stdout.fnmatch_lines(
        [f"test_gen: no baseline in {path} and --llmperf-strict is set; record one with*"]
    )


def test_without_strict_a_missing_baseline_passes_with_a_hint(project):
    project.makepyfile(test_gate=GENERATE)
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*= llmperf: 0 of 1 workloads judged against a baseline =*",
            "  1 not judged: the baselines directory */baselines does not exist",
            "  to record baselines on this node: llmperf baselines record --runs 3 *",
        ]
    )


def test_label_keeps_a_separate_baseline_set(project, monkeypatch):
    project.makepyfile(test_gate=GENERATE)
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    project.runpytest(FAKE, "--llmperf-label=sdk2", "--llmperf-update-baselines")
    assert (project.path / "baselines" / "fake-chip@sdk2" / "test_gate.json").is_file()
    assert not (project.path / "baselines" / "fake-chip").exists()
    project.runpytest(FAKE, "--llmperf-label=sdk2", "--llmperf-strict").assert_outcomes(passed=1)
    project.runpytest(FAKE, "--llmperf-strict").assert_outcomes(failed=1)


def test_baselines_dir_option_moves_the_baselines(project):
    project.makepyfile(test_gate=GENERATE)
    project.runpytest(FAKE, "--llmperf-baselines=perf/base", "--llmperf-update-baselines")
    assert (project.path / "perf" / "base" / "fake-chip" / "test_gate.json").is_file()
    assert not (project.path / "baselines").exists()


CORRUPT = '{"schema": 1, "suite": "test_gate", "entries": {\n'


def test_corrupt_baseline_fails_with_one_line_naming_the_file(project):
    project.makepyfile(test_gate=GENERATE)
    path = project.path / "baselines" / "fake-chip" / "test_gate.json"
    path.parent.mkdir(parents=True)
    path.write_text(CORRUPT)
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"test_gen: {path}: not valid JSON*restore the file from git"])
    no_traceback(result)


def test_update_never_overwrites_a_corrupt_baseline(project):
    project.makepyfile(test_gate=GENERATE)
    path = project.path / "baselines" / "fake-chip" / "test_gate.json"
    path.parent.mkdir(parents=True)
    path.write_text(CORRUPT)
    result = project.runpytest(FAKE, "--llmperf-update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"test_gen: {path}: not valid JSON*", "no baseline changed"])
    assert path.read_text() == CORRUPT
    no_traceback(result)


# -- 10./11. reports and the terminal table ----------------------------------------------------

REPORTED = """
    def test_gen(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)

    def test_fn(llmperf):
        llmperf.measure(lambda: llmperf.backend.advance(0.25), name="step")
"""


def test_report_writes_results_json_with_one_record_per_workload(project):
    project.makepyfile(test_rep=REPORTED)
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=2)
    rows = read_results(project.path / "out")
    assert [row["record"]["key"] for row in rows] == ["test_gen", "test_fn:step"]
    for row in rows:
        record = row["record"]
        assert row["test_outcome"] == "passed"
        assert record["backend"] == "fake"
        assert record["device_key"] == "fake-chip"
        assert record["outcome"] == "ok"
        versions = record["provenance"]["versions"]
        assert versions["pytest-llmperf"] == pytest_llmperf.__version__
        assert versions["fake-sdk"] == "1.0"
        assert "torch" in versions
    gen = record_of(rows, "test_gen")
    assert len(samples(gen, "e2e_latency_s")) == 10
    assert gen["workload"]["model"] == "tiny-bloom"
    assert gen["workload"]["new_tokens"] == 100
    assert gen["workload"]["prompt_tokens"] == models.SEED_PROMPT_TOKENS
    assert gen["output_digest"].startswith("sha256:")


def test_report_writes_a_markdown_summary_and_appends_it_to_the_github_step_summary(
    project, monkeypatch
):
    step = project.path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    project.makepyfile(test_gate=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines")
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    step.write_text("earlier step\n")
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(failed=1)
    summary = (project.path / "out" / "summary.md").read_text()
    assert "## fake: fake-chip" in summary
    before = format_value(steady_e2e(100), "s")
    after = format_value(steady_e2e(100, 1.2), "s")
    assert f"| `test_gen` | e2e_latency_s | {before} | {after} | ×1.200 | **FAIL** regressed |" in (
        summary
    )
    # The step summary is the same report without the plots: their links are relative to
    # the report directory, which GitHub's page does not have.
    without_plots, plots = summary.split("## Plots\n")
    assert "](plots/history-e2e_latency_s-test_gen-fake-chip.png)" in plots
    assert step.read_text() == "earlier step\n" + without_plots
    assert "**llmperf: 1 of 1 workloads judged against a baseline**" in summary


def test_the_markdown_summary_agrees_with_the_test_outcome_on_a_busy_device(project, monkeypatch):
    """What reaches $GITHUB_STEP_SUMMARY must not say FAIL for a test that passed."""
    project.makepyfile(test_gate=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines")
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    monkeypatch.setenv("FAKE_LOAD", "50")
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    summary = (project.path / "out" / "summary.md").read_text()
    assert "**FAIL**" not in summary
    assert "| inconclusive (regressed on a contended device, not failed) |" in summary
    assert "- `test_gen`: machine busy: load average 50.0" in summary


def test_results_are_on_disk_after_each_test_even_if_the_run_is_killed(project):
    project.makepyfile(
        test_killed="""
        import os, signal

        def test_first(llmperf):
            llmperf.measure(lambda: llmperf.backend.advance(0.25))

        def test_killer():
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = project.runpytest_subprocess(FAKE, "--llmperf-report=out", "-p", "no:cacheprovider")
    assert result.ret == -9
    assert [row["record"]["key"] for row in read_results(project.path / "out")] == ["test_first"]


def test_junitxml_carries_the_llmperf_properties(project):
    project.makepyfile(test_gen=GENERATE)
    project.runpytest(FAKE, "--junitxml=junit.xml").assert_outcomes(passed=1)
    case = ET.parse(project.path / "junit.xml").find(".//testcase[@name='test_gen[fake]']")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["llmperf:test_gen:outcome"] == "ok"
    assert props["llmperf:test_gen:verdict"] == "no-baseline"
    assert float(props["llmperf:test_gen:e2e_latency_s"]) == pytest.approx(steady_e2e(100), 1e-5)
    assert float(props["llmperf:test_gen:ttft_s"]) == PREFILL_S


def _our_entry(path: Path) -> dict:
    data = json.loads(path.read_text())
    ours = [b for b in data["benchmarks"] if b["group"] == "llmperf:test_gen"]
    assert len(ours) == 1, data["benchmarks"]
    return ours[0]


def test_benchmark_json_holds_our_rounds_in_pytest_benchmark_format(project):
    project.makepyfile(test_gen=GENERATE)
    project.runpytest(FAKE, "--benchmark-json=b.json").assert_outcomes(passed=1)
    entry = _our_entry(project.path / "b.json")
    assert entry["name"] == "test_gen[fake]"
    assert entry["stats"]["median"] == steady_e2e(100)
    assert entry["stats"]["data"] == [steady_e2e(100)] * 10
    assert entry["stats"]["rounds"] == 10


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_benchmark_json_lands_at_the_path_given_and_pytest_benchmark_compare_reads_it(
    project, tmp_path_factory, where
):
    project.makepyfile(test_gen=GENERATE)
    if where == "absolute":
        target = tmp_path_factory.mktemp("elsewhere") / "out" / "b.json"
        arg = str(target)
    else:
        target = project.path / "sub" / "dir" / "b.json"
        arg = "sub/dir/b.json"
    project.runpytest(FAKE, f"--benchmark-json={arg}").assert_outcomes(passed=1)
    assert target.is_file() and not (project.path / "b.json").exists()
    assert _our_entry(target)["stats"]["median"] == steady_e2e(100)
    compare = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pytest_benchmark.cli import main; main()",
            "compare",
            str(target),
        ],
        capture_output=True,
        text=True,
        cwd=project.path,
    )
    assert compare.returncode == 0, compare.stderr
    assert "test_gen[fake]" in compare.stdout


def test_benchmark_json_keeps_our_entries_next_to_pytest_benchmark_ones(project, monkeypatch):
    project.makepyfile(
        test_gen=GENERATE
        + """
    def test_theirs(benchmark):
        benchmark(lambda: None)
    """
    )
    # Under an outer `pytest -n`, pytest-benchmark reads PYTEST_XDIST_WORKER and would disable
    # its own benchmark in the inner session.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    args = ["--benchmark-json=b.json", "--benchmark-max-time=0.001"]
    project.runpytest(FAKE, *args).assert_outcomes(passed=2)
    data = json.loads((project.path / "b.json").read_text())
    assert {b["name"] for b in data["benchmarks"]} == {"test_gen[fake]", "test_theirs"}
    assert _our_entry(project.path / "b.json")["stats"]["median"] == steady_e2e(100)


def test_benchmark_json_of_llmperf_tests_alone_does_not_claim_nothing_was_saved(project):
    project.makepyfile(
        test_fn="""
        def test_fn(llmperf):
            llmperf.measure(lambda: llmperf.backend.advance(0.25))
        """
    )
    result = project.runpytest_subprocess(FAKE, "--benchmark-json=b.json", "-p", "no:cacheprovider")
    assert result.ret == 0
    assert json.loads((project.path / "b.json").read_text())["benchmarks"]
    assert "Not saving anything" not in result.stdout.str() + result.stderr.str()


def test_terminal_table_shows_each_workload_with_its_main_numbers(project):
    project.makepyfile(test_rep=REPORTED)
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=2)
    e2e = steady_e2e(100)
    result.stdout.re_match_lines(
        [
            r"=+ llmperf results =+",
            r"test\s+backend\s+outcome\s+median\s+tpot\s+tokens/s\s+roofline\s+peak mem\s+"
            r"verdict$",
            # The fake chip has no published bandwidth: no roofline.
            rf"test_gen\s+fake\s+ok\s+{e2e * 1000:.2f} ms\s+{DECODE_S * 1000:.2f} ms\s+"
            rf"{100 / e2e:.1f}\s+-\s+{format_value(PEAK_BYTES, 'B')}\s+no-baseline$",
            r"test_fn:step\s+fake\s+ok\s+250.00 ms\s+-\s+-\s+-\s+.*no-baseline$",
        ]
    )


# -- 12. collection stays light ----------------------------------------------------------------

IMPORT_PROBE = """
    import json, os, sys

    def pytest_collection_finish(session):
        heavy = ("transformers", "torch", "deepspeed", "optimum")
        with open(os.environ["PROBE_OUT_FILE"], "w") as f:
            json.dump({name: name in sys.modules for name in heavy}
                      | {"collected": len(session.items)}, f)
"""


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_collecting_the_shipped_suites_imports_no_ml_library(pytester, monkeypatch, backend):
    suites = Path(pytest_llmperf.__file__).resolve().parents[1] / "suites"
    out = pytester.path / "imports.json"
    monkeypatch.setenv("PROBE_OUT_FILE", str(out))
    pytester.makepyfile(llmperf_import_probe=IMPORT_PROBE)
    result = pytester.runpytest_subprocess(
        "--collect-only",
        "-q",
        "-p",
        "llmperf_import_probe",
        "-p",
        "no:cacheprovider",
        f"--llmperf-backend={backend}",
        str(suites),
    )
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    seen = json.loads(out.read_text())
    assert seen["collected"] > 0
    assert not seen["transformers"]
    assert not seen["deepspeed"]
    assert not seen["optimum"]
    if backend == "cpu":  # no accelerator probe ran: nothing needed torch
        assert not seen["torch"]


# -- 13. pytest-xdist ----------------------------------------------------------------------------


def test_xdist_workers_send_their_records_to_the_controller(project):
    pytest.importorskip("xdist")
    project.makepyfile(
        test_par="""
        import pytest

        @pytest.mark.parametrize("new_tokens", [10, 20, 30, 40])
        def test_gen(llmperf, new_tokens):
            llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=new_tokens)
        """
    )
    result = project.runpytest(
        FAKE, "-n", "2", "--llmperf-update-baselines", "--llmperf-report=out"
    )
    result.assert_outcomes(passed=4)
    keys = [f"test_gen[new_tokens={n}]" for n in (10, 20, 30, 40)]
    assert sorted(baseline_file(project.path, "test_par")["entries"]) == keys
    assert sorted(row["record"]["key"] for row in read_results(project.path / "out")) == keys
    result.stdout.fnmatch_lines(["*llmperf results*"])
    for n in (10, 20, 30, 40):
        result.stdout.re_match_lines([rf"test_gen\[new_tokens={n}\]\s+fake\s+ok\s"])
    result.stdout.fnmatch_lines_random([f"{key}: added (1 run)" for key in keys])


MIXED = """
    import pytest

    @pytest.mark.llmperf(max_ms_per_token={limit})
    def test_mixed(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100, name="gen")
        llmperf.measure(lambda: None, name="plain")
"""


def test_a_limit_applies_to_the_workloads_that_measure_its_metric(project):
    # ms_per_token of the fake is ~8.4 ms: a 1000 ms limit passes, and the plain callable
    # (no tokens, so no ms_per_token) is not held to it.
    project.makepyfile(test_mixed=MIXED.format(limit=1000))
    project.runpytest(FAKE).assert_outcomes(passed=1)
    project.makepyfile(test_mixed=MIXED.format(limit=1))
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*above the absolute limit max_ms_per_token=1*"])


def test_a_limit_no_workload_measures_fails_with_a_clear_message(project):
    project.makepyfile(
        test_plain="""
        import pytest

        @pytest.mark.llmperf(max_ms_per_token=5)
        def test_plain(llmperf):
            llmperf.measure(lambda: None)
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*marker llmperf(max_ms_per_token=...): no workload of this test measures ms_per_token*"]
    )
    no_traceback(result)


def test_a_regression_measured_on_a_busy_machine_is_inconclusive_not_red(recorded, monkeypatch):
    project, _ = recorded
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    monkeypatch.setenv("FAKE_LOAD", "50")
    result = project.runpytest(FAKE)
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"test_gen\s+fake\s+ok\s.*inconclusive$"])
    result.stdout.fnmatch_lines(["*machine busy: load average 50.0*inconclusive*"])
    # --llmperf-strict trusts no excuse
    project.runpytest(FAKE, "--llmperf-strict").assert_outcomes(failed=1)


def test_a_broken_limit_says_so_and_points_at_the_marker_not_at_updating(project):
    project.makepyfile(test_mixed=MIXED.format(limit=1))
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "  over the limit: ms_per_token * above the absolute limit max_ms_per_token=1*",
            "*raise it there if the new numbers are acceptable",
        ]
    )
    assert "--llmperf-update-baselines" not in result.stdout.str()


# -- sharing the device under pytest-xdist -----------------------------------------------------


def test_under_xdist_the_shared_device_is_said_and_a_regression_is_inconclusive(
    project, monkeypatch
):
    project.makepyfile(
        test_gate=GENERATE
        + """
    def test_other(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=10)
    """
    )
    args = (FAKE, "-p", "no:cacheprovider", "-n", "2", "--llmperf-report=rep")
    project.runpytest_subprocess(*args, "--llmperf-update-baselines").assert_outcomes(passed=2)
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.3")
    result = project.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["llmperf: 2 pytest-xdist workers share each device*"])
    record = record_of(read_results(project.path / "rep"), "test_gen")
    assert record["shared_workers"] == 2 and record["inconclusive"]
    assert "2 pytest-xdist workers shared this fake device" in record["note"]
    strict = project.runpytest_subprocess(*args, "--llmperf-strict")
    strict.assert_outcomes(failed=2)


def test_importing_the_plugin_imports_nothing_heavy():
    """pytest loads the plugin for every run in the environment: it must cost next to nothing."""
    code = (
        "import sys, pytest_llmperf.plugin; "
        "print(sorted(m for m in ('scipy', 'numpy', 'torch', 'transformers', 'filelock') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unrelated_test_run_hears_nothing_from_the_plugin(pytester):
    pytester.makepyfile(test_x="def test_x():\n    assert 1\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    said = [line for line in result.stdout.lines if "llmperf" in line and "plugins:" not in line]
    assert said == []
