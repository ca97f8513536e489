"""The timing loop (``measure.run_rounds``) driven directly with the fake chip.

The fake backend logs every ``sync``, ``clock`` read and memory call in order, and its clock
moves only when the workload advances it, so the order of events and every time are exact.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
from fakes import COMPILE_S, DECODE_S, PREFILL_S, FakeBackend, steady_e2e

from pytest_llmperf.measure import TokenCountError, run_rounds


class Workload:
    """A generate-like call: compile on the first call, then prefill + decode steps.

    Each call logs ``call<n>`` first, so tests can tell warm-up calls from timed ones.
    """

    def __init__(
        self,
        backend: FakeBackend,
        *,
        new_tokens: int = 10,
        hook_calls: Optional[int] = None,
        overhead_s: float = 0.0,
    ) -> None:
        self.backend = backend
        self.new_tokens = new_tokens
        self.hook_calls = new_tokens if hook_calls is None else hook_calls
        self.overhead_s = overhead_s
        self.calls = 0
        self.hooks: list[Any] = []

    def __call__(self, hook: Optional[Callable[[], None]]) -> int:
        self.calls += 1
        self.hooks.append(hook)
        self.backend.events.append(f"call{self.calls}")
        if self.calls == 1:
            self.backend.advance(COMPILE_S, "compile")
        for i in range(self.new_tokens):
            self.backend.advance(PREFILL_S if i == 0 else DECODE_S, "token")
            if hook is not None and i < self.hook_calls:
                hook()
        if self.overhead_s:
            self.backend.advance(self.overhead_s, "overhead")
        return self.new_tokens


def run(workload: Workload, *, rounds: int = 5, warmup: int = 2, **kwargs: Any) -> Any:
    kwargs.setdefault("new_tokens", workload.new_tokens)
    kwargs.setdefault("count_new_tokens", lambda produced: produced)
    return run_rounds(workload.backend, workload, rounds=rounds, warmup=warmup, **kwargs)


def test_every_clock_read_comes_right_after_a_device_sync():
    backend = FakeBackend()
    run(Workload(backend))
    events = backend.events
    reads = [i for i, event in enumerate(events) if event == "clock"]
    # start/end of warm-up, start/end of 5 rounds, and one stamp per token in every call
    assert len(reads) == 2 + 2 * 5 + 10 * (2 + 5)
    assert all(events[i - 1] == "sync" for i in reads)


def test_plain_callable_is_synced_too_and_gets_no_token_hook():
    backend = FakeBackend()
    workload = Workload(backend, new_tokens=3)
    timing = run_rounds(backend, workload, rounds=5, warmup=1)
    assert workload.hooks == [None] * 6
    reads = [i for i, event in enumerate(backend.events) if event == "clock"]
    assert len(reads) == 2 + 2 * 5
    assert all(backend.events[i - 1] == "sync" for i in reads)
    assert timing.ttft == [] and timing.tpot == []


def test_warmup_calls_are_not_in_the_samples():
    backend = FakeBackend()
    workload = Workload(backend, new_tokens=10)
    timing = run(workload, rounds=6, warmup=2)
    assert workload.calls == 8
    assert timing.e2e == [steady_e2e(10)] * 6
    assert timing.warmup_s == COMPILE_S + 2 * steady_e2e(10)


def test_without_warmup_the_first_round_pays_the_compile():
    backend = FakeBackend()
    timing = run(Workload(backend, new_tokens=10), rounds=5, warmup=0)
    assert timing.warmup_s == 0
    assert timing.e2e == [COMPILE_S + steady_e2e(10)] + [steady_e2e(10)] * 4


def test_peak_memory_is_reset_after_warmup_and_read_after_the_last_round():
    backend = FakeBackend()
    run(Workload(backend), rounds=5, warmup=2)
    events = backend.events
    assert events.count("reset_peak") == 1
    assert events.count("read_peak") == 1
    reset = events.index("reset_peak")
    assert events.index("call2") < reset < events.index("call3")
    assert events.index("call7") < events.index("read_peak")
    # nothing of the last round is left to run when the peak is read
    assert "token" not in events[events.index("read_peak") :]


def test_ttft_and_tpot_come_from_the_timed_rounds():
    backend = FakeBackend()
    timing = run(Workload(backend, new_tokens=10), rounds=5, warmup=1)
    assert timing.ttft == [PREFILL_S] * 5
    assert timing.tpot == [DECODE_S] * 5
    for e2e, ttft, tpot in zip(timing.e2e, timing.ttft, timing.tpot):
        assert ttft + 9 * tpot == pytest.approx(e2e, rel=0.02)
    assert timing.notes == []


def test_time_spent_outside_the_tokens_is_flagged():
    backend = FakeBackend()
    timing = run(Workload(backend, new_tokens=10, overhead_s=0.25), rounds=5, warmup=1)
    assert timing.e2e == [steady_e2e(10) + 0.25] * 5
    (note,) = timing.notes
    assert note.startswith("ttft + (new_tokens-1)*tpot differs from e2e by ")
    assert "time is spent outside token generation" in note


def test_small_overhead_within_two_percent_is_not_flagged():
    backend = FakeBackend()
    overhead = steady_e2e(10) * 0.01
    timing = run(Workload(backend, new_tokens=10, overhead_s=overhead), rounds=5, warmup=1)
    assert timing.notes == []


def test_token_hook_that_does_not_fire_once_per_token_leaves_ttft_unmeasured_with_a_note():
    backend = FakeBackend()
    timing = run(Workload(backend, new_tokens=10, hook_calls=0), rounds=5, warmup=1)
    assert timing.ttft == [] and timing.tpot == []
    assert timing.notes == [
        "the token hook fired 0 times for 10 tokens: ttft_s/tpot_s not measured"
    ]
    assert timing.e2e == [steady_e2e(10)] * 5


def test_wrong_token_count_raises_naming_both_numbers():
    backend = FakeBackend()
    with pytest.raises(
        TokenCountError, match="generate returned 9 new tokens but 10 were requested"
    ):
        run(Workload(backend, new_tokens=10), count_new_tokens=lambda produced: produced - 1)


def test_rounds_count_is_exact():
    backend = FakeBackend()
    workload = Workload(backend, new_tokens=4)
    timing = run(workload, rounds=13, warmup=3)
    assert len(timing.e2e) == 13
    assert workload.calls == 16
    assert timing.output == 4
