"""One forward pass of an encoder (or a causal LM's prefill): reference 004's workload, the p95
latency of BERT, RoBERTa, DistilBERT, ALBERT and ViT at batch size 1 over sequence lengths
8 … 512 (``llmperf.forward``).

A round is one call of the model on a fixed input, device sync to device sync; no generate, no
tokenizer. Text models get exactly ``sequence_length`` token ids per row, drawn from the
vocabulary by a seeded generator (never the pad id, which RoBERTa's position ids treat as
padding), an attention mask of ones, and token type ids of zeros where the model's forward
takes them. Image models get ``pixel_values`` of (batch, channels, image_size, image_size) from
their config, seeded too; their sequence is the image's patches plus the class token, so a
``sequence_length`` for them is a usage error rather than a number that would change nothing.

Metrics: the rounds' median as ``latency_p50_s`` (with the samples, which the verdict's
statistics and --benchmark-json use) and ``latency_p95_s``/``latency_p99_s`` as single values
(:func:`percentile`), ``latency_p95_s`` the headline and gated. A forward record carries no
``e2e_latency_s``, ``ms_per_token`` or ``tokens_per_s``: nothing is generated, and a time per
input token would read as a decode speed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

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

#: Tokens per row when a test gives no ``sequence_length`` to a text model (reference 004's
#: middle length).
DEFAULT_SEQUENCE_LENGTH = 128


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 … 100) of ``samples`` by linear interpolation between the
    closest ranks: numpy's default ``"linear"`` method, ``statistics.quantiles(...,
    method="inclusive")``, Hyndman & Fan's type 7. The rank is ``(n − 1) · q / 100``; p0 is the
    minimum, p100 the maximum, p50 the median. With 100 rounds p95 lies between the 95th and
    96th smallest sample, p99 between the 99th and the largest."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q!r}: expected 0 … 100")
    ordered = sorted(float(s) for s in samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


@dataclass(frozen=True)
class ImageShape:
    channels: int
    size: int
    patch: int

    @property
    def tokens(self) -> int:
        """The encoder's sequence: one token per patch plus the class token."""
        return (self.size // self.patch) ** 2 + 1


def image_shape(model: ModelSpec) -> ImageShape:
    cfg = model.config_dict()
    size = int(cfg.get("image_size") or 224)
    return ImageShape(int(cfg.get("num_channels") or 3), size, int(cfg.get("patch_size") or size))


def sequence_length(spec: WorkloadSpec) -> int:
    """Tokens per row of a text model's input."""
    return spec.sequence_length or DEFAULT_SEQUENCE_LENGTH


def input_shape(spec: WorkloadSpec, model: ModelSpec) -> list[int]:
    if model.task == "image-encoder":
        image = image_shape(model)
        return [spec.batch_size, image.channels, image.size, image.size]
    return [spec.batch_size, sequence_length(spec)]


@dataclass
class ForwardInputs:
    """The keyword tensors of one call, on the device, and the sequence they make per row."""

    tensors: dict[str, Any]
    tokens: int
    shape: list[int]


class ForwardScenario(Scenario):
    kind: ClassVar[str] = "forward"
    activity: ClassVar[str] = "running a forward pass"
    main_metric: ClassVar[str] = "latency_p50_s"
    token_times: ClassVar[bool] = False
    engine_method: ClassVar[str] = "forward"
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "image-encoder")

    def validate(self, spec: WorkloadSpec, model: ModelSpec) -> None:
        if model.task == "image-encoder":
            if spec.sequence_length is not None:
                size = image_shape(model).size
                raise UsageError(
                    f"llmperf.forward(sequence_length={spec.sequence_length}): {spec.model} is "
                    f"an image encoder ({model.family}) whose input is one {size}×{size} image "
                    "per row; leave sequence_length out"
                )
            return
        length, limit = sequence_length(spec), model.max_tokens()
        if limit is not None and length > limit:
            raise UsageError(
                f"llmperf.forward(sequence_length={length}): {spec.model} takes at most {limit} "
                "tokens per sequence (its position embeddings)"
            )

    def describe(self, record: Record, spec: WorkloadSpec, model: ModelSpec) -> None:
        if model.task == "image-encoder":
            record.workload["image_size"] = image_shape(model).size
        else:
            record.workload["sequence_length"] = sequence_length(spec)
        record.workload["input_shape"] = input_shape(spec, model)

    def tokens_floor(self, spec: WorkloadSpec) -> int:
        return sequence_length(spec)

    def runtime_bytes(self, model: ModelSpec, spec: WorkloadSpec, input_tokens: int) -> int:
        from .. import models

        if model.task == "image-encoder":
            image = image_shape(model)
            tokens = image.tokens
            pixels = spec.batch_size * image.channels * image.size**2 * 4
        else:
            tokens, pixels = input_tokens, 0
        return models.forward_runtime_bytes(model, spec.dtype, spec.batch_size, tokens) + pixels

    def prepare(
        self, spec: WorkloadSpec, model: ModelSpec, loaded: LoadedModel, backend: Backend
    ) -> ForwardInputs:
        import torch

        from .. import models

        generator = torch.Generator().manual_seed(spec.seed)
        shape = input_shape(spec, model)
        device = backend.torch_device
        if model.task == "image-encoder":
            pixels = torch.randn(shape, generator=generator).to(models.torch_dtype(spec.dtype))
            return ForwardInputs(
                {"pixel_values": pixels.to(device)}, image_shape(model).tokens, shape
            )
        cfg = model.config_dict()
        vocab = model.shape().vocab_size
        pad = cfg.get("pad_token_id")
        low = pad + 1 if isinstance(pad, int) and 0 <= pad < vocab - 1 else 0
        ids = torch.randint(low, vocab, shape, generator=generator, dtype=torch.long)
        tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in _forward_parameters(loaded.model):
            tensors["token_type_ids"] = torch.zeros_like(ids)
        return ForwardInputs({k: v.to(device) for k, v in tensors.items()}, shape[1], shape)

    def input_tokens(self, inputs: ForwardInputs) -> int:
        return inputs.tokens

    def call(
        self, engine: Engine, loaded: LoadedModel, inputs: ForwardInputs, spec: WorkloadSpec
    ) -> Call:
        def one(hook: Optional[Any]) -> Any:
            return engine.forward(loaded, inputs.tensors)

        return one

    def tokens_per_round(self, spec: WorkloadSpec, inputs: Any) -> Optional[int]:
        return None  # nothing is generated: no ms_per_token, no tokens_per_s

    def fill(
        self,
        record: Record,
        timing: Timing,
        inputs: ForwardInputs,
        loaded: LoadedModel,
        spec: WorkloadSpec,
        backend: Backend,
    ) -> None:
        for q in (95, 99):
            name = f"latency_p{q}_s"
            record.metrics[name] = MetricValue(name, percentile(timing.e2e, q))


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (AttributeError, TypeError, ValueError):  # a wrapped forward without a signature
        return set()
