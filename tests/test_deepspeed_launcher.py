"""The deepspeed launcher: the torchrun launcher's rank group, started by DeepSpeed's runner.

Most tests put a script where Python would be (``LaunchSettings.python``): it records the
command line and environment the runner would get, then replies, crashes or hangs as told.
The real-run tests start DeepSpeed 0.19.8's runner for real on this CPU: a 1-rank
deepspeed-inference workload (the engine refuses 2 ranks on CPU, see CPU_TP_CRASH) and a
2-rank group whose rank 1 dies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from fakes import FakeBackend

from pytest_llmperf import engines, worker
from pytest_llmperf.engines import deepspeed_inference
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.launchers import LaunchSettings, _choose_name
from pytest_llmperf.launchers.deepspeed import ARGS_ENV, DeepSpeedLauncher, passthrough
from pytest_llmperf.progress import Progress
from pytest_llmperf.spec import RecordContext, WorkloadSpec

TESTS = Path(__file__).parent
CONTEXT = RecordContext(key="test_ds", suite="test_s", device_key="fake-chip")
SPEC = WorkloadSpec(
    kind="generate",
    model="tiny-llama",
    engine="fake-engine",
    new_tokens=5,
    rounds=5,
    warmup=1,
    devices=2,
    weights="/nonexistent/weights",  # the fake runner never reads them; no checkpoint written
)
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not DEEPSPEED, reason="deepspeed is not installed")

#: Stands in for Python: records argv and env, then does what FAKE_RUNNER says.
FAKE_RUNNER = """\
#!{python}
import json, os, subprocess, sys, time
with open(os.environ["FAKE_RUNNER_SEEN"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
mode = os.environ.get("FAKE_RUNNER", "skip")
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out="))
if mode == "skip":
    json.dump({{"skip": "fake runner: nothing measured"}}, open(out, "w"))
elif mode == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: fake rank 1 lost its device", file=sys.stderr)
    print("[2026-01-01 00:00:00,000] [ERROR] [launch.py:325:sigkill_handler] ['python', '-u',"
          " '-m', 'pytest_llmperf.worker'] exits with return code = -11", file=sys.stderr)
    sys.exit(245)
elif mode == "hang":
    # A launch process and a rank in a session of its own, all hanging (a stuck collective).
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                     start_new_session=True)
    time.sleep(600)
"""


class CudaChip(FakeBackend):
    name = "fake-cuda"
    torch_device = "cuda"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"


class GaudiChip(FakeBackend):
    name = "fake-hpu"
    torch_device = "hpu"
    visible_devices_env = "HABANA_VISIBLE_MODULES"


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """run(mode, backend=..., spec=...) -> (record or exception, what the runner saw)."""
    script = tmp_path / "python"
    script.write_text(FAKE_RUNNER.format(python=sys.executable))
    script.chmod(0o755)
    seen = tmp_path / "seen.json"
    monkeypatch.setenv("FAKE_RUNNER_SEEN", str(seen))
    for name in (ARGS_ENV, "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "PT_HPU_LAZY_ACC_PAR_MODE"):
        monkeypatch.delenv(name, raising=False)

    def run(mode: str = "skip", backend: Any = None, spec: WorkloadSpec = SPEC, timeout=60):
        monkeypatch.setenv("FAKE_RUNNER", mode)
        settings = LaunchSettings(python=str(script), timeout=timeout, cache_dir=tmp_path)
        try:
            result: Any = DeepSpeedLauncher(settings).run(spec, CONTEXT, backend or FakeBackend())
        except (SkipWorkload, UsageError) as exc:
            result = exc
        return result, json.loads(seen.read_text()) if seen.is_file() else None

    return run


def option(argv: list[str], name: str) -> str | None:
    found = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return found[0] if found else None


# -- the command line and the ranks' environment --------------------------------------------------


def test_the_runner_starts_one_rank_per_device_running_the_rank_entry(runner):
    result, seen = runner("skip")
    assert isinstance(result, SkipWorkload) and "fake runner" in str(result)
    argv, env = seen["argv"], seen["env"]
    assert argv[:3] == ["-u", "-m", "deepspeed.launcher.runner"]
    # gaudi_spawn.py --use_deepspeed's single-node form, with the rank entry as a module.
    assert option(argv, "--num_nodes") == "1" and option(argv, "--num_gpus") == "2"
    assert option(argv, "--master_addr") == "127.0.0.1"
    assert option(argv, "--master_port").isdigit()
    assert "--no_local_rank" in argv and "--module" in argv
    entry = argv.index("pytest_llmperf.worker")
    assert argv[entry + 1] == "--rank" and option(argv, "--request").endswith("request.json")
    assert all(a.startswith("--") for a in argv[3:entry])  # runner options before the script
    # DeepSpeed's accelerator follows the backend, the cores are shared out among the ranks.
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


def test_a_gpu_subset_the_user_made_visible_is_kept_not_renumbered(runner, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    _, seen = runner("skip", backend=CudaChip())
    # With --num_gpus DeepSpeed would drop the variable and take GPUs 0 and 1.
    assert option(seen["argv"], "--num_gpus") is None
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert seen["env"]["DS_ACCELERATOR"] == "cuda"


def test_gaudi_ranks_get_lazy_collectives_unless_the_user_chose(runner, monkeypatch):
    monkeypatch.setenv("PT_HPU_ENABLE_LAZY_COLLECTIVES", "false")
    _, seen = runner("skip", backend=GaudiChip())
    env = seen["env"]
    assert env["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "false"  # the user's, kept
    assert env["PT_HPU_LAZY_ACC_PAR_MODE"] == "0"
    assert env["DS_ACCELERATOR"] == "hpu"
    assert option(seen["argv"], "--num_gpus") == "2"


def test_multi_node_options_pass_through_and_replace_the_single_node_ones(runner, monkeypatch):
    monkeypatch.setenv(ARGS_ENV, "-H /etc/hostfile --master_addr=node-0 --no_ssh_check")
    _, seen = runner("skip")
    argv = seen["argv"]
    assert option(argv, "--hostfile") == "/etc/hostfile"
    assert option(argv, "--master_addr") == "node-0" and "--no_ssh_check" in argv
    assert option(argv, "--num_gpus") is None and option(argv, "--num_nodes") is None


def test_the_pass_through_variable_is_not_refused_as_a_misspelt_setting():
    """pytest refuses unknown LLMPERF_* variables at start-up; the documented one must pass."""
    from pytest_llmperf.settings import check_environment

    check_environment({ARGS_ENV: "--hostfile=/etc/hostfile --master_addr=node-0"})


@pytest.mark.parametrize(
    "text, why",
    [
        ("--num_gpus=4", "'--num_gpus=4' is not passed through to DeepSpeed's launcher"),
        ("--autotuning run", "'--autotuning' is not passed through"),
        ("--hostfile", "--hostfile needs a value"),
        ("--num_nodes=two", "--num_nodes='two' is not a node count"),
        ("--include=a:0 --num_nodes=1", "DeepSpeed refuses --num_nodes beside --include"),
        ("--include='a:0", "No closing quotation"),
    ],
)
def test_a_bad_passthrough_is_a_one_line_error_naming_the_variable(text, why):
    with pytest.raises(UsageError) as info:
        passthrough(text)
    message = str(info.value)
    assert message.startswith(f"{ARGS_ENV}=") and why in message and "\n" not in message


# -- failures ----------------------------------------------------------------------------------


def test_a_rank_crash_is_an_error_with_the_ranks_exit_code_and_the_tail(runner):
    record, _ = runner("crash")
    assert record.outcome == "error"
    # The runner's 245 is -11 wrapped; DeepSpeed's launch logged the rank's own code.
    assert record.note.startswith(
        "deepspeed exited with code 245 (a rank died with SIGSEGV (signal 11)); output tail:"
    )
    assert "RuntimeError: fake rank 1 lost its device" in record.note


def test_a_hung_group_is_killed_whole_at_the_timeout(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TEST_TAG", str(tmp_path))
    record, seen = runner("hang", timeout=3)
    assert record.outcome == "error"
    assert record.note.startswith("timed out after 3 s (--llmperf-timeout); the rank group")
    assert seen is not None  # it did start
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FAKE_TEST_TAG") == str(tmp_path):
                left.append(proc.pid)
        except psutil.Error:
            continue
    assert left == []


def test_deepspeed_missing_is_a_skip_naming_torchrun(runner, monkeypatch):
    monkeypatch.setattr(deepspeed_inference, "install_reason", lambda who: f"{who}: no deepspeed")
    from pytest_llmperf.launchers import deepspeed as launcher_module

    monkeypatch.setattr(launcher_module, "install_reason", lambda who: f"{who}: no deepspeed")
    result, seen = runner("skip")
    assert isinstance(result, SkipWorkload)
    assert str(result) == (
        "the deepspeed launcher: no deepspeed; launcher='torchrun' runs the ranks without it"
    )
    assert seen is None  # nothing was started


def test_a_rank_group_of_another_size_than_the_workload_is_an_error(tmp_path, monkeypatch):
    """A hostfile naming 4 slots for a devices=2 workload must not measure 4 ranks under it."""
    message, out = tmp_path / "request.json", tmp_path / "reply.json"
    message.write_text(json.dumps({"spec": SPEC.to_json(), "context": {}, "backend": "fake"}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert worker._rank(message, out) == 0
    assert json.loads(out.read_text()) == {
        "error": "the launcher started 4 ranks, the workload asks for devices=2"
    }


# -- which launcher auto picks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine, devices, requested, installed, expected",
    [
        ("deepspeed-inference", 2, "auto", True, "deepspeed"),
        ("deepspeed-zero", 4, "process", True, "deepspeed"),
        ("deepspeed-inference", 2, "auto", False, "torchrun"),  # DeepSpeed joins torchrun ranks
        ("deepspeed-inference", 2, "torchrun", True, "torchrun"),  # asked for: kept
        ("transformers", 2, "auto", True, "torchrun"),
        ("transformers", 1, "deepspeed", True, "deepspeed"),  # a group of one rank
        ("deepspeed-inference", 1, "auto", True, "process"),  # one device: may_crash
    ],
)
def test_auto_runs_deepspeed_engines_under_deepspeeds_launcher_where_installed(
    monkeypatch, engine, devices, requested, installed, expected
):
    monkeypatch.setattr(
        deepspeed_inference, "install_reason", lambda who: None if installed else "absent"
    )
    spec = WorkloadSpec(kind="generate", model="tiny-llama", engine=engine, devices=devices)
    assert _choose_name(spec, requested) == expected


def test_inline_for_several_devices_names_both_rank_launchers():
    spec = WorkloadSpec(kind="generate", model="tiny-llama", devices=2)
    with pytest.raises(UsageError, match="needs launcher='torchrun' or 'deepspeed'"):
        _choose_name(spec, "inline")


# -- DeepSpeed's runner for real ---------------------------------------------------------------


@pytest.fixture
def ranks_know_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks import tests/fakes.py and register its chip and engines."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "fakes:register_all")
    monkeypatch.setenv("FAKE_DEVICES", "2")
    monkeypatch.delenv(ARGS_ENV, raising=False)


@needs_deepspeed
def test_a_real_rank_that_dies_under_deepspeed_is_an_error_with_its_code(
    ranks_know_the_fakes, tmp_path
):
    from fakes import RankCrashEngine

    engines.register(RankCrashEngine())
    spec = WorkloadSpec(
        kind="generate", model="tiny-llama", engine="fake-rank-crash", new_tokens=5, devices=2
    )
    launcher = DeepSpeedLauncher(LaunchSettings(timeout=120, cache_dir=tmp_path))
    record = launcher.run(spec, CONTEXT, FakeBackend())
    assert record.outcome == "error"
    assert record.note.startswith("deepspeed exited with code 7 (a rank exited with code 7)")


@needs_deepspeed
def test_a_real_deepspeed_inference_rank_group_returns_rank_zeros_record(
    ranks_know_the_fakes, tmp_path
):
    """One rank (2 are refused on CPU, CPU_TP_CRASH): DeepSpeed's runner, its launch, the rank
    entry, init_inference on a seeded tiny model, the record back."""
    from pytest_llmperf import backends

    spec = WorkloadSpec(
        kind="generate",
        model="tiny-llama",
        engine="deepspeed-inference",
        dtype="fp32",
        new_tokens=5,
        rounds=5,
        warmup=1,
    )
    seen: list[Progress] = []
    launcher = DeepSpeedLauncher(LaunchSettings(timeout=120, cache_dir=tmp_path))
    record = launcher.run(spec, CONTEXT, backends.get_backend("cpu"), progress=seen.append)
    assert record.outcome == "ok", record.note
    assert record.provenance["launcher"] == "deepspeed"
    # Rank 0's progress reaches the line through the runner, as under torchrun.
    assert ("rounds", 5, 5) in [(e.phase, e.done, e.total) for e in seen]
    assert len(record.metrics["e2e_latency_s"].samples) == 5
    assert record.note.startswith("deepspeed-inference: kernel injection off")
