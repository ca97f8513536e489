"""Plain ``transformers`` on one device: generate, the reference other engines are read against,
and the forward pass of ``llmperf.forward`` (encoders built as the base ``AutoModel``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..backends.base import Backend
from .base import Engine, LoadedModel, Prompt, TokenHook

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec


@contextmanager
def token_stamps(model: Any, on_token: Optional[TokenHook]) -> Iterator[None]:
    """Call ``on_token`` after every forward pass of ``model`` inside the block.

    generate() runs one forward per new token (the prefill's forward yields the first), so the
    first call marks TTFT and the rest the decode steps. An instance-level ``forward`` wrapper
    costs one Python call per step; a stopping criterion or a forward hook costs an extra
    tensor op or torch's slow hook path per step, measurable on a tiny model (≈1% of e2e).
    ``functools.wraps`` keeps the signature generate() inspects (``logits_to_keep``). A
    ``forward`` already set on the instance (accelerate's dispatch hooks) is wrapped and
    restored, never dropped.
    """
    if on_token is None:
        yield
        return
    own = model.__dict__.get("forward")
    inner = model.forward

    @functools.wraps(inner)
    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        on_token()
        return out

    model.forward = timed_forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def greedy_kwargs(new_tokens: int, pad_token_id: Optional[int]) -> dict[str, Any]:
    """Exactly ``new_tokens`` greedy tokens: EOS cannot end a round early."""
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "use_cache": True,
        "eos_token_id": None,
        "pad_token_id": 0 if pad_token_id is None else pad_token_id,
    }


def greedy_generate(loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Any) -> Any:
    """transformers' greedy generate of exactly ``new_tokens``, stamped per token: the plain,
    accelerate, bitsandbytes and optimum-neuron engines all drive a model with transformers'
    ``generate`` and its per-token forward. accelerate's hooks set ``forward`` on the instance;
    token_stamps wraps that one, so offloaded layers are timed as they run."""
    import torch

    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    with torch.inference_mode(), token_stamps(loaded.model, hook):
        return loaded.model.generate(
            prompt.input_ids,
            attention_mask=prompt.attention_mask,
            **greedy_kwargs(new_tokens, pad),
        )


class TransformersEngine(Engine):
    name: ClassVar[str] = "transformers"
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "image-encoder")
    options: ClassVar[dict[str, tuple[type, ...]]] = {"checkpoint": (str,)}

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        reason = backend.dtype_reason(spec.dtype)
        if reason or spec.devices == 1:
            return reason
        from .. import models
        from ..execute import model_of

        # Several devices are transformers' own tensor parallelism, which needs the model's
        # tensor-parallel plan (BLOOM and GPT-2 have none; DeepSpeed-inference covers them).
        model = model_of(spec)
        if not models.has_tp_plan(model):
            return (
                f"{spec.model} on {spec.devices} devices: transformers has no tensor-parallel "
                f"plan for {model.family} models (use a DeepSpeed engine)"
            )
        return None

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        """``from_pretrained`` from a directory, as users load: the real checkpoint, or the
        seeded one the store writes once, so ``load_time_s`` is file I/O plus initialization.
        Seeded weights too large for the cache or the disk (a 70B shape on a small node) are
        built directly on the device instead, and the note says so."""
        from .. import models

        directory = spec.weights or spec.options.get("checkpoint")
        note, stored = "", None
        if directory is None and spec.devices == 1:
            try:
                path, stored = store.checkpoint(model, spec.dtype, spec.seed)
                directory = str(path)
            except OSError as exc:
                note = f"seeded weights built on the device, not loaded from disk: {exc}"
        backend.synchronize()
        start = backend.clock()
        loaded, source = models.build_model(
            model,
            spec.dtype,
            device=backend.torch_device,
            seed=spec.seed,
            checkpoint=directory,
            tensor_parallel=spec.devices > 1,
        )
        loaded = backend.prepare(loaded)
        backend.synchronize()
        load_time = backend.clock() - start
        # An encoder's forward takes ids drawn from its vocabulary (or pixels): no text to encode.
        tokenizer, real = (
            models.build_tokenizer(model, spec.options.get("checkpoint"))
            if model.task == "causal-lm"
            else (None, False)
        )
        return LoadedModel(
            model=loaded,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=stored or source,
            weight_bytes=self.weight_bytes(model, spec.dtype),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note=note,
        )

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        return greedy_generate(loaded, prompt, new_tokens, hook)

    def forward(self, loaded: LoadedModel, inputs: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            return loaded.model(**inputs)
