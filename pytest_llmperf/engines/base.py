"""The engine protocol: how a model is loaded and driven on a backend.

Engines are picked by id (``transformers``, ``accelerate``, ``bnb-int8``, …). Each lives in
its own module and imports its library only inside methods, so collecting tests stays cheap.
An engine owns what differs between engines: the dtypes it runs (quantized ones included), the
bytes its weights take, its memory need on a backend, the shapes it needs at load time (all in
the spec), and whether it can run here at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from ..backends.base import Backend

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..spec import WorkloadSpec

TokenHook = Callable[[], None]


@dataclass
class Prompt:
    """Token ids of one batch, on the device; ``tokens`` per row."""

    input_ids: Any
    attention_mask: Any
    tokens: int


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
    #: The dtypes this engine runs; another one is a usage error (not a skip): the test asked
    #: for a combination that cannot exist.
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        """Why this engine cannot run this workload on this node (a skip reason), or None."""
        return backend.dtype_reason(spec.dtype)

    def weight_bytes(self, model: ModelSpec, dtype: str) -> int:
        """Bytes the weights occupy over all devices."""
        return model.weight_bytes(dtype)

    def memory_need(self, model: ModelSpec, spec: WorkloadSpec, runtime_bytes: int) -> int:
        """Bytes the workload needs over all its devices: weights plus what the scenario needs
        to run (KV cache, activations). Engines with workspaces of their own add them."""
        return self.weight_bytes(model, spec.dtype) + runtime_bytes

    def load(self, model: ModelSpec, spec: WorkloadSpec, backend: Backend) -> LoadedModel:
        raise NotImplementedError

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        """Greedy generation of exactly ``new_tokens``; returns prompt + new token ids.
        ``hook`` (when given) is called once per new token, the first right after prefill."""
        raise NotImplementedError
