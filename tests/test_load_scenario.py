"""llmperf.load: every round a cold start in a fresh process, the engine's libraries imported
and timed apart (import_s), the checkpoint's files evicted from the page cache (cold) or read
once (warm) on exactly the directory the engine asks the store for, then the engine's load
(load_time_s, gated).

The eviction and import tests execute a load spec in this process on the fake chip, with
``os.posix_fadvise`` recorded and the page-cache check (``mincore``) answered by the test, so
nothing depends on the machine's memory; the fresh-process tests start real workers; one test
loads tiny-llama for real on the CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes import FakeBackend, FakeEngine
from helpers import FAKE, no_traceback, read_results, record_of

from pytest_llmperf import backends, engines
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.gate import GatePolicy, decide
from pytest_llmperf.metrics import LOAD_GATED, main_metric
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.scenarios import load as load_scenario
from pytest_llmperf.spec import RecordContext, WorkloadSpec
from pytest_llmperf.verdict import GateSettings

CONTEXT = RecordContext(key="test_load", suite="test_s", device_key="fake-chip")
FILES = ("config.json", "model-1-of-2.safetensors", "model-2-of-2.safetensors", "t/tok.json")
#: What importing the test's library module costs on the fake clock.
IMPORT_S = 0.25
LIBRARY = "llmperf_test_library"


class CheckpointEngine(FakeEngine):
    """Asks the store for its checkpoint before its clock starts, as every real engine does."""

    name: ClassVar[str] = "fake-checkpoint"
    libraries: ClassVar[tuple[str, ...]] = ("json", LIBRARY)

    def load(self, model: Any, spec: Any, backend: Any, store: Any = None) -> Any:
        store.checkpoint(model, spec.dtype, spec.seed)
        return super().load(model, spec, backend, store)


class DirStore(CheckpointStore):
    """A store whose checkpoint of every model is one directory of the test's."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory.parent / "cache", None)
        self.directory = directory

    def checkpoint(self, model: Any, dtype: str, seed: int) -> tuple[Path, str]:
        return self.directory, "fake-seed-0"


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeBackend:
    """The fake chip, an engine that reads a checkpoint, and a library whose import costs
    IMPORT_S on the fake clock."""
    backends.register(FakeBackend, replace=True)
    engines.register(CheckpointEngine())
    (tmp_path / f"{LIBRARY}.py").write_text(
        "from pytest_llmperf import backends\n"
        f"backends.get_backend('fake').advance({IMPORT_S}, 'import')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield backends.get_backend("fake")
    sys.modules.pop(LIBRARY, None)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    directory = tmp_path / "checkpoint"
    for name in FILES:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"w" * 4096)
    return directory


@pytest.fixture
def evicted(monkeypatch, fake) -> list[tuple[int, int, int, int]]:
    """Every posix_fadvise call, as (inode, offset, length, advice), and an "evict" event on
    the fake chip's log; the page-cache check says the files are out of the cache."""
    calls: list[tuple[int, int, int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((os.fstat(fd).st_ino, offset, length, advice))
        fake.events.append("evict")

    monkeypatch.setattr(os, "posix_fadvise", fadvise, raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    monkeypatch.setattr(load_scenario, "page_cached_fraction", lambda files: 0.0)
    return calls


def load_spec(file_cache: str = "cold", rounds: int = 2) -> WorkloadSpec:
    return WorkloadSpec(
        kind="load",
        model="tiny-bloom",
        engine="fake-checkpoint",
        rounds=rounds,
        warmup=0,
        file_cache=file_cache,
    )


def run_load(backend: FakeBackend, checkpoint: Path, file_cache: str = "cold") -> Record:
    cache = ModelCache(store=DirStore(checkpoint))
    return execute(load_spec(file_cache), CONTEXT, backend, cache)


# -- the page cache ------------------------------------------------------------------------------


def test_cold_evicts_every_checkpoint_file_before_each_load(fake, checkpoint, evicted):
    record = run_load(fake, checkpoint)
    assert record.outcome == "ok", record.note
    inodes = sorted((checkpoint / name).stat().st_ino for name in FILES)
    dontneed = os.POSIX_FADV_DONTNEED
    assert sorted(evicted) == sorted([(i, 0, 0, dontneed) for i in inodes] * 2)
    # Each load starts after its eviction: four evictions, then the engine's load.
    work = [e for e in fake.events if e in ("evict", "load")]
    assert work == (["evict"] * 4 + ["load"]) * 2
    assert record.workload["file_cache"] == "cold"
    assert record.metrics["page_cached_fraction"].samples == [0.0, 0.0]
    assert "file cache cold: 4 checkpoint files (16.0 KiB) evicted with posix_fadvise" in (
        record.note
    )


def test_an_eviction_that_did_not_take_is_labelled_warm(fake, checkpoint, evicted, monkeypatch):
    monkeypatch.setattr(load_scenario, "page_cached_fraction", lambda files: 0.75)
    record = run_load(fake, checkpoint)
    assert record.workload["file_cache"] == "warm"
    assert "most of it stayed in the page cache" in record.note
    assert record.metrics["page_cached_fraction"].value == 0.75


def test_without_posix_fadvise_cold_numbers_are_labelled_warm(fake, checkpoint, monkeypatch):
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    record = run_load(fake, checkpoint)
    assert record.outcome == "ok"
    assert record.workload["file_cache"] == "warm"
    assert f"posix_fadvise is unavailable on {sys.platform}: these are warm numbers" in (
        record.note
    )


def test_warm_reads_the_checkpoint_once_and_evicts_nothing(fake, checkpoint, evicted, monkeypatch):
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(load_scenario, "open", counting_open, raising=False)
    monkeypatch.setattr(load_scenario, "page_cached_fraction", lambda files: 1.0)
    record = run_load(fake, checkpoint, "warm")
    assert evicted == []
    assert sorted(opened) == sorted([Path(n).name for n in FILES] * 2)
    assert record.workload["file_cache"] == "warm"
    assert "file cache warm: 4 checkpoint files (16.0 KiB) read once before each load" in (
        record.note
    )


# -- import_s and load_time_s --------------------------------------------------------------------


def test_the_import_is_timed_apart_from_the_load_and_the_note_says_what_it_covers(
    fake, checkpoint, evicted
):
    record = run_load(fake, checkpoint)
    # Round 2 shares round 1's process here: its library is already imported.
    assert record.metrics["import_s"].samples == [IMPORT_S, 0.0]
    assert record.metrics["load_time_s"].samples == [0.5, 0.5]
    assert (record.metrics["import_s"].unit, record.metrics["load_time_s"].unit) == ("s", "s")
    assert record.main_metric == "load_time_s" and record.median == 0.5
    assert "import_s covers importing llmperf_test_library (json imported before the round" in (
        record.note
    )
    assert "rounds after the first shared its process" in record.note
    # The timing honesty rule: the device is synchronized before every clock read.
    clocks = [i for i, e in enumerate(fake.events) if e == "clock"]
    assert clocks and all(fake.events[i - 1] == "sync" for i in clocks)


def test_a_load_spec_crosses_a_process_boundary_with_its_file_cache():
    spec = load_spec("warm")
    assert WorkloadSpec.from_json(spec.to_json()) == spec
    params = spec.params()
    assert params["file_cache"] == "warm"
    assert "new_tokens" not in params and "batch_size" not in params
    # Specs made before the field existed are unchanged (the default is ignored by them).
    assert WorkloadSpec(kind="generate", model="m").file_cache == "cold"


def test_load_time_leads_only_a_load_record():
    assert main_metric(["load_time_s", "import_s", "peak_memory_bytes"]) == "load_time_s"
    # A generate record that ran out of memory after its load keeps the load time.
    assert main_metric(["load_time_s"]) == "time_s"


def test_a_kept_re_measurement_of_a_load_keeps_its_own_load_times():
    def load_record(seconds: float) -> Record:
        return Record(
            key="test_load",
            suite="test_s",
            backend="cpu",
            device_key="cpu-x",
            outcome="ok",
            metrics={
                name: MetricValue.from_samples(name, [value] * 3)
                for name, value in (("load_time_s", seconds), ("import_s", 1.0))
            },
        )

    runs = [
        {"date": "2026-11-10T00:00:00Z", "outcome": "ok", "provenance": {}, "metrics": metrics}
        for metrics in [{"load_time_s": {"median": 1.0, "samples": [1.0] * 3}}] * 3
    ]
    policy = GatePolicy(gating=True, confirm=1)
    d = decide(
        load_record(1.5), runs, GateSettings(gate=LOAD_GATED), policy, lambda: load_record(1.0)
    )
    assert not d.failed and d.record.median == 1.0


# -- through the plugin, in fresh processes -------------------------------------------------------

#: The project's conftest: the fake chip, and an engine whose library import costs IMPORT_S on
#: the fake clock and writes down the process it ran in (FAKE_PIDS_FILE).
PROJECT_CONFTEST = (
    Path(__file__).with_name("fakes.py").read_text()
    + """

class LibraryEngine(FakeEngine):
    name: ClassVar[str] = "fake-library"
    libraries: ClassVar[tuple[str, ...]] = ("fake_library",)

    def load(self, model: Any, spec: Any, backend: Backend, store: Any = None) -> LoadedModel:
        loaded = super().load(model, spec, backend, store)
        slower = float(os.environ.get("FAKE_SLOWER_LOAD_S", "0"))  # a slower load
        backend.advance(slower, "load")
        loaded.load_time_s += slower
        return loaded


register_all()
engines.register(LibraryEngine())
"""
)
FAKE_LIBRARY = f"""
import os
from pytest_llmperf import backends

backends.get_backend("fake").advance({IMPORT_S}, "import")
with open(os.environ["FAKE_PIDS_FILE"], "a") as f:
    print(os.getpid(), file=f)
"""
LOAD_TEST = """
def test_load(llmperf):
    llmperf.load(model="tiny-bloom", engine="fake-library", rounds=3)
"""


@pytest.fixture
def children(project, monkeypatch, tmp_path):
    """Workers import the project's conftest (the fake chip) and its fake library."""
    project.makeconftest(PROJECT_CONFTEST)
    project.makepyfile(fake_library=FAKE_LIBRARY, test_load=LOAD_TEST)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(project.path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "conftest")
    monkeypatch.setenv("FAKE_PIDS_FILE", str(tmp_path / "pids"))
    return project


def test_each_round_is_a_cold_start_in_a_fresh_process(children, tmp_path):
    result = children.runpytest(FAKE, "--llmperf-report=r")
    result.assert_outcomes(passed=1)
    record = record_of(read_results(children.path / "r"), "test_load")
    pids = (tmp_path / "pids").read_text().split()
    assert len(pids) == len(set(pids)) == 3 and str(os.getpid()) not in pids
    # Each process paid the import: a shared one would have found the library imported.
    assert record["metrics"]["import_s"]["samples"] == [IMPORT_S] * 3
    assert record["metrics"]["load_time_s"]["samples"] == [0.5] * 3
    assert record["metrics"]["import_s"]["unit"] == record["metrics"]["load_time_s"]["unit"] == "s"
    assert record["workload"]["rounds"] == 3 and record["workload"]["fresh"] == "round"
    assert record["note"].startswith(
        "each round measured in a fresh process; import_s covers importing fake_library; "
        "file_cache does not apply"
    )


def test_a_slower_load_fails_the_gate_on_load_time(children, monkeypatch):
    children.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    monkeypatch.setenv("FAKE_SLOWER_LOAD_S", "0.25")
    result = children.runpytest(FAKE, "--llmperf-confirm=0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*load_time_s*"])


def test_a_bad_file_cache_is_a_one_line_usage_error(project):
    project.makepyfile(
        test_load="""
        def test_load(llmperf):
            llmperf.load(model="tiny-bloom", engine="fake-engine", file_cache="hot")
        """
    )
    result = project.runpytest(FAKE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*file_cache='hot': expected 'cold' or 'warm'*"])
    no_traceback(result)


def test_tiny_llama_loads_for_real_on_the_cpu_in_three_fresh_processes(project, tmp_path):
    project.makepyfile(
        test_load="""
        def test_load(llmperf):
            r = llmperf.load(model="tiny-llama", dtype="fp32", launcher="process")
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
    record = record_of(read_results(project.path / "r"), "test_load")
    assert len(record["metrics"]["load_time_s"]["samples"]) == 3
    assert len(record["metrics"]["import_s"]["samples"]) == 3
    assert record["metrics"]["load_time_s"]["unit"] == "s"
    assert "import_s covers importing" in record["note"]
    assert "4 checkpoint files" in record["note"]  # the seeded checkpoint the store wrote
