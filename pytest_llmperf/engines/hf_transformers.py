"""Plain ``transformers`` generate on one device: the reference other engines are read against."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from ..backends.base import Backend
from .base import Engine, LoadedModel, TokenHook


def token_criteria(on_token: Optional[TokenHook]) -> Any:
    """A stopping criterion that never stops and calls ``on_token`` after each new token.

    generate() evaluates stopping criteria once per decoding step, right after the step's
    token is appended, which is exactly where TTFT (first call) and TPOT (the rest) are read.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    if on_token is None:
        return StoppingCriteriaList()

    class _OnToken(StoppingCriteria):
        def __init__(self) -> None:
            self._false: Any = None

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            on_token()
            import torch

            if self._false is None or self._false.shape[0] != input_ids.shape[0]:
                self._false = torch.zeros(
                    input_ids.shape[0], dtype=torch.bool, device=input_ids.device
                )
            return self._false

    return StoppingCriteriaList([_OnToken()])


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


class TransformersEngine(Engine):
    name: ClassVar[str] = "transformers"

    def load(self, spec: Any, dtype: str, backend: Backend, devices: int) -> LoadedModel:
        from .. import models

        backend.synchronize()
        start = backend.clock()
        model, source = models.build_model(spec, dtype, device=backend.torch_device)
        model = backend.prepare(model)
        backend.synchronize()
        load_time = backend.clock() - start
        tokenizer, real = models.build_tokenizer(spec)
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            weight_bytes=spec.weight_bytes(dtype),
            load_time_s=load_time,
            dtype=dtype,
            devices=devices,
        )

    def generate(
        self,
        loaded: LoadedModel,
        input_ids: Any,
        attention_mask: Any,
        new_tokens: int,
        on_token: Optional[TokenHook],
    ) -> Any:
        import torch

        with torch.inference_mode():
            return loaded.model.generate(
                input_ids,
                attention_mask=attention_mask,
                stopping_criteria=token_criteria(on_token),
                **greedy_kwargs(new_tokens, getattr(loaded.tokenizer, "pad_token_id", None)),
            )
