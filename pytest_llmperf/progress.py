"""Live progress: what is being measured now, on one updating terminal line.

A long run (a 176B model loading for minutes, ten rounds of a minute each) should say what it
is doing: ``llmperf: bloom-560m transformers bf16 bs=8 · round 7/10 · 1,234 tokens/s``.

Events (:class:`Progress`) are data: the timing loop emits them between rounds only (after a
round's last clock read, before the next round's first, see ``measure.run_rounds``), so drawing
never falls inside a timed span; a worker child sends the same events over its reply channel
and the launcher hands them on with the child's pid and the time it has run. What turns events
into a line (:func:`reporter`) and draws it (:class:`ProgressLine`) is plain code with the
terminal given as functions; the plugin supplies pytest's terminal, on a TTY only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .spec import WorkloadSpec

#: What a workload is doing: handed to a launcher (nothing known yet), loading its model,
#: warming up, timing rounds.
PHASES = ("start", "load", "warmup", "rounds")
#: Redraws of one phase at most this often (a 100-round workload of 1 ms rounds would otherwise
#: write 100 lines a second); a new phase or workload is drawn at once.
MIN_INTERVAL_S = 0.1
#: While a child is quiet (importing torch, loading a model), its line still ticks this often.
TICK_S = 1.0


@dataclass(frozen=True)
class Progress:
    phase: str
    #: Rounds (or warm-up calls) done, and how many there are.
    done: int = 0
    total: int = 0
    #: Seconds of the last round (None before the first).
    last_s: Optional[float] = None
    #: New tokens one round generates (None: a kind or callable that generates none).
    tokens_per_round: Optional[int] = None
    #: Set by the parent for a workload in a child process.
    pid: Optional[int] = None
    elapsed_s: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> Optional[Progress]:
        """An event a child sent; None for anything malformed (progress is never worth an
        error: the child's reply decides the record)."""
        if not isinstance(data, dict) or data.get("phase") not in PHASES:
            return None
        values: dict[str, Any] = {
            f.name: data.get(f.name) for f in fields(cls) if data.get(f.name) is not None
        }
        for name, value in values.items():
            kind = (int, float) if name in ("last_s", "elapsed_s") else int
            if name != "phase" and (not isinstance(value, kind) or isinstance(value, bool)):
                return None
        return cls(**values)


#: Where run_rounds, execute and the launchers send events.
ProgressFn = Callable[[Progress], None]


def label(spec: WorkloadSpec) -> str:
    """What the line says is measured: model, engine, dtype, batch size (and devices and the
    kind when they are not the usual)."""
    parts = [spec.model, spec.engine, spec.dtype, f"bs={spec.batch_size}"]
    if spec.devices > 1:
        parts.append(f"devices={spec.devices}")
    if spec.kind != "generate":
        parts.append(spec.kind)
    return " ".join(parts)


def describe(what: str, event: Progress) -> str:
    """``llmperf: <what> · round 7/10 · 1,234 tokens/s · child pid 4242, 12 s``."""
    parts = [f"llmperf: {what}"]
    if event.phase == "start":
        parts.append("starting")
    elif event.phase == "load":
        parts.append("loading the model")
    elif event.phase == "warmup":
        parts.append(f"warm-up ({event.total} call{'s' if event.total != 1 else ''})")
    else:
        parts.append(f"round {event.done}/{event.total}")
        if event.last_s:
            if event.tokens_per_round:
                parts.append(f"{event.tokens_per_round / event.last_s:,.0f} tokens/s")
            else:
                parts.append(f"last {_seconds(event.last_s)}")
    if event.pid is not None:
        elapsed = f", {event.elapsed_s:.0f} s" if event.elapsed_s is not None else ""
        parts.append(f"child pid {event.pid}{elapsed}")
    return " · ".join(parts)


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


class ProgressLine:
    """One line below the terminal's current one, redrawn in place and erased before the
    terminal writes again, so pytest's own output (a row of dots, ``PASSED``) stays intact.

    ``write`` gets raw text for a terminal that understands ANSI cursor movement: the first
    draw opens a line below (``\\n``); a redraw returns to its start (``\\r``) and clears to
    its end (``ESC[K``); :meth:`clear` erases it, moves up (``ESC[A``) and right to the column
    the terminal's own line had reached (``column()``). ``width()`` is the terminal's width:
    the text is cut to fit one line, or moving up one line would miss.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        width: Callable[[], int],
        column: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        self._write = write
        self._width = width
        self._column = column
        self._clock = clock
        self._interval = interval_s
        self._drawn = False
        self._key: Optional[str] = None
        self._at = 0.0
        self.failed = False

    @property
    def drawn(self) -> bool:
        return self._drawn

    def show(self, text: str, key: str = "") -> None:
        """Draw ``text``; a ``key`` other than the last one's (a new phase, a new workload) is
        drawn at once, the same key at most once per ``interval_s``."""
        if self.failed:
            return
        now = self._clock()
        if self._drawn and key == self._key and now - self._at < self._interval:
            return
        text = text[: max(1, self._width() - 1)]
        self._emit(("\r" if self._drawn else "\n") + text + "\x1b[K")
        self._drawn, self._key, self._at = True, key, now

    def clear(self) -> None:
        """Erase the line and put the cursor back where the terminal left it."""
        if not self._drawn or self.failed:
            return
        column = self._column() % max(1, self._width())
        self._emit("\r\x1b[K\x1b[A" + (f"\x1b[{column}C" if column else ""))
        self._drawn, self._key = False, None

    def _emit(self, text: str) -> None:
        try:
            self._write(text)
        except (OSError, ValueError):  # a closed or broken terminal: stop drawing, measure on
            self.failed = True


def reporter(line: ProgressLine, what: str) -> ProgressFn:
    """The events of one workload, drawn on ``line``."""

    def report(event: Progress) -> None:
        line.show(describe(what, event), key=f"{what}|{event.phase}|{event.pid}")

    return report


class ChildProgress:
    """A launcher's view of a workload running in a child: the child's events (decoded from
    its channel) passed on with its pid and run time, and a tick every :data:`TICK_S` while it
    sends nothing, so the line shows the child is alive while it imports and loads."""

    def __init__(
        self,
        progress: ProgressFn,
        pid: int,
        *,
        first: Optional[Progress] = None,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = TICK_S,
    ) -> None:
        self._progress = progress
        self._pid = pid
        self._clock = clock
        self._tick = tick_s
        self._start = clock()
        self._last = first or Progress("start")
        self._sent_at = self._start
        self._send(self._last)

    def receive(self, data: Any) -> None:
        event = Progress.from_json(data)
        if event is not None:
            self._send(event)

    def tick(self) -> None:
        if self._clock() - self._sent_at >= self._tick:
            self._send(self._last)

    def seconds_to_tick(self) -> float:
        return max(0.0, self._sent_at + self._tick - self._clock())

    def _send(self, event: Progress) -> None:
        self._last = event
        self._sent_at = now = self._clock()
        self._progress(replace(event, pid=self._pid, elapsed_s=now - self._start))


def notify(progress: Optional[ProgressFn], event: Progress) -> None:
    """Report ``event`` when anyone listens; a listener's failure never stops a measurement."""
    if progress is None:
        return
    with contextlib.suppress(Exception):  # drawing is a courtesy; the numbers are the point
        progress(event)
