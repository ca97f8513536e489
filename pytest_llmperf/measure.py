"""The timing loop: warm-up outside the rounds, a device sync before every clock read.

Per-token stamps (TTFT, TPOT) come from device events where the backend has them: one marker
recorded per forward without waiting, resolved after the round's closing sync, so an
asynchronous device is never stalled mid-round (transformers' generate no longer syncs per
decode step; a sync per token would put that stall back). Without events each token is
stamped by a sync and a host clock read, which on an asynchronous device is the only way a
host clock marks completion rather than kernel launch. ``Timing.method`` says which.

Kept free of pytest and torch so it can be tested with a fake backend and a fake clock, and
reused by ``llmperf.generate`` and ``llmperf.measure`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .backends.base import Backend, EventTimer
from .progress import Progress, ProgressFn, notify

#: ttft + (new_tokens − 1) · tpot must explain e2e within this fraction; otherwise time is
#: spent outside token generation (tokenization, a host copy) and the split is flagged.
CONSISTENCY_TOLERANCE = 0.02

TokenHook = Callable[[], None]

#: Timing.method: per-token device events resolved after the round's closing sync.
EVENTS = "events"
#: Timing.method: a sync and a host clock read per token (and every run without token stamps:
#: its e2e is sync-to-sync host clock either way).
SYNC_CLOCK = "sync-clock"


class TokenCountError(AssertionError):
    """generate() produced a different number of tokens than the benchmark claims."""


@dataclass
class Timing:
    warmup_s: float
    e2e: list[float]
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    peak_memory_bytes: Optional[int] = None
    output: Any = None
    notes: list[str] = field(default_factory=list)
    #: How ttft/tpot were stamped: EVENTS or SYNC_CLOCK (the record's
    #: ``provenance["timing_method"]``: a change of method restarts a baseline's history).
    method: str = SYNC_CLOCK
    #: Joules of each round from the backend's energy counter (None: that round's reads gave
    #: no trustworthy delta); empty where the backend has no counter.
    energy_j: list[Optional[float]] = field(default_factory=list)


def _stamp(backend: Backend, into: list[Any]) -> TokenHook:
    def hook() -> None:
        backend.synchronize()
        into.append(backend.clock())

    return hook


def _mark(timer: EventTimer, into: list[Any]) -> TokenHook:
    """One device marker per token, never a sync: the host runs ahead as it would unmeasured."""
    record, append = timer.record, into.append

    def hook() -> None:
        append(record())

    return hook


def _check_tokens(
    index: int, out: Any, new_tokens: int, count: Optional[Callable[[Any], Optional[int]]]
) -> None:
    produced = count(out) if count is not None else None
    if produced is not None and produced != new_tokens:
        raise TokenCountError(
            f"round {index + 1}: generate returned {produced} new tokens but "
            f"{new_tokens} were requested; the per-token metrics would be wrong"
        )


def _token_times(
    timing: Timing, index: int, t0: float, stamps: list[float], new_tokens: int
) -> None:
    if len(stamps) == new_tokens:
        timing.ttft.append(stamps[0] - t0)
        timing.tpot.append((stamps[-1] - stamps[0]) / (new_tokens - 1) if new_tokens > 1 else 0.0)
    elif index == 0:
        timing.notes.append(
            f"the token hook fired {len(stamps)} times for {new_tokens} tokens: "
            "ttft_s/tpot_s not measured"
        )


def _check_consistency(timing: Timing, new_tokens: int) -> None:
    worst = max(
        (
            abs(e - (f + (new_tokens - 1) * p)) / e
            for e, f, p in zip(timing.e2e, timing.ttft, timing.tpot)
            if e > 0
        ),
        default=0.0,
    )
    if worst > CONSISTENCY_TOLERANCE:
        timing.notes.append(
            f"ttft + (new_tokens-1)*tpot differs from e2e by {worst:.1%} "
            f"(> {CONSISTENCY_TOLERANCE:.0%}): time is spent outside token generation"
        )


def run_rounds(
    backend: Backend,
    call: Callable[[Optional[TokenHook]], Any],
    *,
    rounds: int,
    warmup: int,
    new_tokens: Optional[int] = None,
    count_new_tokens: Optional[Callable[[Any], Optional[int]]] = None,
    token_times: bool = True,
    progress: Optional[ProgressFn] = None,
    tokens_per_round: Optional[int] = None,
) -> Timing:
    """Run ``warmup`` untimed calls, then ``rounds`` timed ones.

    ``call(hook)`` performs one workload; for generation it calls ``hook`` once per new token
    (from a stopping criterion) so TTFT and TPOT come from the very rounds that give e2e,
    not from a separate prefill-only run whose caches differ. ``hook`` is None for plain
    callables, and with ``token_times=False`` (a round of many generate calls: the tokens are
    counted, not stamped). Warm-up calls get a hook too, so graph capture sees the same code
    path.

    ``progress`` hears where the loop stands (``tokens_per_round`` lets it show tokens/s):
    before the warm-up, then after each round's closing clock read and before the next
    round's first sync, never inside a timed span (warm-up included), so drawing a progress
    line costs the rounds nothing.

    With the backend's event timer a round is: sync, clock (t0), start marker, the call (one
    marker per token, no sync), sync, clock (t1); then ttft and tpot are resolved from the
    markers. e2e is t1 - t0 in both methods. The energy counter, where there is one, is read
    after the opening sync and after the closing clock read: outside [t0, t1], so a slow
    counter read (NVML, a sysfs file) costs no round anything, and with the device idle at
    both reads the energy window adds only idle time to the timed span.
    """
    stamps: list[Any] = []
    stamping = new_tokens is not None and token_times
    timer = backend.event_timer() if stamping else None
    hook: Optional[TokenHook] = None
    if stamping:
        hook = _mark(timer, stamps) if timer is not None else _stamp(backend, stamps)
    meter = backend.energy_meter()

    if warmup:
        notify(progress, Progress("warmup", 0, warmup, tokens_per_round=tokens_per_round))
    backend.synchronize()
    start = backend.clock()
    for _ in range(warmup):
        call(hook)
    backend.synchronize()
    warmup_s = backend.clock() - start

    notify(progress, Progress("rounds", 0, rounds, tokens_per_round=tokens_per_round))
    backend.reset_peak_memory()
    timing = Timing(warmup_s=warmup_s, e2e=[], method=SYNC_CLOCK if timer is None else EVENTS)
    for index in range(rounds):
        stamps.clear()
        backend.synchronize()
        joules_before = meter.read() if meter is not None else None
        t0 = backend.clock()
        start_mark = timer.record() if timer is not None else None
        out = call(hook)
        backend.synchronize()
        t1 = backend.clock()
        if meter is not None:
            joules_after = meter.read()
            timing.energy_j.append(
                None
                if joules_before is None or joules_after is None
                else meter.delta(joules_before, joules_after)
            )
        timing.e2e.append(t1 - t0)
        timing.output = out
        if new_tokens is not None:
            _check_tokens(index, out, new_tokens, count_new_tokens)
            if timer is not None and len(stamps) == new_tokens:
                # After the closing sync every marker has its device time: offsets from the
                # start marker, which the device passed right after t0 (it was idle).
                offsets = [timer.elapsed(start_mark, mark) for mark in stamps]
                _token_times(timing, index, 0.0, offsets, new_tokens)
            elif token_times:
                _token_times(timing, index, t0, stamps, new_tokens)
        notify(progress, Progress("rounds", index + 1, rounds, t1 - t0, tokens_per_round))
    timing.peak_memory_bytes = backend.peak_memory_bytes()
    if timing.ttft and new_tokens:
        _check_consistency(timing, new_tokens)
    return timing
