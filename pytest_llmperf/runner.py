"""The ``llmperf`` handle: a test's calls become workload specs, run by a launcher.

Plain code (no pytest import), so the whole path from a call to a Record can be driven by
tests with a fake backend and a fake clock. The plugin binds one handle per test. ``generate``
is data (a :class:`~pytest_llmperf.spec.WorkloadSpec`) and may run in another process;
``measure(fn)`` times a callable, which is not data, so it always runs here, through the same
timing loop.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

from . import progress as live
from .backends.base import Backend
from .devicelock import LockTimeout, visible_ids
from .errors import SkipWorkload, UsageError
from .execute import ModelCache, fill_timing, forget_frames, is_oom, oom_note, resolve
from .launchers import Launchers
from .measure import Timing, run_rounds
from .metrics import FORWARD_GATED, LOAD_GATED
from .progress import ProgressFn, ProgressLine
from .results import Record
from .series import OomSeries
from .spec import RecordContext, WorkloadSpec, check_positive, freeze_options

__all__ = ["LLMPerf", "SkipWorkload", "TestContext", "UsageError", "WorkloadCrashed"]

#: Rounds of ``llmperf.load``: each is a new process and a whole load (minutes for a large
#: model), and one run of them is one reading per round, not a timing loop.
LOAD_ROUNDS = 3
#: Rounds and warm-up calls of ``llmperf.forward`` (see its docstring): one forward pass takes
#: milliseconds, and its percentiles need many rounds.
FORWARD_ROUNDS = 100
FORWARD_WARMUP = 10
#: The fewest rounds ``llmperf.forward`` takes: from 20 rounds on p95 is (nearly) an observed
#: round, below it an interpolation towards the slowest one, which a single hiccup decides.
FORWARD_MIN_ROUNDS = 20


class WorkloadCrashed(Exception):
    """A workload's process died or timed out; its record (outcome ``error``) says how."""


@dataclass
class TestContext:
    """What the plugin knows about the test a handle belongs to."""

    key: str
    suite: str
    nodeid: str
    rounds: int
    warmup: int
    device_key: str
    provenance: dict[str, Any]
    #: The test's parameters (except the backend), as the report shows them.
    params: dict[str, Any] = field(default_factory=dict)
    #: pytest-xdist workers sharing this backend's device (0 or 1: none).
    shared_workers: int = 0
    #: --llmperf-launcher or the marker's ``launcher=``.
    launcher: str = "auto"
    #: Models the project registered ([tool.llmperf.models], ini llmperf_models_file).
    models: dict[str, Any] = field(default_factory=dict)
    #: --llmperf-prompts, read at start-up (None: generate_dataset uses the shipped prompts),
    #: and the file it was read from.
    prompts: Optional[tuple[str, ...]] = None
    prompts_source: str = ""
    #: The session's batch-size series that ran out of memory (None: every size runs).
    oom_series: Optional[OomSeries] = None
    #: Where live progress is drawn (the plugin's terminal line; None: not drawn).
    progress: Optional[ProgressLine] = None


class LLMPerf:
    """The measuring handle of one test on one backend (the ``llmperf`` fixture)."""

    def __init__(
        self,
        backend: Backend,
        context: TestContext,
        launchers: Optional[Launchers] = None,
        *,
        cache: Optional[ModelCache] = None,
    ) -> None:
        self.backend = backend
        self.context = context
        self.launchers = launchers if launchers is not None else Launchers(cache=cache)
        limit = self.launchers.settings.memory_limit
        if limit is not None and backend.memory_limit is None:
            backend.limit_memory(limit)
        self.records: list[Record] = []
        self.overrides: dict[str, dict[str, Any]] = {}
        # What re-measures each workload: its spec (data) or its callable (measure).
        self._again: dict[str, Callable[[], Record]] = {}

    @property
    def remeasure(self) -> dict[str, Callable[[], Record]]:
        """key -> measure the same workload again, for confirming a change."""
        return dict(self._again)

    # -- public API ----------------------------------------------------------------------
    def generate(
        self,
        model: str,
        *,
        batch_size: int = 1,
        new_tokens: int = 100,
        prompt: Optional[str] = None,
        prompt_tokens: Optional[int] = None,
        dtype: Optional[str] = None,
        engine: str = "transformers",
        engine_options: Optional[dict[str, Any]] = None,
        devices: int = 1,
        name: Optional[str] = None,
        rounds: Optional[int] = None,
        warmup: Optional[int] = None,
        tolerance: Optional[float] = None,
        launcher: Optional[str] = None,
        fresh: str = "no",
    ) -> Record:
        """Greedy generation of exactly ``new_tokens`` per sequence, timed round by round.

        ``fresh="workload"`` runs it in a new process, ``fresh="round"`` each round in a new
        process (cold numbers: load time, first-call compile), whatever the launcher keeps.
        """
        rounds, warmup = self._rounds(rounds, warmup)
        spec = self._spec(
            "generate",
            model,
            engine,
            engine_options,
            dtype,
            batch_size=batch_size,
            new_tokens=new_tokens,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            devices=devices,
            rounds=rounds,
            warmup=warmup,
            fresh=fresh,
        )
        return self.run(spec, name=name, tolerance=tolerance, launcher=launcher)

    def load(
        self,
        model: str,
        *,
        engine: str = "transformers",
        dtype: Optional[str] = None,
        engine_options: Optional[dict[str, Any]] = None,
        file_cache: str = "cold",
        rounds: Optional[int] = None,
        name: Optional[str] = None,
        tolerance: Optional[float] = None,
        launcher: Optional[str] = None,
    ) -> Record:
        """How long ``model`` takes to load from its checkpoint on disk; every round is a cold
        start in a fresh process (scenarios/load.py): the engine's libraries imported and timed
        apart (``import_s``), the checkpoint's files evicted from the page cache
        (``file_cache="cold"``) or read once (``"warm"``), then the engine's load
        (``load_time_s``, gated with the default metrics unless the test names its own).
        ``rounds`` defaults to 3, not ``--llmperf-rounds``: a round is a whole load."""
        spec = self._spec(
            "load",
            model,
            engine,
            engine_options,
            dtype,
            file_cache=file_cache,
            rounds=LOAD_ROUNDS if rounds is None else rounds,
            warmup=0,  # a warm-up load would warm what the rounds measure
            fresh="round",
        )
        record = self.run(spec, name=name, tolerance=tolerance, launcher=launcher)
        self.overrides.setdefault(record.key, {}).setdefault("gate", LOAD_GATED)
        return record

    def generate_dataset(
        self,
        model: str,
        *,
        prompts: Optional[Sequence[str]] = None,
        max_prompts: Optional[int] = None,
        batch_size: int = 1,
        prompt_tokens: int = 16,
        new_tokens: int = 50,
        dtype: Optional[str] = None,
        engine: str = "transformers",
        engine_options: Optional[dict[str, Any]] = None,
        devices: int = 1,
        name: Optional[str] = None,
        rounds: Optional[int] = None,
        warmup: Optional[int] = None,
        tolerance: Optional[float] = None,
        launcher: Optional[str] = None,
    ) -> Record:
        """Greedy generation over a dataset of prompts (scenarios/dataset.py): each prompt cut
        to its first ``prompt_tokens`` tokens (shorter ones left-padded), exactly
        ``new_tokens`` per prompt, in batches of ``batch_size``; a round is one pass over all
        of them (``dataset_time_s``, gated). ``prompts`` defaults to --llmperf-prompts, else
        the prompts shipped with the plugin; ``max_prompts`` keeps only the first N of them (a
        quick run over a long file: a CPU smoke tier)."""
        from . import prompts as prompt_files

        where = "llmperf.generate_dataset(prompts=...)"
        if prompts is not None:
            try:
                texts = prompt_files.check_list(prompts, where)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            source = prompt_files.ARGUMENT_SOURCE
        elif self.context.prompts is not None:
            texts, source = self.context.prompts, self.context.prompts_source
        else:
            texts, source = prompt_files.shipped(), prompt_files.SHIPPED_SOURCE
        if max_prompts is not None:
            check_positive("max_prompts", max_prompts)
            if max_prompts < len(texts):
                source = f"{source} (first {max_prompts} of {len(texts)})"
                texts = texts[:max_prompts]
        check_positive("prompt_tokens", prompt_tokens)
        rounds, warmup = self._rounds(rounds, warmup)
        spec = self._spec(
            "generate_dataset",
            model,
            engine,
            engine_options,
            dtype,
            batch_size=batch_size,
            new_tokens=new_tokens,
            prompt_tokens=prompt_tokens,
            prompts=texts,
            prompts_source=source,
            devices=devices,
            rounds=rounds,
            warmup=warmup,
        )
        return self.run(spec, name=name, tolerance=tolerance, launcher=launcher)

    def forward(
        self,
        model: str,
        batch_size: int = 1,
        sequence_length: Optional[int] = None,
        *,
        dtype: Optional[str] = None,
        engine: str = "transformers",
        engine_options: Optional[dict[str, Any]] = None,
        name: Optional[str] = None,
        rounds: Optional[int] = None,
        warmup: Optional[int] = None,
        tolerance: Optional[float] = None,
        launcher: Optional[str] = None,
    ) -> Record:
        """One forward pass of ``model`` per round (scenarios/forward.py): reference 004's
        encoder latency. Text models get exactly ``sequence_length`` tokens per row (128 when
        left out), image models their config's image size (a ``sequence_length`` is then a
        usage error); a causal LM's forward is its prefill. ``latency_p95_s`` is the headline
        and gated (with the memory) unless the test names its own metrics.

        ``rounds`` defaults to 100 and ``warmup`` to 10, not --llmperf-rounds/--llmperf-warmup
        (sized for generate calls that take seconds): a forward takes milliseconds, and a
        percentile needs rounds in its tail: with 10 rounds p95 and p99 would both be
        interpolations towards the slowest round; with 100, p95 rests on the slowest five and
        p99 on the slowest two. Fewer than 20 rounds is a usage error; warm-up calls (first-call
        kernel selection, allocator growth) stay out of the tail."""
        if rounds is not None and (not isinstance(rounds, int) or rounds < FORWARD_MIN_ROUNDS):
            raise UsageError(
                f"llmperf.forward(rounds={rounds!r}): expected an integer ≥ "
                f"{FORWARD_MIN_ROUNDS}; percentiles need rounds in their tail"
            )
        if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
            raise UsageError(f"llmperf.forward(warmup={warmup!r}): expected an integer ≥ 0")
        spec = self._spec(
            "forward",
            model,
            engine,
            engine_options,
            dtype,
            batch_size=batch_size,
            sequence_length=sequence_length,
            rounds=FORWARD_ROUNDS if rounds is None else rounds,
            warmup=FORWARD_WARMUP if warmup is None else warmup,
        )
        record = self.run(spec, name=name, tolerance=tolerance, launcher=launcher)
        self.overrides.setdefault(record.key, {}).setdefault("gate", FORWARD_GATED)
        return record

    def _spec(
        self,
        kind: str,
        model: str,
        engine: str,
        engine_options: Optional[dict[str, Any]],
        dtype: Optional[str],
        **fields: Any,
    ) -> WorkloadSpec:
        """A checked spec of ``kind``: what every handle method resolves the same way (the
        model's source, the engine options as data, the backend's default dtype) plus its own
        ``fields``; errors name the call (``llmperf.<kind>(...)``)."""
        spec = WorkloadSpec(
            kind=kind,
            model=model,
            model_source=self.model_source(kind, model),
            engine=engine,
            engine_options=freeze_options(engine_options, f"llmperf.{kind}(engine_options=...)"),
            dtype=dtype or self.backend.default_dtype,
            **fields,
        )
        spec.check()
        return spec

    def model_source(self, kind: str, model: str) -> Optional[str]:
        """What a model name stands for when it is not a catalog id, resolved here (the
        project's registry, paths from this working directory) for whichever process runs it."""
        from . import models

        try:
            found = models.lookup(model, self.context.models)
        except ValueError as exc:
            raise UsageError(f"llmperf.{kind}(model=...): {exc}") from None
        if found.source == "catalog":
            return None
        return json.dumps(found.to_json(), sort_keys=True)

    def run(
        self,
        spec: WorkloadSpec,
        *,
        name: Optional[str] = None,
        tolerance: Optional[float] = None,
        launcher: Optional[str] = None,
    ) -> Record:
        """Run any workload spec (generate's and, later, other kinds') and keep its record."""
        context = self._context(name, tolerance)
        # Usage errors and skips are decided here, before any process is started or model
        # loaded, whichever launcher runs the workload.
        resolve(spec, self.backend)
        chosen = self.launchers.choose(spec, launcher or self.context.launcher, self.backend)
        series, backend = self.context.oom_series, self.backend.name
        at = series.blocked_by(spec, context, backend) if series is not None else None
        if series is not None and at is not None:
            record = series.not_run(spec, context, backend, at)
        else:
            shown = live.label(spec)
            run = partial(chosen.run, spec, context, self.backend, progress=self._progress(shown))
            record = self._owned(spec.devices, spec, context, run)
            if series is not None:
                series.observe(spec, context, backend, record)
        self.records.append(record)
        if record.outcome == "error":
            raise WorkloadCrashed(f"{record.key}: {record.note}")
        if record.outcome == "ok":
            again = spec.again()
            self._again[record.key] = partial(
                self._owned,
                again.devices,
                again,
                context,
                partial(
                    chosen.run,
                    again,
                    context,
                    self.backend,
                    progress=self._progress(f"{live.label(spec)} (measuring again)"),
                ),
            )
        return record

    def _owned(
        self,
        devices: int,
        spec: Optional[WorkloadSpec],
        context: RecordContext,
        run: Callable[[], Record],
    ) -> Record:
        """``run`` while this job holds the node-wide locks of the ``devices`` it measures on
        (devicelock.py; none on CPU): the one place every workload and every re-measurement
        passes, whichever launcher runs it. A device another job holds past
        --llmperf-lock-timeout makes an ``error`` record naming the holder."""
        locks = self.launchers.locks
        ids = visible_ids(self.backend, os.environ, devices)
        try:
            with locks.hold(ids):
                record = run()
        except LockTimeout as exc:
            record = context.new_record(spec, self.backend.name)
            record.outcome, record.note = "error", str(exc)
            return record
        if locks.waited:
            record.note = "; ".join(n for n in (record.note, locks.waited) if n)
        return record

    def measure(
        self,
        fn: Callable[[], Any],
        *,
        name: Optional[str] = None,
        tokens: Optional[int] = None,
        batch_size: int = 1,
        rounds: Optional[int] = None,
        warmup: Optional[int] = None,
        tolerance: Optional[float] = None,
    ) -> Record:
        """Time any callable like ``generate`` is timed: device sync, warm-up, rounds.

        ``tokens`` (per sequence) makes ``ms_per_token`` and ``tokens_per_s`` available.
        """
        if not callable(fn):
            raise UsageError(f"llmperf.measure(fn): expected a callable, got {type(fn).__name__}")
        check_positive("batch_size", batch_size)
        if tokens is not None:
            check_positive("tokens", tokens)
        rounds, warmup = self._rounds(rounds, warmup)
        context = self._context(name, tolerance)
        record = self._measure_once(fn, context, batch_size, tokens, rounds, warmup)
        self.records.append(record)
        if record.outcome == "error":  # a device another job held past --llmperf-lock-timeout
            raise WorkloadCrashed(f"{record.key}: {record.note}")
        if record.outcome == "ok":
            self._again[record.key] = partial(
                self._measure_once,
                fn,
                context,
                batch_size,
                tokens,
                rounds,
                min(warmup, 1),
                again=True,
            )
        return record

    def release(self) -> None:
        """Forget what only this test needed (its re-measure callables hold the test's own
        callables and specs); the session's launchers keep the one model the next test may
        reuse."""
        self._again.clear()

    def record_error(self, exc: BaseException) -> None:
        """Report a workload that crashed as outcome ``error`` (never gated, never stored).

        Only when nothing was measured: a test whose own assertion fails after a good
        measurement keeps its measured record.
        """
        if self.records:
            return
        record = self._context(None, None).new_record(None, self.backend.name)
        record.outcome = "error"
        text = str(exc).strip().splitlines()
        record.note = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
        self.records.append(record)

    # -- internals -----------------------------------------------------------------------
    def _progress(self, what: str) -> Optional[ProgressFn]:
        """Where one workload's progress goes: the test's terminal line, if it has one."""
        line = self.context.progress
        return None if line is None else live.reporter(line, what)

    def _rounds(self, rounds: Optional[int], warmup: Optional[int]) -> tuple[int, int]:
        if rounds is not None and (not isinstance(rounds, int) or rounds < 5):
            raise UsageError(f"rounds={rounds!r}: expected an integer ≥ 5")
        if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
            raise UsageError(f"warmup={warmup!r}: expected an integer ≥ 0")
        return (
            self.context.rounds if rounds is None else rounds,
            self.context.warmup if warmup is None else warmup,
        )

    def _context(self, name: Optional[str], tolerance: Optional[float]) -> RecordContext:
        key = self.context.key + (f":{name}" if name else "")
        if any(r.key == key for r in self.records):
            raise UsageError(
                f"a second workload in this test has the key {key!r}: give each one a name="
            )
        if tolerance is not None:
            from .settings import SettingError, parse_fraction

            try:
                self.overrides[key] = {"tolerance": {"*": parse_fraction(tolerance)}}
            except SettingError as exc:
                raise UsageError(f"tolerance={tolerance!r}: {exc}") from None
        return RecordContext(
            key=key,
            suite=self.context.suite,
            device_key=self.context.device_key,
            nodeid=self.context.nodeid,
            provenance=self.context.provenance,
            params=self.context.params,
            shared_workers=self.context.shared_workers,
        )

    def _measure_once(
        self,
        fn: Callable[[], Any],
        context: RecordContext,
        batch_size: int,
        tokens: Optional[int],
        rounds: int,
        warmup: int,
        again: bool = False,
    ) -> Record:
        # A callable runs on the device its code picks: the first visible one, as a rule.
        run = partial(self._measure_unowned, fn, context, batch_size, tokens, rounds, warmup, again)
        return self._owned(1, None, context, run)

    def _measure_unowned(
        self,
        fn: Callable[[], Any],
        context: RecordContext,
        batch_size: int,
        tokens: Optional[int],
        rounds: int,
        warmup: int,
        again: bool = False,
    ) -> Record:
        record = context.new_record(None, self.backend.name)
        record.workload.update(batch_size=batch_size, tokens=tokens)
        total = batch_size * tokens if tokens else None
        shown = context.key + (" (measuring again)" if again else "")
        try:
            timing: Timing = run_rounds(
                self.backend,
                _checked(fn),
                rounds=rounds,
                warmup=warmup,
                progress=self._progress(shown),
                tokens_per_round=total,
            )
        except Exception as exc:
            if not is_oom(exc, self.backend):
                raise
            forget_frames(exc)
            self.backend.free_memory()
            record.outcome, record.note = "oom", oom_note(exc)
            return record
        fill_timing(record, timing, self.backend, tokens=total, main="time_s")
        return record


def _checked(fn: Callable[[], Any]) -> Callable[[Any], Any]:
    def call(_hook: Any) -> Any:
        out = fn()
        if inspect.isgenerator(out) or inspect.iscoroutine(out) or inspect.isasyncgen(out):
            # Creating a generator runs none of its body: timing it would store 0.2 µs as a
            # baseline of "the work".
            close = getattr(out, "close", None)  # a generator or coroutine: never started
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            raise UsageError(
                f"llmperf.measure(fn): fn returned a {type(out).__name__}, so nothing ran "
                "while it was timed; consume it inside fn, e.g. "
                "measure(lambda: list(make_gen())) or measure(lambda: asyncio.run(coro()))"
            )
        return out

    return call
