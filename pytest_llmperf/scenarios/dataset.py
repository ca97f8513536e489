"""Generation over a dataset of prompts (the Gaudi2 BLOOMZ post's second experiment,
reference 000): each prompt cut to its first ``prompt_tokens`` tokens (16), exactly
``new_tokens`` (50) greedy tokens per prompt, the prompts in batches of ``batch_size``.

One round is one pass over the whole dataset, device sync to device sync (``dataset_time_s``,
the headline); inside it every batch's generate call is timed too (``batch_latency_s``). Every
batch has the same width: rows are cut to ``prompt_tokens`` and shorter ones LEFT-padded (pad
token, attention mask 0), so a decoder-only model continues right after each prompt's last real
token and an accelerator compiles one shape; each row's real token count is recorded. The last
batch holds what is left (it may be smaller): it counts in the pass, its tokens and the output,
but not in ``batch_latency_s``, whose samples are full batches only (a smaller batch is a
different workload, a low outlier), unless the dataset is smaller than one batch.

Per-token stamps are off: a pass is many generate calls, whose first tokens make no one TTFT.
The produced length is checked every round, for every batch (exactly ``new_tokens`` per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..engines.base import Prompt
from ..errors import UsageError
from ..results import MetricValue
from .base import Call, Scenario
from .generate import check_context, output_digest

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engines.base import Engine, LoadedModel
    from ..measure import Timing
    from ..models import ModelSpec
    from ..results import Record
    from ..spec import WorkloadSpec

#: How many prompts, with their continuations, a record shows (summary.md, terminal notes).
SHOWN = 3


@dataclass
class DatasetInputs:
    """The encoded dataset: its batches on the device, and what the record needs of them."""

    batches: list[Prompt]
    #: Real (unpadded) prompt tokens of each prompt, in dataset order.
    counts: list[int]
    #: The first prompts' token ids as cut (no padding): what the record shows.
    shown_ids: list[list[int]]
    width: int
    backend: Backend
    #: Per pass (warm-up ones first), the seconds of each batch's generate call.
    batch_times: list[list[float]] = field(default_factory=list)


class DatasetScenario(Scenario):
    kind: ClassVar[str] = "generate_dataset"
    activity: ClassVar[str] = "generating over the dataset"
    main_metric: ClassVar[str] = "dataset_time_s"
    token_times: ClassVar[bool] = False

    def validate(self, spec: WorkloadSpec, model: ModelSpec) -> None:
        where = f"llmperf.{spec.kind}"
        if not spec.prompts:
            raise UsageError(f"{where}(prompts=...): no prompts")
        if spec.prompt is not None:
            raise UsageError(f"{where}: give prompts=[...], not prompt=")
        if spec.prompt_tokens is None:
            raise UsageError(f"{where}(prompt_tokens=...): expected a positive integer")
        check_context(spec, model, spec.prompt_tokens)

    def tokens_floor(self, spec: WorkloadSpec) -> int:
        # Every batch is exactly prompt_tokens wide, whatever the prompts encode to.
        return int(spec.prompt_tokens or 1)

    def runtime_bytes(self, model: ModelSpec, spec: WorkloadSpec, input_tokens: int) -> int:
        from .. import models

        largest = min(spec.batch_size, len(spec.prompts or ()))
        return models.generation_runtime_bytes(
            model, spec.dtype, largest, input_tokens, spec.new_tokens
        )

    def prepare(
        self, spec: WorkloadSpec, model: ModelSpec, loaded: LoadedModel, backend: Backend
    ) -> DatasetInputs:
        width = int(spec.prompt_tokens or 1)
        pad = getattr(loaded.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        rows = [
            self._cut(loaded.tokenizer, text, width, i) for i, text in enumerate(spec.prompts or ())
        ]
        batches = [
            _left_padded(rows[start : start + spec.batch_size], width, pad, backend)
            for start in range(0, len(rows), spec.batch_size)
        ]
        return DatasetInputs(
            batches=batches,
            counts=[len(r) for r in rows],
            shown_ids=rows[:SHOWN],
            width=width,
            backend=backend,
        )

    @staticmethod
    def _cut(tokenizer: Any, text: str, width: int, index: int) -> list[int]:
        ids = [int(t) for t in tokenizer(text)["input_ids"]][:width]
        if not ids:
            raise UsageError(
                f"llmperf.generate_dataset: prompt {index + 1} ({text[:40]!r}) encodes to no tokens"
            )
        return ids

    def input_tokens(self, inputs: DatasetInputs) -> int:
        return inputs.width

    def call(
        self, engine: Engine, loaded: LoadedModel, inputs: DatasetInputs, spec: WorkloadSpec
    ) -> Call:
        backend = inputs.backend

        def one_pass(_hook: Optional[Any]) -> list[Any]:
            times: list[float] = []
            inputs.batch_times.append(times)
            outputs = []
            for batch in inputs.batches:
                backend.synchronize()
                start = backend.clock()
                outputs.append(engine.generate(loaded, batch, spec.new_tokens, None))
                backend.synchronize()
                times.append(backend.clock() - start)
            return outputs

        return one_pass

    def produced(self, output: list[Any], inputs: DatasetInputs) -> int:
        """New tokens per row: the first batch whose count is off, else the common count."""
        counts = [int(out.shape[-1]) - inputs.width for out in output]
        return next((c for c in counts if c != counts[0]), counts[0]) if counts else 0

    def tokens_per_round(self, spec: WorkloadSpec, inputs: DatasetInputs) -> int:
        return len(inputs.counts) * spec.new_tokens

    def fill(
        self,
        record: Record,
        timing: Timing,
        inputs: DatasetInputs,
        loaded: LoadedModel,
        spec: WorkloadSpec,
        backend: Backend,
    ) -> None:
        record.workload["prompt_token_counts"] = list(inputs.counts)
        record.workload["batches"] = len(inputs.batches)
        rows = [row for out in timing.output for row in out[:, inputs.width :].tolist()]
        record.output_digest = output_digest(rows, loaded.weight_source)
        record.output_head = rows[0][:128]
        full = [b.input_ids.shape[0] == spec.batch_size for b in inputs.batches]
        if not any(full):  # the dataset is smaller than one batch: its one batch is the sample
            full = [True] * len(inputs.batches)
        passes = inputs.batch_times[-len(timing.e2e) :] if timing.e2e else []
        record.metrics["batch_latency_s"] = MetricValue.from_samples(
            "batch_latency_s", [t for times in passes for t, f in zip(times, full) if f]
        )
        record.generated_text = [
            {
                "prompt": decode(loaded.tokenizer, ids),
                "continuation": decode(loaded.tokenizer, rows[i]),
            }
            for i, ids in enumerate(inputs.shown_ids)
        ]


def _left_padded(rows: list[list[int]], width: int, pad: int, backend: Backend) -> Prompt:
    import torch

    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    device = backend.torch_device
    return Prompt(ids.to(device), mask.to(device), width)


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text for people; a tokenizer that cannot decode shows the ids."""
    method = getattr(tokenizer, "decode", None)
    if method is None:
        return " ".join(str(i) for i in ids)
    return str(method(ids, skip_special_tokens=True))
