"""The engine protocol: how a model is loaded and driven on a backend.

Engines are picked by id (``transformers``, ``accelerate``, ``bnb-int8``, …). Each lives in
its own module and imports its library only inside methods, so collecting tests stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from ..backends.base import Backend

TokenHook = Callable[[], None]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    real_tokenizer: bool
    weight_source: str
    weight_bytes: int
    load_time_s: float
    dtype: str
    devices: int = 1


class Engine:
    name: ClassVar[str] = ""

    def unsupported(self, backend: Backend, dtype: str, devices: int) -> Optional[str]:
        """Why this engine cannot run here (a skip reason), or None."""
        return backend.dtype_reason(dtype)

    def load(self, spec: Any, dtype: str, backend: Backend, devices: int) -> LoadedModel:
        raise NotImplementedError

    def generate(
        self,
        loaded: LoadedModel,
        input_ids: Any,
        attention_mask: Any,
        new_tokens: int,
        on_token: Optional[TokenHook],
    ) -> Any:
        """Greedy generation of exactly ``new_tokens``; returns prompt + new token ids."""
        raise NotImplementedError
