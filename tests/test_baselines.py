"""Baseline files: format, merging, corruption handling and crash safety.

Everything here is deterministic: fixed dates, pipes (not sleeps) to synchronize with child
processes, pytest's tmp_path for files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import filelock
import pytest

from pytest_llmperf import baselines as bl
from pytest_llmperf.baselines import BaselineError
from pytest_llmperf.results import MetricValue, Record

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = {"key": "cpu-x", "backend": "cpu", "name": "Test CPU", "count": 1}
KEY = "test_latency[batch_size=1,dtype=bf16,model=tiny-bloom,new_tokens=100]"
VERSIONS = {"torch": "2.12.0", "transformers": "5.23.0", "pytest-llmperf": "0.1.0"}


def make_record(
    key: str = KEY,
    *,
    latency: float = 0.0812,
    outcome: str = "ok",
    versions: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    suite: str = "test_a",
    device_key: str = "cpu-x",
    commit: str = "abc123",
) -> Record:
    metrics = {}
    if outcome == "ok":
        samples = [latency * (1 + d) for d in (-0.001, 0.0, 0.001)]
        metrics = {
            "e2e_latency_s": MetricValue.from_samples("e2e_latency_s", samples),
            "peak_memory_bytes": MetricValue("peak_memory_bytes", 123456789012, [123456789012]),
        }
    return Record(
        key=key,
        suite=suite,
        backend="cpu",
        device_key=device_key,
        outcome=outcome,
        metrics=metrics,
        output_digest="sha256:00ff" if outcome == "ok" else None,
        output_head=[1, 2, 3] if outcome == "ok" else None,
        provenance={
            "versions": dict(VERSIONS if versions is None else versions),
            "env": dict({"OMP_NUM_THREADS": "2"} if env is None else env),
            "git_commit": commit,
            "date": "2026-11-22T03:00:00Z",
            "hostname": "node-1",
        },
    )


def do_update(path: Path, records: list[Record], **kwargs) -> list[bl.Change]:
    kwargs.setdefault("now", "2026-11-22T03:00:00Z")
    return bl.update(path, records, device=DEVICE, suite="test_a", **kwargs)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- format ------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = bl.baseline_path(tmp_path, "cpu-x", "test_a")
    changes = do_update(path, [make_record()])
    assert [(c.key, c.action) for c in changes] == [(KEY, "added")]

    loaded = bl.load(path)
    assert loaded is not None
    assert (loaded.path, loaded.suite, loaded.device) == (path, "test_a", DEVICE)
    [run] = loaded.runs(KEY)
    assert run == bl.record_to_run(make_record(), date="2026-11-22T03:00:00Z")
    assert run["outcome"] == "ok"
    assert run["output_digest"] == "sha256:00ff" and run["output_head"] == [1, 2, 3]
    assert run["metrics"]["e2e_latency_s"] == {
        "unit": "s",
        "direction": "lower",
        "median": 0.0812,
        "samples": [0.0811188, 0.0812, 0.0812812],
    }
    assert run["provenance"]["versions"] == VERSIONS
    assert loaded.runs("test_other") == []


def test_missing_file_loads_as_none(tmp_path: Path) -> None:
    assert bl.load(tmp_path / "nope" / "test_a.json") is None


def test_file_bytes_are_deterministic(tmp_path: Path) -> None:
    records = [make_record(), make_record("test_b[x=1]", latency=1 / 3)]
    a, b = tmp_path / "a" / "test_a.json", tmp_path / "b" / "test_a.json"
    do_update(a, records)
    do_update(b, list(reversed(records)))
    text = a.read_text(encoding="utf-8")
    assert a.read_bytes() == b.read_bytes()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == bl.dumps(json.loads(text))  # keys sorted, already canonical
    assert '"median": 0.333333' in text  # six significant digits
    assert "123456789012" in text  # ints stay exact

    # Rewriting the same history (a reset with identical input) is byte-identical too.
    before = a.read_bytes()
    do_update(a, records, now="2026-11-23T03:00:00Z")
    assert a.read_bytes() != before  # two runs now
    do_update(a, records, reset=True)
    assert a.read_bytes() == before
    do_update(a, records, reset=True)
    assert a.read_bytes() == before


def test_dumps_rules() -> None:
    text = bl.dumps({"b": [1.23456789, 2, -0.0, 1e-9 / 3], "a": {"name": "Gaudí"}, "c": True})
    assert text == (
        '{\n  "a": {\n    "name": "Gaudí"\n  },\n  "b": [1.23457, 2, 0.0, 3.33333e-10],\n'
        '  "c": true\n}\n'
    )
    with pytest.raises(ValueError, match="non-finite"):
        bl.dumps({"x": float("nan")})


def test_record_to_run_refuses_what_must_not_be_stored() -> None:
    with pytest.raises(ValueError, match="outcome 'error' is never stored"):
        bl.record_to_run(make_record(outcome="error"))
    bad = make_record()
    bad.metrics["e2e_latency_s"].samples.append(float("nan"))
    with pytest.raises(ValueError, match=re.escape(KEY)):
        bl.record_to_run(bad)
    assert bl.record_to_run(make_record(outcome="oom"), date="d")["metrics"] == {}


# --- versions ----------------------------------------------------------------------------------


def test_perf_versions_and_changes() -> None:
    prov = make_record().provenance
    # A run stored before the timing method was recorded was stamped by sync and clock.
    assert bl.perf_versions(prov) == {
        **VERSIONS,
        "env:OMP_NUM_THREADS": "2",
        "timing_method": "sync-clock",
    }
    assert bl.version_changes(prov, prov | {"timing_method": "sync-clock"}) == []
    assert bl.version_changes(prov, prov | {"timing_method": "events"}) == [
        "timing_method sync-clock → events"
    ]
    old = {"torch": "2.12.0", "env:OMP_NUM_THREADS": "4", "deepspeed": "0.14"}
    new = {"torch": "2.13.0", "env:OMP_NUM_THREADS": "2", "transformers": "5.23.0"}
    assert bl.version_changes(old, new) == [
        "deepspeed 0.14 → (none)",
        "env:OMP_NUM_THREADS 4 → 2",
        "torch 2.12.0 → 2.13.0",
        "transformers (none) → 5.23.0",
    ]
    assert bl.version_changes(new, dict(new)) == []
    # A whole provenance dict is reduced first; commit, date and hostname never count.
    other = make_record(commit="def456").provenance | {"hostname": "node-2", "date": "later"}
    assert bl.version_changes(prov, other) == []


# --- merging -----------------------------------------------------------------------------------


def test_entries_not_updated_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record("test_keep[a=1]", latency=0.5), make_record()])
    kept = bl.load(path).runs("test_keep[a=1]")
    do_update(path, [make_record(latency=0.09)], now="2026-11-23T00:00:00Z")
    loaded = bl.load(path)
    assert loaded.runs("test_keep[a=1]") == kept
    assert [r["metrics"]["e2e_latency_s"]["median"] for r in loaded.runs(KEY)] == [0.0812, 0.09]


def test_history_is_trimmed_to_keep_runs(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    actions = []
    for day in range(1, 6):
        [change] = do_update(path, [make_record()], keep_runs=3, now=f"2026-11-0{day}T00:00:00Z")
        actions.append((change.action, change.detail))
    assert actions[:3] == [
        ("added", "1 run"),
        ("appended", "2 runs kept"),
        ("appended", "3 runs kept"),
    ]
    assert actions[4] == ("appended", "3 runs kept, 1 oldest dropped")
    dates = [r["date"] for r in bl.load(path).runs(KEY)]
    assert dates == ["2026-11-03T00:00:00Z", "2026-11-04T00:00:00Z", "2026-11-05T00:00:00Z"]
    with pytest.raises(ValueError, match="keep_runs"):
        do_update(path, [make_record()], keep_runs=0)


def test_version_change_restarts_history(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    do_update(path, [make_record(commit="other")])  # a new commit alone is not an upgrade
    assert len(bl.load(path).runs(KEY)) == 2

    upgraded = make_record(versions={**VERSIONS, "torch": "2.13.0"}, env={"OMP_NUM_THREADS": "4"})
    [change] = do_update(path, [upgraded], now="2026-12-01T00:00:00Z")
    assert change.action == "restarted"
    assert change.detail == "history restarted: env:OMP_NUM_THREADS 2 → 4, torch 2.12.0 → 2.13.0"
    assert [r["date"] for r in bl.load(path).runs(KEY)] == ["2026-12-01T00:00:00Z"]


def test_reset_starts_history_afresh(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    for day in range(3):
        do_update(path, [make_record()], now=f"2026-11-2{day}T03:00:00Z")
    changes = do_update(path, [make_record(latency=0.2), make_record("test_new")], reset=True)
    assert [(c.key, c.action, c.detail) for c in changes] == [
        (KEY, "reset", "history reset: 3 old run(s) dropped"),
        ("test_new", "added", "1 run"),
    ]
    [run] = bl.load(path).runs(KEY)
    assert run["metrics"]["e2e_latency_s"]["median"] == 0.2


def test_error_records_are_skipped_and_oom_stored(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    assert do_update(path, [make_record(outcome="error")]) == []
    assert not path.exists()  # nothing to store, nothing written

    changes = do_update(
        path, [make_record("test_err", outcome="error"), make_record(outcome="oom")]
    )
    assert [(c.key, c.action) for c in changes] == [(KEY, "added")]
    loaded = bl.load(path)
    assert list(loaded.entries) == [KEY]
    assert loaded.runs(KEY)[0]["outcome"] == "oom"


def test_records_must_match_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    with pytest.raises(ValueError, match="belongs to suite 'test_b'"):
        do_update(path, [make_record(suite="test_b")])
    with pytest.raises(ValueError, match="measured on 'cuda-y'"):
        do_update(path, [make_record(device_key="cuda-y")])
    assert not path.exists()


# --- corrupt files -----------------------------------------------------------------------------


def _valid_text() -> str:
    return bl.dumps(
        {
            "schema": 1,
            "suite": "test_a",
            "device": DEVICE,
            "entries": {"k": {"runs": [bl.record_to_run(make_record(), date="d")]}},
        }
    )


def _edit(change) -> str:
    data = json.loads(_valid_text())
    change(data)
    return json.dumps(data)


CORRUPT = {
    "not-json": ("{this is not json", "not valid JSON at line 1 column 2"),
    "truncated": (_valid_text()[: len(_valid_text()) // 2], "ends early"),
    "empty": ("", "empty file"),
    "merge-conflict": (
        "<<<<<<< HEAD\n" + _valid_text() + "=======\n{}\n>>>>>>> branch\n",
        "merge conflict markers",
    ),
    "newer-schema": (_edit(lambda d: d.update(schema=2)), "schema: version 2 is newer"),
    "schema-type": (_edit(lambda d: d.update(schema="1")), "schema: expected an integer"),
    "no-schema": (_edit(lambda d: d.pop("schema")), "schema: missing; expected"),
    "no-entries": (_edit(lambda d: d.pop("entries")), "entries: missing; expected an object"),
    "no-median": (
        _edit(lambda d: d["entries"]["k"]["runs"][0]["metrics"]["e2e_latency_s"].pop("median")),
        "entries['k'].runs[0].metrics.e2e_latency_s.median: missing",
    ),
    "wrong-type": (
        _edit(
            lambda d: d["entries"]["k"]["runs"][0]["metrics"]["e2e_latency_s"].update(median="abc")
        ),
        "entries['k'].runs[0].metrics.e2e_latency_s.median: expected a number ≥ 0, got 'abc'",
    ),
    "negative-median": (
        _edit(
            lambda d: d["entries"]["k"]["runs"][0]["metrics"]["e2e_latency_s"].update(median=-1.0)
        ),
        "entries['k'].runs[0].metrics.e2e_latency_s.median: expected a number ≥ 0, got -1.0",
    ),
    "bad-sample": (
        _edit(
            lambda d: d["entries"]["k"]["runs"][0]["metrics"]["e2e_latency_s"]["samples"].append(
                True
            )
        ),
        "metrics.e2e_latency_s.samples[3]: expected a number ≥ 0, got true",
    ),
    "error-outcome": (
        _edit(lambda d: d["entries"]["k"]["runs"][0].update(outcome="error")),
        "entries['k'].runs[0].outcome: expected 'ok' or 'oom'",
    ),
    "runs-not-list": (
        _edit(lambda d: d["entries"]["k"].update(runs={})),
        "entries['k'].runs: expected a list of runs, got an object",
    ),
    "version-type": (
        _edit(lambda d: d["entries"]["k"]["runs"][0]["provenance"]["versions"].update(torch=2)),
        "runs[0].provenance.versions.torch: expected a string or null, got 2",
    ),
    "top-level-list": ("[]", "(top level): expected a JSON object, got a list"),
    "duplicate-key": ('{"schema": 1, "schema": 1}', "key 'schema' appears twice"),
    "nan": (_valid_text().replace("0.0812,", "NaN,", 1), "holds NaN"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_named_and_never_overwritten(tmp_path: Path, case: str) -> None:
    text, expected = CORRUPT[case]
    path = tmp_path / "cpu-x" / "test_a.json"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    before = path.read_bytes()

    with pytest.raises(BaselineError) as info:
        bl.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message

    with pytest.raises(BaselineError):
        do_update(path, [make_record()])
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


def test_valid_reference_text_loads() -> None:
    # Guards the corrupt cases above: each breaks a file that is otherwise valid.
    assert json.loads(_valid_text())["entries"]["k"]["runs"][0]["outcome"] == "ok"


def test_wrong_suite_in_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    path.parent.mkdir()
    path.write_text(_edit(lambda d: d.update(suite="test_z")), encoding="utf-8")
    with pytest.raises(BaselineError, match="suite: expected 'test_a'"):
        do_update(path, [make_record()])


# --- crash safety ------------------------------------------------------------------------------


def test_failed_replace_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bl.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        do_update(path, [make_record(latency=0.5)])
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


def test_failed_write_midway_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    before = path.read_bytes()
    real_write = bl._write_all

    def half_then_fail(fd: int, data: bytes) -> None:
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bl, "_write_all", half_then_fail)
    with pytest.raises(OSError):
        do_update(path, [make_record(latency=0.5)])
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


KILLED_WRITER = r"""
import sys
from pathlib import Path
from pytest_llmperf import baselines as bl
from pytest_llmperf.results import MetricValue, Record

path, stage = Path(sys.argv[1]), sys.argv[2]
real_write = bl._write_all

def write_then_wait(fd, data):
    real_write(fd, data[: len(data) // 2] if stage == "mid-write" else data)
    print("ready", flush=True)
    sys.stdin.read()  # the parent SIGKILLs us while we wait here
    raise SystemExit("was not killed")

bl._write_all = write_then_wait
records = [
    Record(key=f"test_big[i={i}]", suite="test_a", backend="cpu", device_key="cpu-x",
           outcome="ok",
           metrics={"e2e_latency_s": MetricValue.from_samples("e2e_latency_s", [0.1 + i] * 50)})
    for i in range(2000)
]
bl.update(path, records, device={"key": "cpu-x"}, suite="test_a", now="2026-01-01T00:00:00Z")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("stage", ["mid-write", "written-not-renamed"])
def test_kill_9_during_update_keeps_old_file(tmp_path: Path, monkeypatch, stage: str) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    before = path.read_bytes()

    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), stage],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if line != "ready\n":
            proc.wait()
            pytest.fail(f"writer did not reach the write: {line!r} {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()

    assert path.read_bytes() == before
    assert bl.load(path).runs(KEY)  # still valid
    [stale] = leftovers(path.parent)  # SIGKILL leaves the temp file, never the target
    assert stale.startswith(".test_a.json.")
    assert list(bl.load_dir(tmp_path)) == [("cpu-x", "test_a")]

    # The dead writer's lock is free again and its temp file is cleaned by the next writer.
    monkeypatch.setattr(bl, "LOCK_TIMEOUT_S", 30.0)
    do_update(path, [make_record(latency=0.09)])
    assert leftovers(path.parent) == []
    assert len(bl.load(path).runs(KEY)) == 2


CONCURRENT_WRITER = r"""
import sys
from pathlib import Path
from pytest_llmperf import baselines as bl
from pytest_llmperf.results import MetricValue, Record

path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
if sys.stdin.readline() != "go\n":
    raise SystemExit("no go")
for i in range(count):
    record = Record(key=f"test_w[i={i},writer={name}]", suite="test_a", backend="cpu",
                    device_key="cpu-x", outcome="ok",
                    metrics={"e2e_latency_s": MetricValue.from_samples("e2e_latency_s", [0.1])})
    bl.update(path, [record], device={"key": "cpu-x"}, suite="test_a", now="2026-01-01T00:00:00Z")
"""


def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    writers, per_writer = 4, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(path), f"w{n}", str(per_writer)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            text=True,
        )
        for n in range(writers)
    ]
    try:
        for proc in procs:  # barrier: every writer is up before any is let go
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate()
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    entries = bl.load(path).entries
    expected = {f"test_w[i={i},writer=w{n}]" for n in range(writers) for i in range(per_writer)}
    assert set(entries) == expected | {KEY}
    assert all(len(runs) == 1 for runs in entries.values())
    assert leftovers(path.parent) == []


def test_lock_held_too_long_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "cpu-x" / "test_a.json"
    do_update(path, [make_record()])
    before = path.read_bytes()
    monkeypatch.setattr(bl, "LOCK_TIMEOUT_S", 0.05)
    with (
        filelock.FileLock(str(bl._lock_path(path))),
        pytest.raises(BaselineError, match="could not take the lock"),
    ):
        do_update(path, [make_record(latency=0.5)])
    assert path.read_bytes() == before


# --- names and directories ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
        (
            "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
            "intel-r-xeon-r-platinum-8375c-cpu-2.90ghz",
        ),
        ("../../etc", "etc"),
        ("a/../b", "a-..-b"),
        ("..", None),
        ("", "unknown"),
        ("   ", "unknown"),
        ("Gaudí2 Ünïcode", "gaudi2-unicode"),
        ("ＨＰＵ", "hpu"),  # fullwidth letters fold to ASCII
        ("测试", None),
        ("cuda@label", "cuda-label"),
        ("x" * 300, None),
    ],
)
def test_safe_component(name: str, expected: str | None) -> None:
    safe = bl.safe_component(name)
    if expected is not None:
        assert safe == expected
    assert re.fullmatch(r"[a-z0-9_][a-z0-9._-]*", safe) and safe not in (".", "..")
    assert len(safe) <= 100
    assert bl.safe_component(safe) == safe  # idempotent: a device key stays itself


def test_safe_component_keeps_different_names_apart() -> None:
    assert bl.safe_component("测试") != bl.safe_component("生产")
    assert bl.safe_component("x" * 300) != bl.safe_component("x" * 301)
    assert bl.safe_component("测试").startswith("x-")


def test_paths(tmp_path: Path) -> None:
    assert bl.device_dir(tmp_path, "cpu-x") == tmp_path / "cpu-x"
    assert bl.device_dir(tmp_path, "cpu-x", "SDK 1.17") == tmp_path / "cpu-x@sdk-1.17"
    assert bl.device_dir(tmp_path, "cpu-x", "") == tmp_path / "cpu-x"
    assert bl.baseline_path(tmp_path, "hpu-gaudi2", "test_Gen", "a/b") == (
        tmp_path / "hpu-gaudi2@a-b" / "test_Gen.json"
    )
    for bad in ("", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not usable as a file name"):
            bl.baseline_path(tmp_path, "cpu-x", bad)


def test_load_dir(tmp_path: Path) -> None:
    do_update(tmp_path / "cpu-x" / "test_a.json", [make_record()])
    do_update(tmp_path / "cpu-x@sdk2" / "test_a.json", [make_record()])
    (tmp_path / "cpu-x" / ".test_a.json.0123456789ab.tmp").write_text("{")  # a dead writer's
    (tmp_path / "README.md").write_text("not a baseline")
    (tmp_path / ".git").mkdir()
    assert sorted(bl.load_dir(tmp_path)) == [("cpu-x", "test_a"), ("cpu-x@sdk2", "test_a")]
    with pytest.raises(FileNotFoundError, match="no such baselines directory"):
        bl.load_dir(tmp_path / "missing")


# --- prune -------------------------------------------------------------------------------------


def test_prune_dry_run_then_yes(tmp_path: Path) -> None:
    a = tmp_path / "cpu-x" / "test_a.json"
    gone = tmp_path / "cuda-y" / "test_a.json"
    do_update(a, [make_record(), make_record("test_old[n=1]")])
    bl.update(
        gone,
        [make_record("test_old[n=1]", device_key="cuda-y")],
        device={"key": "cuda-y"},
        suite="test_a",
        now="d",
    )
    live = {("test_a", KEY)}
    expected = [(a, "test_old[n=1]"), (gone, "test_old[n=1]")]

    before = a.read_bytes()
    assert bl.prune(tmp_path, live) == expected
    assert a.read_bytes() == before and gone.exists()

    assert bl.prune(tmp_path, live, dry_run=False) == expected
    assert list(bl.load(a).entries) == [KEY]
    assert not gone.exists()  # no entries left: the file goes
    assert bl.prune(tmp_path, live) == []


# --- git revisions -----------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    cmd += ["-c", "commit.gpgsign=false", "-C", str(repo), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_materialize_git_rev(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    path = repo / "baselines" / "cpu-x" / "test_a.json"
    do_update(path, [make_record(latency=0.1)])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "baseline")
    old_rev = _git(repo, "rev-parse", "HEAD")
    do_update(path, [make_record(latency=0.2)], reset=True)
    _git(repo, "commit", "-q", "-am", "new baseline")

    for rev in (old_rev, "HEAD~1"):
        out = bl.materialize_git_rev(rev, "baselines", repo, dest=tmp_path / f"out-{rev[:4]}")
        [(name, loaded)] = bl.load_dir(out).items()
        assert name == ("cpu-x", "test_a")
        assert loaded.runs(KEY)[0]["metrics"]["e2e_latency_s"]["median"] == 0.1

    # Default destination, absolute subdir; the working tree is untouched.
    out = bl.materialize_git_rev("HEAD", repo / "baselines", repo)
    assert (
        bl.load(out / "cpu-x" / "test_a.json").runs(KEY)[0]["metrics"]["e2e_latency_s"]["median"]
        == 0.2
    )
    assert _git(repo, "status", "--porcelain") == ""

    with pytest.raises(BaselineError, match="git:nope: unknown revision"):
        bl.materialize_git_rev("nope", "baselines", repo)
    with pytest.raises(BaselineError, match="git:--all: not a revision"):
        bl.materialize_git_rev("--all", "baselines", repo)
    with pytest.raises(BaselineError, match="has no files under elsewhere"):
        bl.materialize_git_rev("HEAD", "elsewhere", repo)
    not_repo = tmp_path / "plain"
    not_repo.mkdir()
    with pytest.raises(BaselineError, match="not a git repository"):
        bl.materialize_git_rev("HEAD", "baselines", not_repo)
