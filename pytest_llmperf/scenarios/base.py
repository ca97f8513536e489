"""The scenario protocol: one per workload kind (generate and load today; forward and dataset
kinds arrive with their suites).

A scenario knows what one call of its kind is and what comes out of it; everything around it
(resolving the model and engine, the memory check, loading, the timing loop, OOM handling) is
:func:`pytest_llmperf.execute.execute`, shared by every kind. The load kind is the one whose
workload *is* the loading: execute hands it its own load step instead (``load_rounds``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engines.base import Engine, LoadedModel
    from ..measure import Timing
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..results import Record
    from ..spec import WorkloadSpec

#: One call of the workload; given a per-token hook (or None) it returns the call's output.
Call = Callable[[Optional[Callable[[], None]]], Any]
#: execute's load step, from the checkpoint store given: drops the resident model, loads, keeps
#: the new one as the one resident; None when it ran out of memory (the record says so).
Loader = Callable[["CheckpointStore"], "Optional[LoadedModel]"]


class Scenario:
    kind: ClassVar[str] = ""
    #: What one call does, for messages ("out of memory while generating").
    activity: ClassVar[str] = "running"
    #: Loading is what this kind measures: execute loads nothing first and calls
    #: :meth:`load_rounds` instead of ``prepare``/``call``/``fill``.
    measures_load: ClassVar[bool] = False
    #: The metric execute fills from the rounds' times (what one round is, for this kind).
    main_metric: ClassVar[str] = "e2e_latency_s"
    #: One round is one generate call whose per-token hook marks TTFT and TPOT; a kind whose
    #: round is many calls (a dataset pass) turns it off (the token count is checked anyway).
    token_times: ClassVar[bool] = True
    #: The engine method one call runs (``Engine.implements``): an engine without it cannot run
    #: the kind, which is a usage error before anything loads. The load kind needs ``load`` only.
    engine_method: ClassVar[str] = "generate"
    #: The kinds of model (``ModelSpec.task``) this kind runs; another is a usage error naming
    #: the kind that runs it. Generating needs a causal LM; loading and a forward pass take any.
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm",)

    def validate(self, spec: WorkloadSpec, model: ModelSpec) -> None:
        """Usage errors that need no loaded model (raise errors.UsageError)."""

    def describe(self, record: Record, spec: WorkloadSpec, model: ModelSpec) -> None:
        """What the record's ``workload`` says that needs the model (a forward's input shape),
        on every record of the kind, a not-run or out-of-memory one too."""

    def tokens_floor(self, spec: WorkloadSpec) -> int:
        """The fewest input tokens per row the workload can have, before anything is encoded."""
        raise NotImplementedError

    def runtime_bytes(self, model: ModelSpec, spec: WorkloadSpec, input_tokens: int) -> int:
        """Device bytes the workload needs besides the weights (KV cache, activations)."""
        raise NotImplementedError

    def prepare(
        self, spec: WorkloadSpec, model: ModelSpec, loaded: LoadedModel, backend: Backend
    ) -> Any:
        """The inputs of one call, on the device; ``input_tokens(inputs)`` says their length."""
        raise NotImplementedError

    def input_tokens(self, inputs: Any) -> int:
        raise NotImplementedError

    def call(self, engine: Engine, loaded: LoadedModel, inputs: Any, spec: WorkloadSpec) -> Call:
        raise NotImplementedError

    def tokens_per_round(self, spec: WorkloadSpec, inputs: Any) -> Optional[int]:
        """New tokens one round generates over all its rows (for ms_per_token and
        tokens_per_s); None for a kind that generates none."""
        return spec.batch_size * spec.new_tokens

    def produced(self, output: Any, inputs: Any) -> Optional[int]:
        """Tokens the call produced, checked every round against the spec (None: not a
        token-producing kind)."""
        return None

    def fill(
        self,
        record: Record,
        timing: Timing,
        inputs: Any,
        loaded: LoadedModel,
        spec: WorkloadSpec,
        backend: Backend,
    ) -> None:
        """The kind's metrics from the timing (the common ones are filled by execute)."""
        raise NotImplementedError

    def load_rounds(
        self,
        spec: WorkloadSpec,
        engine: Engine,
        backend: Backend,
        store: CheckpointStore,
        record: Record,
        load: Loader,
    ) -> Optional[Timing]:
        """A kind that ``measures_load``: ``spec.rounds`` loads through ``load``, with the
        kind's metrics and note on ``record``; the Timing's rounds are the loads (execute adds
        the metrics every kind shares), None when a load ran out of memory."""
        raise NotImplementedError
