"""Per-token stamps from device events, without a sync per token (``measure.run_rounds``).

``AsyncChip`` is an asynchronous device in miniature, deterministic: launching a kernel costs
the host ``LAUNCH_S`` and returns, the device runs it after whatever is queued, an event marks
the moment the device gets past it, and ``synchronize()`` moves the host clock to the moment
the queue drains. Every time is a binary fraction, so sums are exact and compared with ``==``.

On it, a sync per token makes the device idle while the host launches the next step, so
sync-and-clock reports ``DECODE_S + LAUNCH_S`` per token; events report the device's own
``DECODE_S`` and leave e2e as the bare run's.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import pytest
import torch
from fakes import DECODE_S, PREFILL_S

from pytest_llmperf.backends.base import Backend, EventTimer, TorchDeviceBackend
from pytest_llmperf.backends.cpu import CpuBackend
from pytest_llmperf.backends.cuda import CudaBackend
from pytest_llmperf.backends.hpu import HpuBackend
from pytest_llmperf.backends.mps import MpsBackend
from pytest_llmperf.backends.neuron import NeuronBackend
from pytest_llmperf.backends.xpu import XpuBackend
from pytest_llmperf.execute import fill_timing
from pytest_llmperf.measure import EVENTS, SYNC_CLOCK, Timing, run_rounds
from pytest_llmperf.results import Record
from pytest_llmperf.spec import RecordContext

LAUNCH_S = 1 / 1024
NEW_TOKENS = 10


class AsyncEvents:
    """Events of the AsyncChip; refuses ``elapsed`` while any marker is unsynced, as a real
    timer's reading would be garbage (CUDA raises "not ready")."""

    def __init__(self, chip: AsyncChip) -> None:
        self.chip = chip
        self.unsynced = 0

    def record(self) -> float:
        self.chip.log.append("record")
        self.unsynced += 1
        # The device passes the marker once all work queued before it is done.
        return max(self.chip.device_free, self.chip.host)

    def elapsed(self, start: float, end: float) -> float:
        self.chip.log.append("elapsed")
        assert self.unsynced == 0, "an event was read before the sync that completes it"
        return end - start


class FakeMeter:
    """A cumulative joule counter: ``readings`` in order (None: unreadable at that read)."""

    def __init__(self, chip: AsyncChip, readings: list[Optional[float]]) -> None:
        self.chip = chip
        self.readings = list(readings)

    def read(self) -> Optional[float]:
        self.chip.log.append("energy")
        return self.readings.pop(0)

    def delta(self, start: float, end: float) -> Optional[float]:
        return end - start


class AsyncChip(Backend):
    name = "async-fake"

    def __init__(self, *, events: bool = True, meter: Optional[list[Optional[float]]] = None):
        self.host = 0.0
        self.device_free = 0.0
        self.log: list[str] = []
        self.timer: Optional[AsyncEvents] = AsyncEvents(self) if events else None
        self.meter = FakeMeter(self, meter) if meter is not None else None

    def clock(self) -> float:
        self.log.append("clock")
        return self.host

    def synchronize(self) -> None:
        self.log.append("sync")
        self.host = max(self.host, self.device_free)
        if self.timer is not None:
            self.timer.unsynced = 0

    def launch(self, seconds: float) -> None:
        self.log.append("kernel")
        self.host += LAUNCH_S
        self.device_free = max(self.device_free, self.host) + seconds

    def event_timer(self) -> Optional[EventTimer]:
        return self.timer

    def energy_meter(self) -> Any:
        return self.meter

    def host_load(self) -> Optional[float]:
        return 0.0

    def own_load(self, load: Optional[float]) -> Optional[float]:
        return 0.0


class Generate:
    """One kernel per token, enqueued without waiting (transformers 5.23's generate)."""

    def __init__(self, chip: AsyncChip) -> None:
        self.chip = chip
        self.hooks: list[Any] = []

    def __call__(self, hook: Optional[Callable[[], None]]) -> int:
        self.hooks.append(hook)
        self.chip.log.append("call")
        for i in range(NEW_TOKENS):
            self.chip.launch(PREFILL_S if i == 0 else DECODE_S)
            if hook is not None:
                hook()
        return NEW_TOKENS


def measure(chip: AsyncChip, *, rounds: int = 3, warmup: int = 1) -> tuple[Timing, Generate]:
    work = Generate(chip)
    timing = run_rounds(
        chip,
        work,
        rounds=rounds,
        warmup=warmup,
        new_tokens=NEW_TOKENS,
        count_new_tokens=lambda produced: produced,
    )
    return timing, work


def rounds_of(log: list[str]) -> list[list[str]]:
    """The log of each timed round: from the call to the closing sync (exclusive)."""
    out, current = [], None
    for entry in log:
        if entry == "call":
            current = []
            out.append(current)
        elif current is not None:
            if entry == "sync":
                current = None
            else:
                current.append(entry)
    return out


def test_events_stamp_every_token_without_a_sync_inside_the_round():
    chip = AsyncChip()
    timing, work = measure(chip)
    # Warm-up (first call) and rounds: one marker per kernel, and nothing waits in between.
    for inside in rounds_of(chip.log):
        assert inside == ["kernel", "record"] * NEW_TOKENS
    assert timing.method == EVENTS
    # The same hook path in warm-up and rounds (graph capture sees what is timed).
    assert len(set(map(id, work.hooks))) == 1 and work.hooks[0] is not None


def test_each_round_is_opened_and_closed_by_one_sync_and_resolved_after_it():
    chip = AsyncChip()
    measure(chip, rounds=2, warmup=0)
    timed = chip.log[chip.log.index("call") - 3 :]
    per_round = ["sync", "clock", "record", "call"] + ["kernel", "record"] * NEW_TOKENS
    per_round += ["sync", "clock"] + ["elapsed"] * NEW_TOKENS
    assert timed == per_round * 2


def test_event_stamps_report_the_device_step_and_keep_e2e_of_a_bare_run():
    chip = AsyncChip()
    timing, _ = measure(chip)
    bare_e2e = LAUNCH_S + PREFILL_S + (NEW_TOKENS - 1) * DECODE_S
    assert timing.e2e == [bare_e2e] * 3
    assert timing.ttft == [LAUNCH_S + PREFILL_S] * 3
    assert timing.tpot == [DECODE_S] * 3
    assert not timing.notes  # ttft + 9 tpot explains e2e exactly: no consistency note


def test_without_events_every_token_is_synced_and_the_stall_shows():
    chip = AsyncChip(events=False)
    timing, _ = measure(chip)
    # Each token: kernel, then a sync and a clock read (the round trip events avoid).
    last = len(chip.log) - 1 - chip.log[::-1].index("call")
    assert chip.log[last + 1 :] == ["kernel", "sync", "clock"] * NEW_TOKENS + ["sync", "clock"]
    assert "record" not in chip.log
    assert timing.method == SYNC_CLOCK
    assert timing.tpot == [DECODE_S + LAUNCH_S] * 3
    assert timing.e2e == [PREFILL_S + (NEW_TOKENS - 1) * DECODE_S + NEW_TOKENS * LAUNCH_S] * 3


def test_a_hook_that_misses_tokens_leaves_the_split_unmeasured_and_reads_no_events():
    chip = AsyncChip()

    def short(hook: Optional[Callable[[], None]]) -> int:
        chip.log.append("call")
        for i in range(NEW_TOKENS):
            chip.launch(DECODE_S)
            if hook is not None and i < 3:
                hook()
        return NEW_TOKENS

    timing = run_rounds(
        chip, short, rounds=2, warmup=0, new_tokens=NEW_TOKENS, count_new_tokens=lambda n: n
    )
    assert timing.ttft == [] and timing.tpot == []
    assert "fired 3 times for 10 tokens" in timing.notes[0]
    assert "elapsed" not in chip.log


def test_a_plain_callable_gets_no_events_and_is_timed_by_sync_and_clock():
    chip = AsyncChip()
    timing = run_rounds(chip, lambda hook: chip.launch(PREFILL_S), rounds=2, warmup=0)
    assert "record" not in chip.log
    assert timing.method == SYNC_CLOCK
    assert timing.e2e == [LAUNCH_S + PREFILL_S] * 2


def test_energy_is_read_outside_the_timed_span_once_per_round_end():
    chip = AsyncChip(meter=[100.0, 103.5, 200.0, None, 300.0, 301.25])
    timing, _ = measure(chip, rounds=3, warmup=1)
    opening = [i for i, e in enumerate(chip.log) if e == "energy"]
    assert len(opening) == 6
    for n, at in enumerate(opening):
        # Opening read: right after the sync, before t0's clock read. Closing read: right
        # after t1's clock read (which follows the closing sync).
        expected = ["sync"] if n % 2 == 0 else ["sync", "clock"]
        assert chip.log[at - len(expected) : at] == expected
        if n % 2 == 0:
            assert chip.log[at + 1] == "clock"
    # None at either read: that round has no figure, the others keep theirs.
    assert timing.energy_j == [3.5, None, 1.25]


def test_without_a_counter_no_energy_is_read_and_the_list_is_empty():
    chip = AsyncChip()
    timing, _ = measure(chip)
    assert "energy" not in chip.log
    assert timing.energy_j == []


@pytest.mark.parametrize("events", [True, False])
def test_the_record_says_which_method_timed_it(events):
    chip = AsyncChip(events=events)
    timing, _ = measure(chip)
    record = RecordContext(key="k", suite="s", device_key="async-fake").new_record(None, "async")
    fill_timing(record, timing, chip, tokens=NEW_TOKENS)
    back = Record.from_json(record.to_json())  # results.json
    assert back.provenance["timing_method"] == ("events" if events else "sync-clock")


# --- TorchDeviceBackend.event_timer on fake torch namespaces ---------------------------------


def fake_event_class(calls: list[tuple[Any, ...]], ms_per_tick: float = 1.5) -> type:
    """A ``torch.<ns>.Event`` stand-in that records how it is created, recorded and read."""

    class FakeEvent:
        created = 0

        def __init__(self, **kwargs: Any) -> None:
            FakeEvent.created += 1
            self.n = FakeEvent.created
            calls.append(("Event", kwargs))

        def record(self, *args: Any) -> None:
            calls.append(("record", self.n, args))

        def elapsed_time(self, end: FakeEvent) -> float:
            calls.append(("elapsed_time", self.n, end.n))
            return (end.n - self.n) * ms_per_tick

    return FakeEvent


class AccelBackend(TorchDeviceBackend):
    name = "accel-fake"
    namespace = "_llmperf_fake_accel"


def test_torch_device_event_timer_records_timing_events_and_converts_ms_to_seconds(monkeypatch):
    calls: list[tuple[Any, ...]] = []
    ns = types.SimpleNamespace(Event=fake_event_class(calls), synchronize=lambda: None)
    monkeypatch.setattr(torch, AccelBackend.namespace, ns, raising=False)
    timer = AccelBackend().event_timer()
    assert timer is not None
    a, b = timer.record(), timer.record()
    assert timer.elapsed(a, b) == pytest.approx(0.0015)
    assert calls == [
        ("Event", {"enable_timing": True}),
        ("record", 1, ()),
        ("Event", {"enable_timing": True}),
        ("record", 2, ()),
        ("elapsed_time", 1, 2),
    ]


def test_a_namespace_without_event_falls_back_to_sync_and_clock(monkeypatch):
    ns = types.SimpleNamespace(synchronize=lambda: None)
    monkeypatch.setattr(torch, AccelBackend.namespace, ns, raising=False)
    assert AccelBackend().event_timer() is None


@pytest.mark.parametrize(
    "backend, namespace", [(CudaBackend, "cuda"), (XpuBackend, "xpu"), (HpuBackend, "hpu")]
)
def test_cuda_xpu_and_hpu_time_tokens_with_their_torch_events(monkeypatch, backend, namespace):
    calls: list[tuple[Any, ...]] = []
    event = fake_event_class(calls)
    if hasattr(torch, namespace):
        monkeypatch.setattr(getattr(torch, namespace), "Event", event, raising=False)
    else:  # torch.hpu exists once habana_frameworks is imported
        monkeypatch.setattr(torch, namespace, types.SimpleNamespace(Event=event), raising=False)
    timer = backend().event_timer()
    assert timer is not None
    timer.elapsed(timer.record(), timer.record())
    assert [c[0] for c in calls] == ["Event", "record", "Event", "record", "elapsed_time"]
    assert calls[0] == ("Event", {"enable_timing": True})


@pytest.mark.parametrize("backend", [CpuBackend, MpsBackend, NeuronBackend])
def test_cpu_mps_and_neuron_have_no_event_timer(backend):
    assert backend().event_timer() is None
