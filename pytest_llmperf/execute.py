"""The one way a workload is measured: ``execute(spec, context, backend, cache) -> Record``.

Every caller goes through here — the ``llmperf`` fixture, the re-measurement that confirms a
regression, a worker child process, each rank of a torchrun group — so a number means the same
thing wherever it was taken. What differs between workload kinds is a scenario
(``scenarios/``), between engines an engine (``engines/``), between hardware a backend.

Order, and why: everything that can be decided without a model is decided first (usage errors,
device count, the engine's support, the memory need against what is free), because loading a
model that cannot run costs minutes on real hardware and, on a CPU host, an out-of-memory is
the kernel killing the process rather than an exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from . import engines, measure, models, scenarios
from .backends.base import Backend
from .energy import fill_energy
from .engines.base import Engine, LoadedModel
from .errors import SkipWorkload, UsageError
from .models.store import CheckpointStore
from .noise import SCATTER_LIMIT, busy_load, busy_note, scatter
from .progress import Progress, ProgressFn, notify
from .results import MetricValue, Record
from .scenarios.base import Scenario
from .spec import RecordContext, WorkloadSpec
from .units import format_value


@dataclass
class ModelCache:
    """Keeps the last loaded model: a parametrized suite reuses it instead of reloading.

    Only one model is kept, so two large models are never resident at once. ``store`` is the
    checkpoint cache on disk that engines load from.
    """

    key: Optional[tuple] = None
    loaded: Optional[LoadedModel] = None
    store: CheckpointStore = field(default_factory=CheckpointStore)

    def get(self, key: tuple) -> Optional[LoadedModel]:
        return self.loaded if key == self.key else None

    def put(self, key: tuple, loaded: LoadedModel) -> None:
        self.key, self.loaded = key, loaded

    def drop(self, backend: Optional[Backend] = None) -> None:
        if self.loaded is not None and self.loaded.close is not None:
            self.loaded.close()
        self.key = self.loaded = None
        self.store.unpin_all()
        if backend is not None:
            backend.free_memory()

    def resident_bytes(self, unless: Optional[tuple] = None) -> int:
        """Weight bytes of the held model, unless it is the one for key ``unless``.

        A model that is about to be replaced is memory the next load gets back: the memory
        check counts it as free, or a test's skip would depend on the test before it.
        """
        if self.loaded is None or self.key == unless:
            return 0
        return int(self.loaded.weight_bytes or 0)


def resolve(spec: WorkloadSpec, backend: Backend) -> tuple[Scenario, Engine, models.ModelSpec]:
    """The scenario, engine and model of ``spec``, after every check that needs no model."""
    scenario = scenarios.get_scenario(spec.kind)
    try:
        engine = engines.get_engine(spec.engine)
    except UsageError as exc:
        raise UsageError(f"llmperf.{spec.kind}(engine=...): {exc}") from None
    try:
        model = model_of(spec)
    except ValueError as exc:
        raise UsageError(f"llmperf.{spec.kind}(model=...): {exc}") from None
    if spec.dtype not in models.DTYPE_BYTES:
        raise UsageError(
            f"llmperf.{spec.kind}(dtype={spec.dtype!r}): unknown dtype; known: "
            + ", ".join(models.DTYPE_BYTES)
        )
    if spec.dtype not in engine.dtypes:
        raise UsageError(
            f"llmperf.{spec.kind}(dtype={spec.dtype!r}): engine {engine.name!r} runs "
            + ", ".join(engine.dtypes)
        )
    try:
        engine.check_options(spec.options)
    except UsageError as exc:
        raise UsageError(f"llmperf.{spec.kind}(engine_options=...): {exc}") from None
    if not engine.implements(scenario.engine_method):
        raise UsageError(
            f"llmperf.{spec.kind}(engine={engine.name!r}): the engine has no "
            f"{scenario.engine_method}(), so it cannot run this kind of workload; "
            "engine='transformers' does"
        )
    if model.task not in scenario.tasks:
        raise UsageError(wrong_task(spec, model))
    if model.task not in engine.tasks:
        builds = " and ".join(_TASK_PLURALS[t] for t in engine.tasks)
        raise UsageError(
            f"llmperf.{spec.kind}(engine={engine.name!r}): {spec.model} is "
            f"{_TASK_WORDS[model.task]} ({model.family}) and engine {engine.name!r} builds "
            f"{builds} only; engine='transformers' builds it"
        )
    scenario.validate(spec, model)
    count = backend.device_count()
    if spec.devices > count:
        raise SkipWorkload(f"needs {spec.devices} {backend.name} devices, this node has {count}")
    if backend.engines is not None and engine.name not in backend.engines:
        raise SkipWorkload(
            f"engine {engine.name!r} does not run on {backend.name}; engines there: "
            + ", ".join(backend.engines)
        )
    reason = engine.unsupported(backend, spec)
    if reason:
        raise SkipWorkload(reason)
    return scenario, engine, model


_TASK_WORDS = {
    "causal-lm": "a causal LM",
    "encoder": "an encoder",
    "image-encoder": "an image encoder",
}
_TASK_PLURALS = {
    "causal-lm": "causal LMs",
    "encoder": "encoders",
    "image-encoder": "image encoders",
}


def wrong_task(spec: WorkloadSpec, model: models.ModelSpec) -> str:
    """The one line for a model of a kind the workload does not run (an encoder to generate)."""
    what = f"{spec.model} is {_TASK_WORDS[model.task]} ({model.family})"
    if model.task == "causal-lm":
        return f"{what}: llmperf.{spec.kind} does not run it"
    return f"{what}: llmperf.{spec.kind} needs a causal LM; time it with llmperf.forward"


def model_of(spec: WorkloadSpec) -> models.ModelSpec:
    """The model a spec names: as the test resolved it (``model_source``), else looked up."""
    if spec.model_source:
        import json

        return models.ModelSpec.from_json(json.loads(spec.model_source))
    return models.lookup(spec.model)


def execute(
    spec: WorkloadSpec,
    context: RecordContext,
    backend: Backend,
    cache: Optional[ModelCache] = None,
    progress: Optional[ProgressFn] = None,
) -> Record:
    """Measure ``spec`` on ``backend``; the record's outcome is ok or oom (errors raise).
    ``progress`` hears when the model loads and, from the timing loop, between rounds."""
    scenario, engine, model = resolve(spec, backend)
    cache = cache if cache is not None else ModelCache()
    job = _Job(spec, backend, scenario, engine, model, cache, progress)
    record = context.new_record(spec, backend.name)
    scenario.describe(record, spec, model)
    if scenario.measures_load:
        return job.measure_loads(record)
    loaded = job.cache.get(job.key)
    short = job.memory_short(cached=loaded is not None)
    if short is not None:
        return _not_run(record, *short)
    if loaded is None:
        notify(progress, Progress("load"))
        loaded = job.load(record)
        if loaded is None:
            return record
        record.metrics["load_time_s"] = MetricValue("load_time_s", loaded.load_time_s)
        if loaded.compile_s is not None:  # compiled for this load, outside load_time_s
            record.metrics["compile_s"] = MetricValue("compile_s", loaded.compile_s)
    else:
        # load_time_s belongs to the record of the call that loaded the model.
        record.workload["model_reused"] = True
    if loaded.note:  # how the engine ran (placement, quantization), on every record
        record.note = loaded.note
    inputs = scenario.prepare(spec, model, loaded, backend)
    short = job.exact_memory_short(loaded, inputs)
    if short is not None:
        return _not_run(record, *short)
    return job.measure(loaded, inputs, record)


@dataclass
class _Job:
    """One execution of a spec: what it was resolved to, and the session's model cache."""

    spec: WorkloadSpec
    backend: Backend
    scenario: Scenario
    engine: Engine
    model: models.ModelSpec
    cache: ModelCache
    progress: Optional[ProgressFn] = None

    @property
    def key(self) -> tuple:
        s = self.spec
        return (
            s.model,
            s.model_source,
            s.dtype,
            s.engine,
            s.engine_options,
            s.seed,
            self.backend.name,
            s.devices,
            *self.engine.static_shapes(s),
        )

    def _free(self, resident: int) -> Optional[int]:
        avail = self.backend.usable_memory_bytes()
        if avail is None:
            return None
        return (avail if self.backend.shared_memory else avail * self.spec.devices) + resident

    def memory_short(self, cached: bool) -> Optional[tuple[int, int]]:
        """(need, free) when the workload cannot fit even with its shortest input; a model
        whose weights alone cannot fit is skipped (nothing to measure on this node)."""
        spec = self.spec
        weights = self.engine.device_weight_bytes(self.model, spec)
        # What the next load gets back: our own cached model (or the one to be replaced).
        free = self._free(weights if cached else self.cache.resident_bytes(self.key))
        if free is None:
            return None
        if not cached and weights > free:
            raise SkipWorkload(
                f"{spec.model} cannot load on {self.backend.name}: its {spec.dtype} weights need "
                f"{format_value(weights, 'B')}, {format_value(free, 'B')} available"
            )
        return self._short(self.scenario.tokens_floor(spec), free)

    def exact_memory_short(self, loaded: LoadedModel, inputs: Any) -> Optional[tuple[int, int]]:
        # The weights are resident now: they are part of the need and of what is free.
        free = self._free(loaded.weight_bytes)
        if free is None:
            return None
        return self._short(self.scenario.input_tokens(inputs), free)

    def _short(self, tokens: int, free: int) -> Optional[tuple[int, int]]:
        runtime = self.scenario.runtime_bytes(self.model, self.spec, tokens)
        need = self.engine.memory_need(self.model, self.spec, runtime)
        return (need, free) if need > free else None

    def load(
        self, record: Record, store: Optional[CheckpointStore] = None
    ) -> Optional[LoadedModel]:
        """Drop the resident model, load this one from ``store`` (default: the cache's) and keep
        it as the one resident; None when it ran out of memory (the record says so)."""
        self.cache.drop(self.backend)
        try:
            loaded = self.engine.load(
                self.model, self.spec, self.backend, store or self.cache.store
            )
        except Exception as exc:
            if not is_oom(exc, self.backend):
                raise
            forget_frames(exc)
            self.cache.drop(self.backend)
            record.outcome, record.note = "oom", oom_note(exc, "loading")
            return None
        self.cache.put(self.key, loaded)
        return loaded

    def measure_loads(self, record: Record) -> Record:
        """The load kind (scenarios/load.py): each round loads the model again through
        :meth:`load`, so nothing is loaded here first, and the model it replaces is dropped
        before the memory check counts what is free."""
        self.cache.drop(self.backend)
        short = self.memory_short(cached=False)
        if short is not None:
            return _not_run(record, *short)
        load = partial(self.load, record)
        timing = self.scenario.load_rounds(
            self.spec, self.engine, self.backend, self.cache.store, record, load
        )
        if timing is not None:
            fill_timing(record, timing, self.backend, tokens=None, main="load_time_s")
        return record

    def measure(self, loaded: LoadedModel, inputs: Any, record: Record) -> Record:
        spec, scenario = self.spec, self.scenario
        tokens = scenario.tokens_per_round(spec, inputs)
        try:
            timing = measure.run_rounds(
                self.backend,
                scenario.call(self.engine, loaded, inputs, spec),
                rounds=spec.rounds,
                warmup=spec.warmup,
                new_tokens=spec.new_tokens,
                count_new_tokens=lambda out: scenario.produced(out, inputs),
                token_times=scenario.token_times,
                progress=self.progress,
                tokens_per_round=tokens,
            )
        except Exception as exc:
            if not is_oom(exc, self.backend):
                raise
            forget_frames(exc)
            self.cache.drop(self.backend)
            record.outcome = "oom"
            record.note = oom_note(exc, scenario.activity)
            return record
        scenario.fill(record, timing, inputs, loaded, spec, self.backend)
        fill_timing(
            record,
            timing,
            self.backend,
            tokens=tokens,
            main=scenario.main_metric,
        )
        return record


def _not_run(record: Record, need: int, free: int) -> Record:
    record.outcome = "oom"
    record.note = (
        f"not run: estimated need {format_value(need, 'B')} (weights + KV cache + activations) "
        f"> {format_value(free, 'B')} available"
    )
    return record


def fill_timing(
    record: Record,
    timing: measure.Timing,
    backend: Backend,
    *,
    tokens: Optional[int],
    main: str = "e2e_latency_s",
) -> None:
    """The metrics every kind shares, and the notes on how the rounds went."""
    record.metrics[main] = MetricValue.from_samples(main, timing.e2e)
    if tokens:
        record.metrics["ms_per_token"] = MetricValue.from_samples(
            "ms_per_token", [t / tokens * 1000 for t in timing.e2e]
        )
        record.metrics["tokens_per_s"] = MetricValue.from_samples(
            "tokens_per_s", [tokens / t for t in timing.e2e if t > 0]
        )
    record.metrics["warmup_s"] = MetricValue("warmup_s", timing.warmup_s)
    record.metrics["peak_memory_bytes"] = MetricValue("peak_memory_bytes", timing.peak_memory_bytes)
    record.workload["rounds"] = len(timing.e2e)
    # How ttft/tpot were stamped (measure.EVENTS or SYNC_CLOCK): in provenance, so a change
    # of method shows in "changed since the baseline" and restarts the history.
    record.provenance["timing_method"] = timing.method
    notes = [record.note] if record.note else []
    notes += timing.notes
    # Joules per round from the hardware's counter (energy.py): absent, not zero, without one.
    notes += fill_energy(record, timing.energy_j, backend.energy_meter(), tokens)
    load = backend.host_load()
    own = backend.own_load(load)
    record.busy_load = busy_load(load, own)
    if record.busy_load is not None:
        notes.append(busy_note(record.busy_load, own))
    # Another job's kernels on our device (the device's analogue of busy_load): checked once,
    # for what the device's tools remember of the rounds.
    devices = record.workload.get("devices")
    count = devices if isinstance(devices, int) and devices > 0 else 1
    users = backend.device_users(range(count), since_s=time.time() - sum(timing.e2e))
    record.device_users = list(users or [])
    if record.device_users:
        notes.append(
            f"other processes on the {record.backend} device during the rounds: "
            + ", ".join(record.device_users)
        )
    record.scatter = scatter(timing.e2e)
    if record.scatter is not None:
        notes.append(
            f"rounds scattered (robust CV {record.scatter:.0%} > {SCATTER_LIMIT:.0%}): "
            "something else ran on the device"
        )
    if record.shared_workers > 1:
        notes.append(
            f"{record.shared_workers} pytest-xdist workers shared this {record.backend} "
            "device while it was measured"
        )
    record.note = "; ".join(notes)


def oom_note(exc: BaseException, activity: Optional[str] = None) -> str:
    """The note of an oom record: what was running and what the library said (its type when
    it said nothing, as a bare MemoryError does)."""
    doing = f" while {activity}" if activity else ""
    return f"out of memory{doing}: {str(exc) or type(exc).__name__}"


def forget_frames(exc: BaseException) -> None:
    """Let go of the tensors an out-of-memory error's traceback holds (the failed call's
    frames keep its activations alive), so the memory freed right after really is free: the
    allocator's cache goes back to the driver and the next test's memory check sees it."""
    import traceback

    traceback.clear_frames(exc.__traceback__)


def is_oom(exc: BaseException, backend: Backend) -> bool:
    if isinstance(exc, backend.oom_errors()):
        return True
    # The Neuron runtime raises RuntimeError with the words in the message; SynapseAI's device
    # allocator says "[Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for size::…";
    # under a memory cap (RLIMIT_DATA) torch's CPU allocator says it can't allocate, and an
    # mmap of a checkpoint fails with ENOMEM ("Cannot allocate memory (12)").
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text
        for words in (
            "out of memory",
            "can't allocate memory",
            "cannot allocate memory",
            "module:pt_devmem allocation failed",
        )
    )
