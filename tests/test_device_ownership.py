"""The device is ours while we measure (devicelock.py, deviceusers.py): foreign processes on
the device make a regression inconclusive, a node-wide lock per device keeps two jobs apart,
and pytest-xdist workers are pinned one per device. Fakes only: a recording pynvml module,
a real child process holding a lock (it signals readiness through a pipe; no sleeps)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Optional

import pytest

from pytest_llmperf import devicelock
from pytest_llmperf.backends.base import Backend, Probe
from pytest_llmperf.backends.cpu import CpuBackend
from pytest_llmperf.devicelock import DeviceLocks, LockTimeout, pin_worker, visible_ids
from pytest_llmperf.deviceusers import nvml_device_users
from pytest_llmperf.execute import fill_timing
from pytest_llmperf.gate import GatePolicy, decide
from pytest_llmperf.measure import Timing
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.settings import LOCKS_HELD_ENV, UNPINNED_ENV, SettingError, resolve
from pytest_llmperf.verdict import GateSettings

GIB = 2**30


# -- foreign users of the device ---------------------------------------------------------------


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeNvml:
    """What nvml_device_users calls of pynvml, recorded; processes and samples as given."""

    NVMLError = FakeNvmlError

    def __init__(self, procs: list[tuple[int, int]], samples: Any) -> None:
        self.procs = procs
        self.samples = samples
        self.calls: list[tuple[Any, ...]] = []

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        self.calls.append(("processes", handle))
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs]

    def nvmlDeviceGetProcessUtilization(self, handle: Any, stamp: int) -> list[Any]:
        self.calls.append(("utilization", handle, stamp))
        if isinstance(self.samples, int):
            raise FakeNvmlError(self.samples)
        return [
            SimpleNamespace(pid=p, timeStamp=stamp + 1, smUtil=sm, memUtil=0, encUtil=0, decUtil=0)
            for p, sm in self.samples
        ]

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        return {100: b"/usr/bin/python3", 200: b"/opt/train/python", 300: b"jupyter"}[pid]


OURS = {100}
PROCS = [(100, 2 * GIB), (200, 3 * GIB), (300, GIB)]  # ours, foreign active, foreign idle


def test_only_foreign_processes_active_since_the_rounds_began_are_users():
    nvml = FakeNvml(PROCS, [(100, 90), (200, 30), (300, 0)])
    users = nvml_device_users(nvml, ["h0"], since_s=1000.5, ours=OURS)
    assert users == ["pid 200 python (3.0 GiB)"]
    # The samples asked for are those since the rounds began, in NVML's microseconds.
    assert ("utilization", "h0", 1_000_500_000) in nvml.calls


def test_no_samples_since_the_rounds_means_nobody_else_ran():
    nvml = FakeNvml(PROCS, 6)  # NVML_ERROR_NOT_FOUND
    assert nvml_device_users(nvml, ["h0"], since_s=5.0, ours=OURS) == []


def test_without_per_process_samples_every_foreign_context_counts_and_says_so():
    nvml = FakeNvml(PROCS, 3)  # NVML_ERROR_NOT_SUPPORTED (a MIG slice)
    users = nvml_device_users(nvml, ["h0"], since_s=5.0, ours=OURS)
    assert users == [
        "pid 200 python (3.0 GiB; activity not reported)",
        "pid 300 jupyter (1.0 GiB; activity not reported)",
    ]


def test_pids_of_another_namespace_tell_nothing():
    # NVML reports host pids in a container: our own process is not among them.
    nvml = FakeNvml([(200, GIB)], [(200, 50)])
    assert nvml_device_users(nvml, ["h0"], since_s=5.0, ours=OURS) is None
    assert nvml_device_users(nvml, [None], since_s=5.0, ours=OURS) is None


class UsedChip(Backend):
    name: ClassVar[str] = "usedchip"
    visible_devices_env: ClassVar[str] = "CUDA_VISIBLE_DEVICES"

    def __init__(self, users: Optional[list[str]]) -> None:
        self.users = users
        self.asked: list[tuple[list[int], Optional[float]]] = []

    def _probe_impl(self) -> Probe:
        return Probe(True, "", 2)

    def host_load(self) -> Optional[float]:
        return 0.0

    def own_load(self, load: Optional[float]) -> Optional[float]:
        return 0.0

    def device_users(self, indices: Any, *, since_s: Optional[float] = None) -> Any:
        self.asked.append((list(indices), since_s))
        return self.users


def measured(backend: Backend, seconds: float, devices: int = 1) -> Record:
    record = Record("test_x", "test_s", backend.name, "chip", "ok", workload={"devices": devices})
    timing = Timing(e2e=[seconds] * 10, warmup_s=0.1, peak_memory_bytes=1)
    fill_timing(record, timing, backend, tokens=10)
    return record


def history() -> list[dict]:
    return [
        {
            "date": f"2026-11-{10 + i}T00:00:00Z",
            "outcome": "ok",
            "provenance": {},
            "metrics": {"e2e_latency_s": {"median": 1.0, "samples": [1.0] * 10}},
        }
        for i in range(5)
    ]


def test_a_regression_with_a_foreign_device_user_is_inconclusive_with_a_note():
    chip = UsedChip(["pid 4242 python (3.1 GiB)"])
    record = measured(chip, 1.5, devices=2)
    assert chip.asked[0][0] == [0, 1]  # every device of the workload
    assert record.device_users == ["pid 4242 python (3.1 GiB)"]
    assert "other processes on the usedchip device during the rounds: pid 4242" in record.note
    d = decide(record, history(), GateSettings(), GatePolicy(confirm=0), None)
    assert d.inconclusive and not d.failed
    assert "inconclusive" in d.record.note
    # Survives results.json.
    assert Record.from_json(record.to_json()).device_users == record.device_users


def test_a_regression_on_a_device_nobody_else_used_fails():
    for users in ([], None):
        record = measured(UsedChip(users), 1.5)
        assert record.device_users == []
        d = decide(record, history(), GateSettings(), GatePolicy(confirm=0), None)
        assert d.failed and not d.inconclusive


# -- node-wide device locks --------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pytest_llmperf.devicelock import DeviceLocks
    with DeviceLocks(Path(sys.argv[1]), timeout_s=0).hold(sys.argv[2].split(",")):
        print("ready", flush=True)
        sys.stdin.readline()
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Any:
    """Another job: a process holding device locks until told to stop."""
    procs: list[subprocess.Popen[str]] = []
    script = tmp_path / "ci_job.py"
    script.write_text(HOLDER)

    def start(ids: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != LOCKS_HELD_ENV}
        env["PYTHONPATH"] = str(Path(devicelock.__file__).parents[1])
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "locks"), ids, "--ci-job-42"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_job_fails_at_once_with_timeout_0_naming_the_holder(tmp_path, holder):
    other = holder("cuda-0")
    locks = DeviceLocks(tmp_path / "locks", timeout_s=0)
    with pytest.raises(LockTimeout) as err, locks.hold(["cuda-0"]):
        pass
    text = str(err.value)
    assert f"cuda:0 is held by pid {other.pid} (" in text and "ci_job.py" in text
    assert "--llmperf-lock-timeout" in text


def test_a_waiting_job_says_so_and_times_out_as_an_error_record(tmp_path, holder, monkeypatch):
    other = holder("cuda-0")
    said: list[str] = []
    monkeypatch.delenv(LOCKS_HELD_ENV, raising=False)
    locks = DeviceLocks(tmp_path / "locks", timeout_s=0.2, say=said.append, poll_interval_s=0.02)
    with pytest.raises(LockTimeout), locks.hold(["cuda-0"]):
        pass
    assert said and said[0].startswith(f"waiting for cuda:0, held by pid {other.pid} (")
    assert "since" in said[0] and "--llmperf-lock-timeout" in said[0]


def test_the_lock_is_free_again_once_the_holder_is_done(tmp_path, holder):
    other = holder("cuda-0")
    assert other.stdin is not None
    other.stdin.close()
    other.wait(timeout=60)
    with DeviceLocks(tmp_path / "locks", timeout_s=0).hold(["cuda-0"]):
        owner = devicelock.read_owner(tmp_path / "locks" / "cuda-0.lock.owner")
        assert owner is not None and owner.pid == os.getpid()


def test_a_child_of_the_holder_does_not_take_the_lock_again(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCKS_HELD_ENV, raising=False)
    child = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from pytest_llmperf.devicelock import DeviceLocks
        with DeviceLocks(Path(sys.argv[1]), timeout_s=0).hold(["cuda-0"]):
            print("measured")
        """
    )
    with DeviceLocks(tmp_path / "locks", timeout_s=0).hold(["cuda-0", "cuda-1"]):
        assert os.environ[LOCKS_HELD_ENV] == f"{os.getpid()}:cuda-0,cuda-1"
        out = subprocess.run(
            [sys.executable, "-c", child, str(tmp_path / "locks")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "measured"
    assert LOCKS_HELD_ENV not in os.environ  # released, and no longer exported


def test_a_stale_export_does_not_switch_locking_off(tmp_path):
    # pid 1 is an ancestor of everything, but it holds no lock: the owner file says so.
    env = {LOCKS_HELD_ENV: "1:cuda-0"}
    assert devicelock.inherited(env, tmp_path) == set()
    env = {LOCKS_HELD_ENV: f"{os.getpid() + 10**7}:cuda-0"}  # not an ancestor at all
    assert devicelock.inherited(env, tmp_path) == set()


def test_devices_are_taken_in_sorted_order(tmp_path, monkeypatch):
    import filelock

    taken: list[str] = []

    class RecordingLock:
        def __init__(self, path: str, **_: Any) -> None:
            self.path = path

        def acquire(self, **_: Any) -> None:
            taken.append(Path(self.path).stem)

        def release(self) -> None:
            taken.append("release " + Path(self.path).stem)

    monkeypatch.setattr(filelock, "FileLock", RecordingLock)
    monkeypatch.delenv(LOCKS_HELD_ENV, raising=False)
    with DeviceLocks(tmp_path, timeout_s=0).hold(["cuda-3", "cuda-1", "cuda-2"]):
        pass
    assert taken == [
        "cuda-1",
        "cuda-2",
        "cuda-3",
        "release cuda-3",
        "release cuda-2",
        "release cuda-1",
    ]


def test_cpu_takes_no_lock(tmp_path):
    assert visible_ids(CpuBackend(), {}, 1) == []
    locks = DeviceLocks(tmp_path / "never", timeout_s=0)
    with locks.hold(visible_ids(CpuBackend(), {}, 1)):
        pass
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("source", "value"),
    [("cli", "-1"), ("cli", "soon"), ("env", "nan"), ("ini", "-0.5")],
)
def test_a_bad_lock_timeout_is_one_line_naming_the_option(source, value):
    cli = {"lock_timeout": value} if source == "cli" else {}
    env = {"LLMPERF_LOCK_TIMEOUT": value} if source == "env" else {}
    ini = {"llmperf_lock_timeout": value} if source == "ini" else {}
    with pytest.raises(SettingError) as err:
        resolve(cli=cli.get, ini=lambda k: ini.get(k, ""), inifile="tox.ini", environ=env)
    text = str(err.value)
    named = {
        "cli": "--llmperf-lock-timeout=",
        "env": "env LLMPERF_LOCK_TIMEOUT=",
        "ini": "ini llmperf_lock_timeout=",
    }
    assert text.startswith(named[source] + value) and "\n" not in text
    assert "seconds ≥ 0" in text


def test_lock_options_resolve():
    s = resolve(
        cli={"lock_timeout": "0", "lock_dir": "/srv/locks"}.get,
        ini=lambda k: "",
        inifile=None,
        environ={},
    )
    assert (s.lock_timeout, s.lock_dir) == (0.0, "/srv/locks")
    assert (
        resolve(cli=lambda n: None, ini=lambda k: "", inifile=None, environ={}).lock_timeout
        == 3600.0
    )


# -- pytest-xdist: one device per worker -------------------------------------------------------


class TwoGpus(Backend):
    name: ClassVar[str] = "cuda"
    visible_devices_env: ClassVar[str] = "CUDA_VISIBLE_DEVICES"

    def _probe_impl(self) -> Probe:
        return Probe(True, "", 1)  # what the vendor stack sees once pinned

    def node_device_count(self) -> Optional[int]:
        return 2


@pytest.mark.parametrize(
    ("preset", "expected"),
    [(None, ["0", "1", "0", "1"]), ("3,5", ["3", "5", "3", "5"])],
)
def test_workers_are_pinned_round_robin(preset, expected):
    pinned = []
    for k in range(4):
        env = {"PYTEST_XDIST_WORKER": f"gw{k}", "PYTEST_XDIST_WORKER_COUNT": "4"}
        if preset is not None:
            env["CUDA_VISIBLE_DEVICES"] = preset
        assert pin_worker([TwoGpus(), CpuBackend()], env) == {"CUDA_VISIBLE_DEVICES": expected[k]}
        pinned.append(env["CUDA_VISIBLE_DEVICES"])
        assert pin_worker([TwoGpus()], env) == {}  # never twice
        assert devicelock.workers_per_device(env, 2) == 2
    assert pinned == expected


def test_a_pinned_worker_counts_and_locks_the_node_for_several_devices(monkeypatch):
    env = {"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "3,5"}
    pin_worker([TwoGpus()], env)
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    # One device of its own; a devices(2) workload locks both and its ranks see both.
    assert visible_ids(TwoGpus(), env, 1) == ["cuda-5"]
    assert visible_ids(TwoGpus(), env, 2) == ["cuda-3", "cuda-5"]
    assert devicelock.unpinned_env(env)["CUDA_VISIBLE_DEVICES"] == "3,5"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert TwoGpus().device_count() == 2  # devices(2) is not skipped by the pin


def test_ranks_of_a_worker_pinned_where_nothing_was_set_see_every_device():
    env = {"PYTEST_XDIST_WORKER": "gw0"}
    pin_worker([TwoGpus()], env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and UNPINNED_ENV in env
    assert "CUDA_VISIBLE_DEVICES" not in devicelock.unpinned_env(env)
    assert visible_ids(TwoGpus(), env, 2) == ["cuda-0", "cuda-1"]


def test_without_xdist_or_with_one_device_nothing_changes():
    env: dict[str, str] = {}
    assert pin_worker([TwoGpus()], env) == {} and env == {}
    env = {"PYTEST_XDIST_WORKER": "gw3", "CUDA_VISIBLE_DEVICES": "7"}
    assert pin_worker([TwoGpus()], env) == {} and env["CUDA_VISIBLE_DEVICES"] == "7"


def test_neuron_core_ranges_are_expanded():
    assert devicelock.parse_visible("0-3,8") == ["0", "1", "2", "3", "8"]
    assert devicelock.parse_visible("GPU-ab12, GPU-cd34") == ["GPU-ab12", "GPU-cd34"]
    assert devicelock.parse_visible("") == [] and devicelock.parse_visible(None) is None


def test_metric_value_unused_guard():
    # A record without device_users from an older results.json still loads.
    data = Record("k", "s", "cuda", "d", "ok", {"e2e_latency_s": MetricValue("e2e_latency_s", 1.0)})
    raw = data.to_json()
    del raw["device_users"]
    assert Record.from_json(raw).device_users == []
