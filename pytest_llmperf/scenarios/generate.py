"""Greedy generation of exactly ``new_tokens`` per sequence (the BLOOMZ posts' workload).

TTFT and TPOT come from a per-token hook inside the very rounds that give e2e, so the three
describe the same calls; the output length is checked every round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..engines.base import Prompt
from ..errors import UsageError
from ..results import MetricValue
from .base import Call, Scenario

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engines.base import Engine, LoadedModel
    from ..measure import Timing
    from ..models import ModelSpec
    from ..results import Record
    from ..spec import WorkloadSpec


def output_digest(token_rows: Iterable[Iterable[int]], weight_source: str) -> str:
    h = hashlib.sha256(weight_source.encode())
    for row in token_rows:
        h.update(b"|" + ",".join(str(int(t)) for t in row).encode())
    return "sha256:" + h.hexdigest()


def check_context(spec: WorkloadSpec, model: ModelSpec, prompt_tokens: int) -> None:
    """A sequence longer than the model's positions fails deep inside generate (an index
    error in the position embedding): say so before any round runs."""
    limit = model.shape().max_positions
    if limit is not None and prompt_tokens + spec.new_tokens > limit:
        raise UsageError(
            f"llmperf.{spec.kind}(model={spec.model!r}): {prompt_tokens} prompt tokens + "
            f"{spec.new_tokens} new tokens exceed its context of {limit} positions; shorten the "
            "prompt or new_tokens"
        )


class GenerateScenario(Scenario):
    kind: ClassVar[str] = "generate"
    activity: ClassVar[str] = "generating"

    def validate(self, spec: WorkloadSpec, model: ModelSpec) -> None:
        if spec.new_tokens < 2:
            raise UsageError("llmperf.generate(new_tokens=...): at least 2 (TPOT needs two tokens)")
        if spec.prompt is not None and not spec.prompt:
            raise UsageError(
                "llmperf.generate(prompt=''): expected non-empty text (or leave it out and give "
                "prompt_tokens=N for N tokens of the shipped corpus)"
            )
        if spec.prompt_tokens is not None:
            check_context(spec, model, spec.prompt_tokens)

    def tokens_floor(self, spec: WorkloadSpec) -> int:
        from .. import models

        # Before the tokenizer exists the prompt's length is known only for the seed prompt; a
        # one-token prompt is the floor (the exact check follows the encoding).
        if spec.prompt_tokens:
            return spec.prompt_tokens
        return models.SEED_PROMPT_TOKENS if spec.prompt is None else 1

    def runtime_bytes(self, model: ModelSpec, spec: WorkloadSpec, input_tokens: int) -> int:
        from .. import models

        return models.generation_runtime_bytes(
            model, spec.dtype, spec.batch_size, input_tokens, spec.new_tokens
        )

    def prepare(
        self, spec: WorkloadSpec, model: ModelSpec, loaded: LoadedModel, backend: Backend
    ) -> Prompt:
        from .. import models

        text = spec.prompt
        if text is None and spec.prompt_tokens is None:
            text = models.SEED_PROMPT
        try:
            ids, mask, n = models.encode_prompt(
                loaded.tokenizer, loaded.real_tokenizer, text, spec.batch_size, spec.prompt_tokens
            )
        except ValueError as exc:
            raise UsageError(f"llmperf.generate(prompt=...): {exc}") from None
        check_context(spec, model, n)
        return Prompt(ids.to(backend.torch_device), mask.to(backend.torch_device), n)

    def input_tokens(self, inputs: Prompt) -> int:
        return inputs.tokens

    def call(self, engine: Engine, loaded: LoadedModel, inputs: Prompt, spec: WorkloadSpec) -> Call:
        def one(hook: Optional[Any]) -> Any:
            return engine.generate(loaded, inputs, spec.new_tokens, hook)

        return one

    def produced(self, output: Any, inputs: Prompt) -> int:
        return int(output.shape[-1]) - inputs.tokens

    def fill(
        self,
        record: Record,
        timing: Timing,
        inputs: Prompt,
        loaded: LoadedModel,
        spec: WorkloadSpec,
        backend: Backend,
    ) -> None:
        record.workload["prompt_tokens"] = inputs.tokens
        rows = timing.output[:, inputs.tokens :].tolist()
        record.output_digest = output_digest(rows, loaded.weight_source)
        record.output_head = rows[0][:128]
        record.metrics["ttft_s"] = MetricValue.from_samples("ttft_s", timing.ttft)
        record.metrics["tpot_s"] = MetricValue.from_samples("tpot_s", timing.tpot)
        fill_roofline(record, timing, inputs, loaded, spec, backend)


#: Below this share of its weights on the devices a model is offloaded (host memory, disk):
#: its decode steps wait on PCIe or the disk, which the device's bandwidth does not bound.
RESIDENT_SHARE = 0.9


def fill_roofline(
    record: Record,
    timing: Timing,
    inputs: Prompt,
    loaded: LoadedModel,
    spec: WorkloadSpec,
    backend: Backend,
) -> None:
    """roofline_fraction per round: (bytes a decode step reads per device ÷ the device's
    bandwidth) ÷ that round's tpot (see roofline.py). The bandwidth is the run's, from
    provenance (collected once in the pytest process); without one, the backend is asked."""
    from .. import engines, roofline
    from ..execute import model_of

    if not timing.tpot:
        return
    if "memory_bandwidth" in record.provenance:
        bandwidth = roofline.Bandwidth.from_json(record.provenance["memory_bandwidth"])
    else:
        bandwidth = backend.memory_bandwidth()
    if bandwidth is None:
        return  # unknown hardware: provenance says so, once per run
    engine = engines.get_engine(spec.engine)
    model = model_of(spec)
    full = engine.weight_bytes(model, spec.dtype)
    if loaded.weight_bytes < RESIDENT_SHARE * full:
        held = f"{loaded.weight_bytes / full:.0%}" if full else "none"
        note = (
            f"roofline_fraction not computed: {held} of the weights are on the device, the rest "
            "offloaded, so decode steps are not bound by the device's memory bandwidth"
        )
        record.note = "; ".join(filter(None, [record.note, note]))
        return
    step = roofline.decode_bytes(
        model,
        dtype=spec.dtype,
        resident_weight_bytes=loaded.weight_bytes,
        batch_size=spec.batch_size,
        prompt_tokens=inputs.tokens,
        new_tokens=spec.new_tokens,
        devices=spec.devices,
        parallelism=engine.parallelism,
    )
    # Ranks on one host's memory (CPU cores) share its bandwidth.
    per_device = bandwidth.bytes_per_s / (spec.devices if backend.shared_memory else 1)
    record.metrics["roofline_fraction"] = MetricValue.from_samples(
        "roofline_fraction",
        [roofline.fraction(step.total, per_device, t) for t in timing.tpot if t > 0],
    )
