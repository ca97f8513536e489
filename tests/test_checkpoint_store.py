"""The checkpoint cache: written once and reused, killed writes never reused, LRU eviction under
``--llmperf-cache-size``, refusals with the numbers, ``llmperf cache show/prune``.

Most tests fake ``save_seeded`` with a writer of the same layout (a temp folder renamed into
place, the marker, ``weight_bytes`` of data), so sizes are exact and nothing loads torch; the
reuse test writes real tiny-llama weights. Times are set with ``os.utime``, never waited for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FAKE, one_line_error

from pytest_llmperf import cli, models
from pytest_llmperf.launchers import LaunchSettings
from pytest_llmperf.models import store as store_mod
from pytest_llmperf.models import weights
from pytest_llmperf.models.store import CheckpointStore, seeded_bytes
from pytest_llmperf.settings import DEFAULT_CACHE_SIZE, SettingError, parse_size, resolve
from pytest_llmperf.state import RunState
from pytest_llmperf.units import format_value

LLAMA = models.get("tiny-llama")
DAY = 86400.0
OLD = time.time() - 30 * DAY


@pytest.fixture(autouse=True)
def _unpin_afterwards(tmp_path: Path) -> Any:
    """Pins are per process: a test's must not outlive it (nor keep its descriptors open)."""
    yield
    root = os.path.realpath(tmp_path)
    for key in [k for k in store_mod._PINNED if k.startswith(root)]:
        store_mod._unpin(Path(key))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Fake ``save_seeded``: the real one's layout and atomicity, ``weight_bytes`` of data."""
    done: list[Path] = []

    def save(spec: Any, dtype: str, seed: int, cache_dir: Path) -> Path:
        target = weights.seeded_dir(cache_dir, spec, dtype, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        (tmp / "model.safetensors").write_bytes(b"\0" * spec.weight_bytes(dtype))
        marker = {"weight_source": f"seed:{seed}"}
        (tmp / weights.SEEDED_MARKER).write_text(json.dumps(marker))
        tmp.rename(target)
        done.append(target)
        return target

    monkeypatch.setattr(weights, "save_seeded", save)
    return done


def size_of(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def used(directory: Path, when: float) -> None:
    """Say ``directory`` was last used at ``when`` (its marker's mtime)."""
    os.utime(directory / weights.SEEDED_MARKER, (when, when))


def written(store: CheckpointStore, seed: int, when: float) -> Path:
    """A seeded tiny-llama checkpoint last used at ``when``, not pinned by this process."""
    directory, _ = store.checkpoint(LLAMA, "fp32", seed)
    store.unpin(directory)
    used(directory, when)
    return directory


# -- written once, reused ----------------------------------------------------------------------


def test_a_second_call_returns_the_same_directory_without_writing(tmp_path, monkeypatch):
    calls = []
    real = weights.save_seeded
    monkeypatch.setattr(weights, "save_seeded", lambda *a: calls.append(a) or real(*a))
    store = CheckpointStore(tmp_path)
    directory, source = store.checkpoint(LLAMA, "fp32", 0)
    assert source == "seed:0" and len(calls) == 1
    assert (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))
    used(directory, OLD)

    again, source_again = CheckpointStore(tmp_path).checkpoint(LLAMA, "fp32", 0)

    assert (again, source_again) == (directory, source)
    assert len(calls) == 1
    # A hit counts as a use: the least recently used checkpoint is evicted first.
    assert (directory / weights.SEEDED_MARKER).stat().st_mtime > OLD + DAY


def test_a_killed_write_is_never_reused(tmp_path, writes):
    # What a writer killed before its rename leaves: a complete-looking hidden folder.
    target = weights.seeded_dir(tmp_path, LLAMA, "fp32", 0)
    partial = target.with_name(f".{target.name}.k1ll3d")
    partial.mkdir(parents=True)
    (partial / weights.SEEDED_MARKER).write_text('{"weight_source": "seed:0"}')
    (partial / "model.safetensors").write_bytes(b"\0" * 100)

    directory, _ = CheckpointStore(tmp_path).checkpoint(LLAMA, "fp32", 0)

    assert directory == target and writes == [target]
    # The writer holds the cache's lock, so the partial write was a dead writer's: removed.
    assert not partial.exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_folder_at_the_checkpoint_name_without_its_marker_is_rewritten(tmp_path, writes):
    target = weights.seeded_dir(tmp_path, LLAMA, "fp32", 0)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")

    directory, _ = CheckpointStore(tmp_path).checkpoint(LLAMA, "fp32", 0)

    assert directory == target and writes == [target]
    assert (target / weights.SEEDED_MARKER).is_file()


def test_two_processes_writing_one_checkpoint_at_once_write_it_once(tmp_path):
    log = tmp_path / "writes.log"
    script = textwrap.dedent(
        f"""
        import os, sys, tempfile
        from pathlib import Path
        from pytest_llmperf import models
        from pytest_llmperf.models import weights
        from pytest_llmperf.models.store import CheckpointStore

        real_seeded_dir = weights.seeded_dir

        def save(spec, dtype, seed, cache_dir):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            target = real_seeded_dir(cache_dir, spec, dtype, seed)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{{target.name}}.", dir=target.parent))
            (tmp / "model.safetensors").write_bytes(os.urandom(8 << 20))
            (tmp / weights.SEEDED_MARKER).write_text('{{"weight_source": "seed:0"}}')
            tmp.rename(target)
            return target

        weights.save_seeded = save
        sys.stdin.readline()  # both start together
        path, source = CheckpointStore(Path(sys.argv[1])).checkpoint(
            models.get("tiny-llama"), "fp32", 0
        )
        print(path, source, flush=True)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "cache")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]

    target = weights.seeded_dir(tmp_path / "cache", LLAMA, "fp32", 0)
    assert outputs == [f"{target} seed:0"] * 2
    assert len(log.read_text().split()) == 1  # the second waited for the lock, then reused it
    assert [p.name for p in target.parent.iterdir()] == [target.name]


# -- the cap -----------------------------------------------------------------------------------


def test_the_least_recently_used_checkpoint_is_evicted_to_stay_under_the_cap(tmp_path, writes):
    store = CheckpointStore(tmp_path, max_bytes=None)
    oldest = written(store, 0, OLD)
    newer = written(store, 1, OLD + DAY)
    size = size_of(oldest)
    # Room for the two and the next one's need, less one byte: one must go, the older.
    store.max_bytes = 2 * size + seeded_bytes(LLAMA, "fp32") - 1

    third, _ = store.checkpoint(LLAMA, "fp32", 2)

    assert not oldest.exists()
    assert newer.exists() and third.exists()
    assert sorted(e.path for e in store.entries()) == sorted([newer, third])


def test_a_hit_makes_a_checkpoint_recently_used(tmp_path, writes):
    store = CheckpointStore(tmp_path, max_bytes=None)
    first = written(store, 0, OLD)
    second = written(store, 1, OLD + DAY)
    store.unpin(store.checkpoint(LLAMA, "fp32", 0)[0])  # a hit: now the newest
    store.max_bytes = 2 * size_of(first) + seeded_bytes(LLAMA, "fp32") - 1

    store.checkpoint(LLAMA, "fp32", 2)

    assert first.exists() and not second.exists()


def test_an_older_generators_checkpoint_is_evicted_before_a_current_one(tmp_path, writes):
    store = CheckpointStore(tmp_path, max_bytes=None)
    current = written(store, 0, OLD)
    stale = current.with_name(current.name.replace("-g1", "-g0"))
    stale.mkdir()
    (stale / weights.SEEDED_MARKER).write_text("{}")
    (stale / "model.safetensors").write_bytes(b"\0" * size_of(current))
    used(stale, time.time())
    store.max_bytes = 2 * size_of(current) + seeded_bytes(LLAMA, "fp32") - 1

    store.checkpoint(LLAMA, "fp32", 1)

    assert current.exists() and not stale.exists()


def test_a_checkpoint_this_process_uses_is_never_evicted(tmp_path, writes):
    store = CheckpointStore(tmp_path, max_bytes=None)
    pinned, _ = store.checkpoint(LLAMA, "fp32", 0)  # still pinned: a model loaded from it
    used(pinned, OLD)
    size, need = size_of(pinned), seeded_bytes(LLAMA, "fp32")
    store.max_bytes = size + need - 1

    with pytest.raises(OSError) as refused:
        store.checkpoint(LLAMA, "fp32", 1)

    message = str(refused.value)
    assert "\n" not in message
    assert f"needs {format_value(need, 'B')}" in message
    assert f"holds {format_value(size, 'B')} of its {format_value(size + need - 1, 'B')} cap" in (
        message
    )
    assert f"in use: {pinned.name}" in message
    assert "--llmperf-cache-size" in message
    assert pinned.exists() and len(writes) == 1

    store.unpin(pinned)  # the model was dropped: now it may go
    store.checkpoint(LLAMA, "fp32", 1)
    assert not pinned.exists()


def test_a_checkpoint_another_process_uses_is_never_evicted_nor_pruned(tmp_path, writes, capsys):
    store = CheckpointStore(tmp_path, max_bytes=None)
    theirs = written(store, 0, OLD)
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from pytest_llmperf import models
        from pytest_llmperf.models.store import CheckpointStore

        CheckpointStore(Path(sys.argv[1])).checkpoint(models.get("tiny-llama"), "fp32", 0)
        print("pinned", flush=True)
        sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "pinned\n"
        used(theirs, OLD)  # its hit touched the marker
        store.max_bytes = size_of(theirs) + seeded_bytes(LLAMA, "fp32") - 1
        with pytest.raises(OSError, match="in use: tiny-llama-fp32-seed0-g1"):
            store.checkpoint(LLAMA, "fp32", 1)
        assert cli.main(["cache", "prune", "--all", "--cache-dir", str(tmp_path)]) == 0
        assert "kept: seeded weights/tiny-llama-fp32-seed0-g1 (in use)" in capsys.readouterr().out
        assert theirs.exists()
    finally:
        proc.communicate("done\n", timeout=60)
    # The kernel dropped its lock with the process.
    assert cli.main(["cache", "prune", "--all", "--cache-dir", str(tmp_path)]) == 0
    assert not theirs.exists()


def test_a_checkpoint_bigger_than_the_cap_is_refused_with_the_numbers(tmp_path, writes):
    store = CheckpointStore(tmp_path, max_bytes=None)
    kept = written(store, 0, OLD)
    need = seeded_bytes(LLAMA, "fp32")
    store.max_bytes = need - 1

    with pytest.raises(OSError) as refused:
        store.checkpoint(LLAMA, "fp32", 1)

    assert str(refused.value) == (
        f"tiny-llama fp32: its seeded checkpoint needs {format_value(need, 'B')}, more than the "
        f"whole checkpoint cache may hold ({format_value(need - 1, 'B')}, --llmperf-cache-size); "
        "raise --llmperf-cache-size, or put the real checkpoint in the Hugging Face cache"
    )
    assert kept.exists() and len(writes) == 1  # nothing evicted for a write that cannot happen


def test_a_full_disk_evicts_what_it_must_or_refuses_without_evicting(tmp_path, writes, monkeypatch):
    store = CheckpointStore(tmp_path, max_bytes=None)
    old = written(store, 0, OLD)
    need = seeded_bytes(LLAMA, "fp32")
    real = store_mod.shutil.disk_usage

    def disk(free: int) -> None:
        monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=free))

    disk(need - size_of(old) - 1)  # not even evicting everything makes room
    with pytest.raises(OSError) as refused:
        store.checkpoint(LLAMA, "fp32", 1)
    message = str(refused.value)
    assert f"needs {format_value(need, 'B')} on disk" in message
    assert f"{format_value(need - size_of(old) - 1, 'B')} free in {tmp_path / 'weights'}" in message
    assert f"frees only {format_value(size_of(old), 'B')}" in message
    assert "--llmperf-cache-dir" in message and old.exists()

    disk(need - 1)  # under the cap, but the disk needs the old checkpoint's room
    store.checkpoint(LLAMA, "fp32", 1)
    assert not old.exists()


# -- llmperf cache show / prune ------------------------------------------------------------------


def populated(tmp_path: Path) -> dict[str, Path]:
    """A cache with an old and a recent seeded checkpoint, a killed write and a dead scratch
    folder (none pinned)."""
    store = CheckpointStore(tmp_path)
    old = written(store, 0, OLD)
    recent = written(store, 1, time.time() - 60)
    partial = old.with_name(f".{old.name}.k1ll3d")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 2048)
    scratch = store.scratch("accelerate-offload")
    (scratch / "layer.0.dat").write_bytes(b"\0" * 4096)
    store_mod._unpin(scratch)  # as if its process had died
    return {"old": old, "recent": recent, "partial": partial, "scratch": scratch}


def test_show_lists_the_root_cap_total_and_entries(tmp_path, writes, capsys, monkeypatch):
    monkeypatch.setenv("LLMPERF_CACHE_SIZE", "2GiB")
    paths = populated(tmp_path)
    store = CheckpointStore(tmp_path)
    store.checkpoint(LLAMA, "fp32", 1)  # pinned by this process: shown in use
    total = sum(size_of(p) for p in paths.values())

    assert cli.main(["cache", "show", "--cache-dir", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert f"cache: {tmp_path}\n" in out
    assert "cap: 2.00 GiB (env LLMPERF_CACHE_SIZE;" in out
    assert f"total: {format_value(total, 'B')} in 4 entries" in out
    assert "4.0 KiB of scratch folders" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == ["model", "dtype", "seed", "size", "last", "used", "kind"]
    rows = [line.split(None, 5) for line in lines[header + 2 : header + 6]]
    size = format_value(size_of(paths["old"]), "B")
    assert rows[0][:3] == ["tiny-llama", "fp32", "1"] and rows[0][5].endswith("seeded, in use")
    assert rows[1][:3] == ["tiny-llama", "fp32", "0"] and rows[1][5].endswith("seeded")
    assert f"{size}  {time.strftime('%Y-%m-%d', time.gmtime(OLD))}" in lines[header + 3]
    assert rows[2][:3] == ["tiny-llama", "fp32", "0"] and rows[2][5].endswith("partial write")
    assert rows[3][0] == "accelerate-offload" and rows[3][5].endswith("scratch")


def test_show_of_a_cache_not_written_yet(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMPERF_CACHE_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("LLMPERF_CACHE_SIZE", raising=False)
    assert cli.main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {tmp_path / 'none'}\n" in out
    assert f"cap: {format_value(DEFAULT_CACHE_SIZE, 'B')} (default;" in out
    assert "nothing cached (the directory does not exist)" in out


def test_prune_removes_partial_writes_and_scratch_and_keeps_seeded(tmp_path, writes, capsys):
    paths = populated(tmp_path)
    freed = size_of(paths["partial"]) + size_of(paths["scratch"])

    assert cli.main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"removed: partial write weights/{paths['partial'].name} (2.0 KiB")
    assert out[1].startswith(f"removed: scratch scratch/{paths['scratch'].name} (4.0 KiB")
    assert out[2] == f"removed 2 entries, freed {format_value(freed, 'B')} under {tmp_path}"
    assert not paths["partial"].exists() and not paths["scratch"].exists()
    assert paths["old"].exists() and paths["recent"].exists()


def test_prune_older_than_removes_only_checkpoints_unused_for_that_long(tmp_path, writes, capsys):
    paths = populated(tmp_path)
    assert cli.main(["cache", "prune", "--older-than", "7d", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"removed: seeded weights/{paths['old'].name}" in out
    assert not paths["old"].exists() and paths["recent"].exists()
    assert "removed 3 entries" in out


def test_prune_dry_run_lists_and_removes_nothing_and_all_removes_every_seeded(
    tmp_path, writes, capsys
):
    paths = populated(tmp_path)
    total = sum(size_of(p) for p in paths.values())

    assert cli.main(["cache", "prune", "--all", "--dry-run", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove: ") == 4
    assert f"would remove 4 entries, freeing {format_value(total, 'B')}" in out
    assert all(p.exists() for p in paths.values())

    assert cli.main(["cache", "prune", "--all", "--cache-dir", str(tmp_path)]) == 0
    assert f"removed 4 entries, freed {format_value(total, 'B')}" in capsys.readouterr().out
    assert CheckpointStore(tmp_path).entries() == []

    assert cli.main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"nothing to prune under {tmp_path}\n"


def test_prune_keeps_a_scratch_folder_in_use(tmp_path, capsys):
    folder = CheckpointStore(tmp_path).scratch("offload")
    assert cli.main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert f"kept: scratch scratch/{folder.name} (in use)" in capsys.readouterr().out
    assert folder.is_dir()
    CheckpointStore.release(folder)
    assert not folder.exists()


def test_prune_keeps_partial_writes_while_a_write_is_in_progress(tmp_path, writes, capsys):
    import filelock

    partial = populated(tmp_path)["partial"]
    with filelock.FileLock(str(tmp_path / store_mod.LOCK_NAME)):
        assert cli.main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"kept: partial write weights/{partial.name} (a write is in progress)" in out
    assert partial.exists()


# -- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("50GiB", 50 * 2**30),
        ("500MB", 500 * 10**6),
        ("1073741824", 2**30),
        ("1.5 TiB", int(1.5 * 2**40)),
        ("64kib", 64 * 1024),
        ("unlimited", None),
    ],
)
def test_sizes_are_read_with_their_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "50G", "-5GiB", "0", "0.1", "5 GiBs", "1e9"])
def test_a_bad_cache_size_names_its_source(text):
    for cli_values, environ, source in (
        ({"cache_size": text}, {}, f"--llmperf-cache-size={text}"),
        ({}, {"LLMPERF_CACHE_SIZE": text}, f"env LLMPERF_CACHE_SIZE={text}"),
    ):
        with pytest.raises(SettingError) as bad:
            resolve(cli=cli_values.get, ini=lambda key: "", inifile=None, environ=environ)
        assert str(bad.value).startswith(f"{source}: expected a size"), bad.value


def test_a_bad_cache_size_in_the_ini_file_is_one_line_naming_it(project):
    project.makeini("[pytest]\nllmperf_cache_size = lots\n")
    result = project.runpytest(FAKE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = one_line_error(result)
    assert "ini llmperf_cache_size=lots in " in line and "expected a size" in line, line


def test_the_cap_reaches_the_store_and_the_children(tmp_path):
    settings = resolve(
        cli={"cache_size": "3GiB", "cache_dir": str(tmp_path)}.get,
        ini=lambda key: "",
        inifile=None,
        environ={},
    )
    run = RunState.create(settings, rootdir=tmp_path)
    assert run.launchers.cache.store.max_bytes == 3 * 2**30
    assert run.launchers.cache.store.root == tmp_path
    env = run.launchers.settings.child_env()
    assert env["LLMPERF_CACHE_SIZE"] == str(3 * 2**30)
    assert env["LLMPERF_CACHE_DIR"] == str(tmp_path)
    assert CheckpointStore(max_bytes=store_mod.FROM_ENV).max_bytes is not None
    unlimited = LaunchSettings(cache_dir=tmp_path, cache_size=None).child_env()
    assert unlimited["LLMPERF_CACHE_SIZE"] == "unlimited"
    assert resolve(cli=lambda n: None, ini=lambda k: "", inifile=None, environ={}).cache_size == (
        DEFAULT_CACHE_SIZE
    )


def test_a_child_reads_the_cap_from_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPERF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMPERF_CACHE_SIZE", "unlimited")
    assert CheckpointStore().max_bytes is None and CheckpointStore().root == tmp_path
    monkeypatch.setenv("LLMPERF_CACHE_SIZE", "12MiB")
    assert CheckpointStore().max_bytes == 12 * 2**20
    monkeypatch.setenv("LLMPERF_CACHE_SIZE", "12M")
    with pytest.raises(SettingError, match="^env LLMPERF_CACHE_SIZE=12M: expected a size"):
        CheckpointStore()


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--older-than", "7x"], "argument --older-than: '7x': expected an age such as 7d"),
        (["--older-than", "7"], "argument --older-than: '7': expected an age"),
        (["--older-than", "7d", "--all"], "argument --all: not allowed with argument --older-than"),
        (["--cache-dir", ""], "argument --cache-dir: '': expected a directory path"),
        (["--yes"], "unrecognized arguments: --yes"),
    ],
)
def test_bad_prune_arguments_are_argparse_errors(argv, problem, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["cache", "prune", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("usage: llmperf")
    line = err.splitlines()[-1]
    assert line.startswith("llmperf") and f": error: {problem}" in line, err


def test_a_cache_dir_that_is_a_file_or_a_bad_env_cap_is_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("")
    assert cli.main(["cache", "show", "--cache-dir", str(afile)]) == 2
    assert (
        capsys.readouterr().err
        == f"llmperf: error: {afile}: not a directory (--cache-dir, or env LLMPERF_CACHE_DIR)\n"
    )
    monkeypatch.setenv("LLMPERF_CACHE_SIZE", "huge")
    assert cli.main(["cache", "show", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmperf: error: env LLMPERF_CACHE_SIZE=huge: expected a size")
    assert err.count("\n") == 1
