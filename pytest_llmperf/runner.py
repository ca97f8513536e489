"""The ``llmperf`` handle: turns ``generate`` and ``measure`` calls into honest Records.

Plain code (no pytest import) so the whole path from a call to a Record can be driven by
tests with a fake backend and a fake clock. The plugin binds one handle per test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .backends.base import Backend
from .measure import Timing, run_rounds
from .results import MetricValue, Record

GiB = 2**30


class UsageError(Exception):
    """A call with arguments that cannot be right; reported as a one-line test failure."""


class SkipWorkload(Exception):
    """The workload cannot run on this node (no such device count, dtype, memory to load)."""


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def is_oom(exc: BaseException, backend: Backend) -> bool:
    if isinstance(exc, backend.oom_errors()):
        return True
    # SynapseAI and the Neuron runtime raise RuntimeError with the words in the message.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "out of memory" in text


def output_digest(token_rows: Iterable[Iterable[int]], weight_source: str) -> str:
    h = hashlib.sha256(weight_source.encode())
    for row in token_rows:
        h.update(b"|" + ",".join(str(int(t)) for t in row).encode())
    return "sha256:" + h.hexdigest()


@dataclass
class ModelCache:
    """Keeps the last loaded model: a parametrized suite reuses it instead of reloading.

    Only one model is kept, so two large models are never resident at once.
    """

    key: Optional[tuple] = None
    loaded: Any = None

    def get(self, key: tuple) -> Any:
        return self.loaded if key == self.key else None

    def put(self, key: tuple, loaded: Any) -> None:
        self.key, self.loaded = key, loaded

    def drop(self, backend: Optional[Backend] = None) -> None:
        self.key = self.loaded = None
        if backend is not None:
            backend.free_memory()

    def resident_bytes(self, unless: Optional[tuple] = None) -> int:
        """Weight bytes of the held model, unless it is the one for key ``unless``.

        A model that is about to be replaced is memory the next load gets back: the memory
        pre-check counts it as free, or a test's skip would depend on the test before it.
        """
        if self.loaded is None or self.key == unless:
            return 0
        return int(getattr(self.loaded, "weight_bytes", 0) or 0)


@dataclass
class Workload:
    """Per-test context the plugin computes: where results go and how to measure."""

    key: str
    suite: str
    nodeid: str
    rounds: int
    warmup: int
    device_key: str
    provenance: dict[str, Any]
    workload: dict[str, Any] = field(default_factory=dict)
    #: pytest-xdist workers sharing this backend's device (0 or 1: none).
    shared_workers: int = 0


class LLMPerf:
    """The measuring handle of one test on one backend (the ``llmperf`` fixture)."""

    def __init__(
        self,
        backend: Backend,
        context: Workload,
        cache: Optional[ModelCache] = None,
    ) -> None:
        self.backend = backend
        self.context = context
        self.cache = cache if cache is not None else ModelCache()
        self.records: list[Record] = []
        #: key -> a callable measuring the same workload again, for confirming a regression.
        self.remeasure: dict[str, Callable[[], Record]] = {}
        self.overrides: dict[str, dict[str, Any]] = {}

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
        devices: int = 1,
        name: Optional[str] = None,
        rounds: Optional[int] = None,
        warmup: Optional[int] = None,
        tolerance: Optional[float] = None,
    ) -> Record:
        """Greedy generation of exactly ``new_tokens`` per sequence, timed round by round."""
        from . import engines, models

        _check_positive("batch_size", batch_size)
        _check_positive("new_tokens", new_tokens)
        _check_positive("devices", devices)
        if prompt_tokens is not None:
            _check_positive("prompt_tokens", prompt_tokens)
        try:
            spec = models.get(model)
        except ValueError as exc:
            raise UsageError(f"llmperf.generate(model=...): {exc}") from None
        try:
            eng = engines.get_engine(engine)
        except ValueError as exc:
            raise UsageError(f"llmperf.generate(engine=...): {exc}") from None
        except engines.EngineUnavailable as exc:
            raise SkipWorkload(str(exc)) from None
        dtype = dtype or self.backend.default_dtype
        if dtype not in models.DTYPES:
            raise UsageError(
                f"llmperf.generate(dtype={dtype!r}): unknown dtype; known: "
                + ", ".join(models.DTYPES)
            )
        count = self.backend.device_count()
        if devices > count:
            raise SkipWorkload(
                f"needs {devices} {self.backend.name} devices, this node has {count}"
            )
        reason = eng.unsupported(self.backend, dtype, devices)
        if reason:
            raise SkipWorkload(reason)
        rounds, warmup = self._rounds(rounds, warmup)
        if new_tokens < 2:
            raise UsageError("llmperf.generate(new_tokens=...): at least 2 (TPOT needs two tokens)")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise UsageError(
                f"llmperf.generate(prompt={prompt!r}): expected non-empty text (or leave it out "
                "and give prompt_tokens=N for N tokens of the shipped corpus)"
            )
        if prompt_tokens is not None:
            _check_context(model, spec, prompt_tokens, new_tokens)

        workload = {
            "model": model,
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "dtype": dtype,
            "engine": engine,
            "devices": devices,
        }
        record = self._new_record(name, workload, tolerance)

        cache_key = (model, dtype, engine, self.backend.name, devices)
        loaded = self.cache.get(cache_key)
        weights = spec.weight_bytes(dtype)
        avail = self.backend.available_memory_bytes()
        if avail is not None:
            # What the next load gets back: our own cached model (or the one to be replaced).
            resident = weights if loaded is not None else self.cache.resident_bytes()
            free_for_us = avail * devices + resident
            if loaded is None and weights > free_for_us:
                raise SkipWorkload(
                    f"{model} cannot load on {self.backend.name}: its {dtype} weights need "
                    f"{fmt_bytes(weights)}, {fmt_bytes(free_for_us)} available"
                )
            # Before the tokenizer exists the prompt's length is known only for the seed
            # prompt; a one-token prompt is the floor. A workload that fails even that is not
            # worth loading a model for; the exact check follows the encoding.
            floor = prompt_tokens or (models.SEED_PROMPT_TOKENS if prompt is None else 1)
            need = models.estimate_generation_bytes(spec, dtype, batch_size, floor, new_tokens)
            if need > free_for_us:
                return self._not_run(record, need, free_for_us)

        if loaded is None:
            self.cache.drop(self.backend)
            try:
                loaded = eng.load(spec, dtype, self.backend, devices)
            except Exception as exc:
                if is_oom(exc, self.backend):
                    self.cache.drop(self.backend)
                    record.outcome, record.note = "oom", f"out of memory while loading: {exc}"
                    return self._finish(record)
                raise
            self.cache.put(cache_key, loaded)

        try:
            input_ids, mask, n_prompt = models.encode_prompt(
                loaded.tokenizer,
                loaded.real_tokenizer,
                prompt if prompt is not None or prompt_tokens is not None else models.SEED_PROMPT,
                batch_size,
                prompt_tokens,
            )
        except ValueError as exc:
            raise UsageError(f"llmperf.generate(prompt=...): {exc}") from None
        _check_context(model, spec, n_prompt, new_tokens)
        record.workload["prompt_tokens"] = n_prompt
        record.workload["weight_source"] = loaded.weight_source
        avail = self.backend.available_memory_bytes()
        if avail is not None:
            # The weights are resident now: they are part of the need and of what is free.
            free_for_us = avail * devices + weights
            need = models.estimate_generation_bytes(spec, dtype, batch_size, n_prompt, new_tokens)
            if need > free_for_us:
                return self._not_run(record, need, free_for_us)
        input_ids = input_ids.to(self.backend.torch_device)
        mask = mask.to(self.backend.torch_device)

        def call(hook: Any) -> Any:
            return eng.generate(loaded, input_ids, mask, new_tokens, hook)

        def attempt(warm: int) -> Timing:
            return run_rounds(
                self.backend,
                call,
                rounds=rounds,
                warmup=warm,
                new_tokens=new_tokens,
                count_new_tokens=lambda out: int(out.shape[-1]) - n_prompt,
            )

        def fill(rec: Record, timing: Timing) -> None:
            rows = timing.output[:, n_prompt:].tolist()
            rec.output_digest = output_digest(rows, loaded.weight_source)
            rec.output_head = rows[0][:128]
            self._fill(rec, timing, tokens=batch_size * new_tokens)
            rec.metrics["ttft_s"] = MetricValue.from_samples("ttft_s", timing.ttft)
            rec.metrics["tpot_s"] = MetricValue.from_samples("tpot_s", timing.tpot)
            rec.metrics["load_time_s"] = MetricValue("load_time_s", loaded.load_time_s)
            bandwidth = self.backend.memory_bandwidth_bytes_per_s()
            tpot = rec.value("tpot_s")
            if bandwidth and tpot:
                rec.metrics["roofline_fraction"] = MetricValue(
                    "roofline_fraction", (loaded.weight_bytes / devices / bandwidth) / tpot
                )

        return self._run(
            record, attempt, fill, warmup, "while generating", lambda: self.cache.drop(self.backend)
        )

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
        _check_positive("batch_size", batch_size)
        if tokens is not None:
            _check_positive("tokens", tokens)
        rounds, warmup = self._rounds(rounds, warmup)
        record = self._new_record(name, {"batch_size": batch_size, "tokens": tokens}, tolerance)

        def call(_hook: Any) -> Any:
            out = fn()
            if inspect.isgenerator(out) or inspect.iscoroutine(out) or inspect.isasyncgen(out):
                # Creating a generator runs none of its body: timing it would store 0.2 µs as
                # a baseline of "the work".
                with contextlib.suppress(Exception):
                    out.close()  # type: ignore[union-attr]
                raise UsageError(
                    f"llmperf.measure(fn): fn returned a {type(out).__name__}, so nothing ran "
                    "while it was timed; consume it inside fn, e.g. "
                    "measure(lambda: list(make_gen())) or measure(lambda: asyncio.run(coro()))"
                )
            return out

        def attempt(warm: int) -> Timing:
            return run_rounds(self.backend, call, rounds=rounds, warmup=warm)

        def fill(rec: Record, timing: Timing) -> None:
            self._fill(rec, timing, tokens=batch_size * tokens if tokens else None, main="time_s")

        return self._run(record, attempt, fill, warmup, "", self.backend.free_memory)

    def release(self) -> None:
        """Forget what only this test needed: the re-measure closures hold the loaded model,
        inputs and engine. The shared model cache keeps the one model the next test may reuse.
        """
        self.remeasure.clear()
        self.cache = ModelCache()

    def record_error(self, exc: BaseException) -> None:
        """Report a workload that crashed as outcome ``error`` (never gated, never stored).

        Only when nothing was measured: a test whose own assertion fails after a good
        measurement keeps its measured record.
        """
        if self.records:
            return
        record = self._new_record(None, {}, None)
        record.outcome = "error"
        text = str(exc).strip().splitlines()
        record.note = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
        self._finish(record)

    # -- internals -----------------------------------------------------------------------
    def _rounds(self, rounds: Optional[int], warmup: Optional[int]) -> tuple[int, int]:
        if rounds is not None and (not isinstance(rounds, int) or rounds < 5):
            raise UsageError(f"rounds={rounds!r}: expected an integer ≥ 5")
        if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
            raise UsageError(f"warmup={warmup!r}: expected an integer ≥ 0")
        return (
            self.context.rounds if rounds is None else rounds,
            self.context.warmup if warmup is None else warmup,
        )

    def _new_record(
        self, name: Optional[str], workload: dict[str, Any], tolerance: Optional[float]
    ) -> Record:
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
        return Record(
            key=key,
            suite=self.context.suite,
            backend=self.backend.name,
            device_key=self.context.device_key,
            outcome="ok",
            workload={**self.context.workload, **workload},
            provenance=self.context.provenance,
            nodeid=self.context.nodeid,
        )

    def _fill(
        self, record: Record, timing: Timing, *, tokens: Optional[int], main: str = "e2e_latency_s"
    ) -> None:
        record.metrics[main] = MetricValue.from_samples(main, timing.e2e)
        if tokens:
            record.metrics["ms_per_token"] = MetricValue.from_samples(
                "ms_per_token", [t / tokens * 1000 for t in timing.e2e]
            )
            record.metrics["tokens_per_s"] = MetricValue.from_samples(
                "tokens_per_s", [tokens / t for t in timing.e2e if t > 0]
            )
        record.metrics["warmup_s"] = MetricValue("warmup_s", timing.warmup_s)
        record.metrics["peak_memory_bytes"] = MetricValue(
            "peak_memory_bytes",
            timing.peak_memory_bytes,
        )
        record.workload["rounds"] = len(timing.e2e)
        notes = list(timing.notes)
        record.busy_load = busy_load(self.backend.host_load())
        if record.busy_load is not None:
            notes.append(
                f"machine busy: load average {record.busy_load:.1f} on {os.cpu_count()} CPUs "
                "during the rounds"
            )
        record.shared_workers = self.context.shared_workers
        if record.shared_workers > 1:
            notes.append(
                f"{record.shared_workers} pytest-xdist workers shared this {record.backend} "
                "device while it was measured"
            )
        record.note = "; ".join(notes)

    def _run(
        self,
        record: Record,
        attempt: Callable[[int], Timing],
        fill: Callable[[Record, Timing], None],
        warmup: int,
        where: str,
        free: Callable[[], None],
    ) -> Record:
        """Measure once; keep a way to measure the same workload again (see ``remeasure``)."""
        try:
            timing = attempt(warmup)
        except Exception as exc:
            if not is_oom(exc, self.backend):
                raise
            free()
            record.outcome = "oom"
            record.note = f"out of memory{' ' + where if where else ''}: {exc}"
            return self._finish(record)
        fill(record, timing)

        def again() -> Record:
            fresh = dataclasses.replace(record, metrics={}, note="", workload=dict(record.workload))
            # The model is warm already; one call re-primes caches other tests may have evicted.
            fill(fresh, attempt(min(warmup, 1)))
            return fresh

        self.remeasure[record.key] = again
        return self._finish(record)

    def _not_run(self, record: Record, need: int, free: int) -> Record:
        record.outcome = "oom"
        record.note = (
            f"not run: estimated need {fmt_bytes(need)} (weights + KV cache + activations) "
            f"> {fmt_bytes(free)} available"
        )
        return self._finish(record)

    def _finish(self, record: Record) -> Record:
        self.records.append(record)
        return record


#: The machine counts as busy when the 1-minute load average exceeds this many times the CPU
#: count, plus BUSY_SLACK. Our own torch threads alone keep the load near the CPU count, and
#: the load average lags by a minute, so "above the CPU count" would flag our own runs.
BUSY_FACTOR = 1.25
BUSY_SLACK = 0.5


def busy_load(load: Optional[float]) -> Optional[float]:
    """``load`` when other processes competed for the CPU during the rounds, else None.

    On a shared box descheduled torch threads make a tiny model 10x slower; a regression
    measured then says nothing about the code (the gate calls it inconclusive).
    """
    cpus = os.cpu_count() or 1
    return load if load is not None and load > cpus * BUSY_FACTOR + BUSY_SLACK else None


def _check_context(model: str, spec: Any, prompt_tokens: int, new_tokens: int) -> None:
    """A sequence longer than the model's positions fails deep inside generate (an index
    error in the position embedding): say so before any round runs."""
    limit = spec.shape().max_positions
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise UsageError(
            f"llmperf.generate(model={model!r}): {prompt_tokens} prompt tokens + {new_tokens} "
            f"new tokens exceed its context of {limit} positions; shorten the prompt or "
            "new_tokens"
        )


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name}={value!r}: expected a positive integer")
