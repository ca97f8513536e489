"""Live progress: events only between rounds (the fake chip logs every sync and clock read, so
the order is exact), one terminal line redrawn and erased around pytest's own output, nothing
under -q or off a terminal, and events from worker and rank processes."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from fakes import COMPILE_S, DECODE_S, PREFILL_S, FakeBackend, FakeEngine, steady_e2e
from helpers import FAKE, GENERATE
from test_measure import Workload

from pytest_llmperf import engines
from pytest_llmperf.launchers import LaunchSettings
from pytest_llmperf.launchers.process import ProcessLauncher
from pytest_llmperf.launchers.torchrun import TorchrunLauncher, _forward
from pytest_llmperf.measure import run_rounds
from pytest_llmperf.progress import (
    ChildProgress,
    Progress,
    ProgressLine,
    describe,
    label,
    reporter,
)
from pytest_llmperf.spec import RecordContext, WorkloadSpec

# -- the timing loop reports between rounds only -------------------------------------------------


def run(backend: FakeBackend, events: list[Progress], draw_s: float = 0.0) -> Any:
    """Rounds of a 10-token workload whose progress callback logs ``progress`` among the chip's
    events and takes ``draw_s`` of device time (a slow terminal)."""

    def progress(event: Progress) -> None:
        events.append(event)
        backend.events.append("progress")
        if draw_s:
            backend.advance(draw_s, "draw")

    workload = Workload(backend)
    return run_rounds(
        backend,
        workload,
        rounds=3,
        warmup=2,
        new_tokens=10,
        count_new_tokens=lambda produced: produced,
        progress=progress,
        tokens_per_round=20,
    )


def test_progress_is_reported_before_the_warmup_and_after_each_round():
    events: list[Progress] = []
    run(FakeBackend(), events)
    round_s = steady_e2e(10)
    assert events == [
        Progress("warmup", 0, 2, tokens_per_round=20),
        Progress("rounds", 0, 3, tokens_per_round=20),
        Progress("rounds", 1, 3, round_s, 20),
        Progress("rounds", 2, 3, round_s, 20),
        Progress("rounds", 3, 3, round_s, 20),
    ]


def test_progress_never_falls_between_a_rounds_clock_reads():
    backend = FakeBackend()
    run(backend, [])
    events = backend.events
    found = [i for i, e in enumerate(events) if e == "progress"]
    assert len(found) == 5
    # Before the warm-up: ahead of its opening sync and clock read.
    assert events[found[0] + 1 : found[0] + 4] == ["sync", "clock", "call1"]
    for i in found[1:]:
        # Right after a closing clock read (the warm-up's, or a round's after its last
        # token's stamp) ...
        assert events[i - 2 : i] == ["sync", "clock"] and events[i - 3] == "clock"
        # ... and before the next round's opening sync and clock, or the end of the rounds.
        after = events[i + 1 : i + 4]
        assert after in (["reset_peak", "sync", "clock"], ["read_peak"]) or (
            after[:2] == ["sync", "clock"] and after[2].startswith("call")
        ), events[i - 3 : i + 4]


def test_a_slow_progress_callback_changes_no_number():
    quick, slow = FakeBackend(), FakeBackend()
    a, b = run(quick, []), run(slow, [], draw_s=1.0)
    assert slow.now > quick.now  # the draws did take device time ...
    assert (a.e2e, a.ttft, a.tpot, a.warmup_s) == (b.e2e, b.ttft, b.tpot, b.warmup_s)
    assert b.warmup_s == COMPILE_S + 2 * steady_e2e(10)  # ... outside every timed span
    assert b.ttft == [PREFILL_S] * 3 and b.tpot == [DECODE_S] * 3


# -- what the line says ---------------------------------------------------------------------------


SPEC = WorkloadSpec(kind="generate", model="tiny-bloom", dtype="bf16", batch_size=8)


def test_the_line_names_the_workload_the_round_and_the_live_rate():
    what = label(SPEC)
    assert what == "tiny-bloom transformers bf16 bs=8"
    assert (
        describe(what, Progress("rounds", 7, 10, last_s=0.5, tokens_per_round=617))
        == "llmperf: tiny-bloom transformers bf16 bs=8 · round 7/10 · 1,234 tokens/s"
    )
    assert describe(what, Progress("warmup", 0, 2)) == (
        "llmperf: tiny-bloom transformers bf16 bs=8 · warm-up (2 calls)"
    )
    child = Progress("load", pid=4242, elapsed_s=12.4)
    assert describe(what, child).endswith("· loading the model · child pid 4242, 12 s")
    # A timed callable generates no tokens: its last round's time instead.
    assert describe("test_fn:step", Progress("rounds", 3, 5, last_s=0.25)).endswith(
        "round 3/5 · last 250.0 ms"
    )


def test_labels_say_devices_and_kinds_that_are_not_the_usual():
    from dataclasses import replace

    assert label(replace(SPEC, devices=2, kind="forward")) == (
        "tiny-bloom transformers bf16 bs=8 devices=2 forward"
    )


@pytest.mark.parametrize(
    "data",
    [
        None,
        "junk",
        {"phase": "sleeping"},
        {"phase": "rounds", "done": "7"},
        {"phase": "rounds", "last_s": True},
    ],
)
def test_an_event_that_is_not_one_is_ignored(data):
    assert Progress.from_json(data) is None


def test_an_event_round_trips_through_json():
    event = Progress("rounds", 2, 10, 0.5, 100, pid=7, elapsed_s=3.0)
    assert Progress.from_json(json.loads(json.dumps(event.to_json()))) == event


# -- the terminal line ----------------------------------------------------------------------------


class Terminal:
    """What a TTY would receive, a clock the test moves, and pytest's current column."""

    def __init__(self, width: int = 60, column: int = 12) -> None:
        self.out: list[str] = []
        self.now = 0.0
        self.width = width
        self.column = column

    def line(self, **kwargs: Any) -> ProgressLine:
        return ProgressLine(
            self.out.append,
            width=lambda: self.width,
            column=lambda: self.column,
            clock=lambda: self.now,
            **kwargs,
        )


def test_the_line_opens_below_redraws_in_place_and_hands_the_cursor_back():
    term = Terminal()
    line = term.line()
    line.show("llmperf: round 1/10", key="rounds")
    term.now += 0.2
    line.show("llmperf: round 2/10", key="rounds")
    line.clear()
    assert term.out == [
        "\nllmperf: round 1/10\x1b[K",  # a line of its own below pytest's dots
        "\rllmperf: round 2/10\x1b[K",  # redrawn in place
        "\r\x1b[K\x1b[A\x1b[12C",  # erased; back up, after pytest's 12 columns
    ]
    line.clear()  # nothing drawn: nothing written
    assert len(term.out) == 3


def test_redraws_are_limited_to_ten_a_second_but_a_new_phase_shows_at_once():
    term = Terminal()
    line = term.line()
    for k in range(100):  # 100 rounds of 1 ms
        line.show(f"round {k}/100", key="rounds")
        term.now += 0.001
    assert len(term.out) == 1
    line.show("loading the next model", key="load")
    assert len(term.out) == 2
    term.now += 0.1
    line.show("round 1/10", key="rounds")
    assert len(term.out) == 3


def test_the_text_is_cut_to_one_terminal_line():
    term = Terminal(width=20, column=0)
    line = term.line()
    line.show("x" * 50)
    line.clear()
    assert term.out == ["\n" + "x" * 19 + "\x1b[K", "\r\x1b[K\x1b[A"]


def test_a_broken_terminal_stops_the_drawing_not_the_measurement():
    def broken(text: str) -> None:
        raise OSError("terminal went away")

    line = ProgressLine(broken, width=lambda: 80, column=lambda: 0)
    line.show("round 1/5")
    line.show("round 2/5", key="other")
    line.clear()
    assert line.failed


def test_a_workloads_events_draw_its_line():
    term = Terminal(width=120)
    report = reporter(term.line(), label(SPEC))
    report(Progress("rounds", 7, 10, 0.5, 617))
    assert term.out == [
        "\nllmperf: tiny-bloom transformers bf16 bs=8 · round 7/10 · 1,234 tokens/s\x1b[K"
    ]


# -- children --------------------------------------------------------------------------------------


def test_a_quiet_child_still_ticks_with_its_pid_and_run_time():
    now = [100.0]
    seen: list[Progress] = []
    watch = ChildProgress(seen.append, 4242, clock=lambda: now[0])
    now[0] += 0.5
    watch.tick()  # too soon
    now[0] += 0.5
    watch.tick()
    watch.receive({"phase": "rounds", "done": 1, "total": 5, "last_s": 0.5})
    watch.receive("junk")
    assert seen == [
        Progress("start", pid=4242, elapsed_s=0.0),
        Progress("start", pid=4242, elapsed_s=1.0),
        Progress("rounds", 1, 5, 0.5, pid=4242, elapsed_s=1.0),
    ]


@pytest.fixture
def fake() -> FakeBackend:
    engines.register(FakeEngine())
    return FakeBackend()


CONTEXT = RecordContext(key="test_gen", suite="test_s", device_key="fake-chip")
GEN = WorkloadSpec(
    kind="generate",
    model="tiny-bloom",
    engine="fake-engine",
    dtype="bf16",
    new_tokens=10,
    rounds=5,
    warmup=1,
)


def run_with_python(tmp_path, backend, script: str, seen: list[Progress]):
    """The process launcher with ``script`` standing in for Python (the worker)."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nread request\n{script}\n")
    python.chmod(0o755)
    launcher = ProcessLauncher(LaunchSettings(python=str(python), timeout=30))
    try:
        return launcher.run(GEN, CONTEXT, backend, progress=seen.append)
    finally:
        launcher.close()


EVENT = json.dumps({"progress": {"phase": "rounds", "done": 1, "total": 5, "last_s": 0.5}})


@pytest.mark.parametrize(
    "then, why",
    [
        ('echo \'{"error": "fake: kernel fault"}\'', "in the worker: fake: kernel fault"),
        ("kill -9 $$", "worker died with SIGKILL (signal 9)"),
        ("echo 'Segmentation fault'", "worker answered something other than JSON"),
        (f"echo '{EVENT}'", "worker exited (code 0) without replying"),
    ],
)
def test_a_child_that_reported_progress_and_then_failed_is_still_an_error(
    tmp_path, fake, then, why
):
    seen: list[Progress] = []
    record = run_with_python(tmp_path, fake, f"echo '{EVENT}'\n{then}", seen)
    assert record.outcome == "error"
    assert why in record.note
    assert [e.phase for e in seen][:2] == ["start", "rounds"] and seen[1].done == 1
    assert seen[1].pid is not None


@pytest.fixture
def children(project, monkeypatch):
    """Worker children import the fake chip from the pytester project's conftest."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(project.path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "conftest")
    return project


def test_a_worker_child_reports_its_rounds_to_the_parent(children, fake):
    seen: list[Progress] = []
    launcher = ProcessLauncher(LaunchSettings(timeout=120))
    try:
        record = launcher.run(GEN, CONTEXT, fake, progress=seen.append)
        pid = launcher._worker.proc.pid if launcher._worker else None
    finally:
        launcher.close()
    assert record.outcome == "ok", record.note
    # Ticks repeat the last event while the child is quiet (importing torch, loading).
    phases = list(dict.fromkeys((e.phase, e.done, e.total) for e in seen if e.phase != "start"))
    assert phases[:3] == [("load", 0, 0), ("warmup", 0, 1), ("rounds", 0, 5)]
    assert phases[-1] == ("rounds", 5, 5)
    assert {e.pid for e in seen} == {pid}
    assert seen[-1].tokens_per_round == 10 and seen[-1].last_s == steady_e2e(10)


def test_fresh_rounds_count_among_all_rounds(children, fake):
    from dataclasses import replace

    seen: list[Progress] = []
    launcher = ProcessLauncher(LaunchSettings(timeout=120))
    try:
        spec = replace(GEN, rounds=2, warmup=0, fresh="round")
        assert launcher.run(spec, CONTEXT, fake, progress=seen.append).outcome == "ok"
    finally:
        launcher.close()
    rounds = [(e.done, e.total) for e in seen if e.phase == "rounds"]
    # Each child announces its round before it starts (0 of 2, then 1 of 2) and after it.
    assert rounds[0] == (0, 2) and rounds[-1] == (2, 2) and (1, 2) in rounds
    assert len({e.pid for e in seen}) == 2  # a process per round


def test_rank_zeros_events_are_read_from_its_file_as_complete_lines(tmp_path):
    events = tmp_path / "progress"
    seen: list[Progress] = []
    watch = ChildProgress(seen.append, 99)
    line = json.dumps({"progress": {"phase": "rounds", "done": 1, "total": 3}})
    events.write_text(line + "\nnot json\n" + line[:10])
    read = _forward(events, 0, watch)
    assert read == len(line) + len("\nnot json\n")
    assert [(e.phase, e.done) for e in seen] == [("start", 0), ("rounds", 1)]
    assert _forward(tmp_path / "missing", 5, watch) == 5


def test_a_rank_group_reports_rank_zeros_rounds(children, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_DEVICES", "2")
    from dataclasses import replace

    seen: list[Progress] = []
    launcher = TorchrunLauncher(LaunchSettings(timeout=120, cache_dir=tmp_path))
    spec = replace(GEN, model="tiny-llama", devices=2)
    record = launcher.run(spec, CONTEXT, fake, progress=seen.append)
    assert record.outcome == "ok", record.note
    assert ("rounds", 5, 5) in [(e.phase, e.done, e.total) for e in seen]
    assert len({e.pid for e in seen}) == 1  # torchrun's pid: the group's


# -- the plugin draws it on a terminal ------------------------------------------------------------

FORCE_TTY = """
    import pytest

    @pytest.hookimpl(trylast=True)
    def pytest_configure(config):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        reporter.isatty = type(reporter.isatty)(True)  # pytest's callable bool
"""


def test_a_terminal_sees_the_line_and_pytests_output_stays_intact(project):
    project.makepyfile(test_gen=GENERATE, forcetty=FORCE_TTY)
    project.syspathinsert()
    result = project.runpytest(FAKE, "-p", "forcetty")
    result.assert_outcomes(passed=1)
    # (pytester splits lines at "\r" as well as "\n": the line's redraws are lines here.)
    out = result.stdout.str()
    drawn = out.index("test_gen.py \nllmperf: tiny-bloom fake-engine bf16 bs=1 · loading")
    # Erased, up to pytest's line, right after "test_gen.py " (12 columns): the dot follows.
    assert "\x1b[K\x1b[A\x1b[12C." in out[drawn:]
    result.stdout.re_match_lines([r"test_gen\s+fake\s+ok\s+.*no-baseline$"])


@pytest.mark.parametrize("args", [("-q",), ("-p", "no:forcetty"), ("-s",)])
def test_no_line_under_q_off_a_terminal_or_with_the_tests_output(project, args):
    project.makepyfile(test_gen=GENERATE, forcetty=FORCE_TTY)
    project.syspathinsert()
    plugin = () if "no:forcetty" in args else ("-p", "forcetty")
    result = project.runpytest(FAKE, *plugin, *args)
    result.assert_outcomes(passed=1)
    assert "llmperf: tiny-bloom" not in result.stdout.str()
    assert "\x1b[A" not in result.stdout.str()
