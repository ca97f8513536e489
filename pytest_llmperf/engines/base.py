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
    from ..models.store import CheckpointStore
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
    #: What the record's note should say about how the engine ran (kernel injection off and
    #: why, where the weights were placed); empty when there is nothing to say.
    note: str = ""
    #: Called when the model is dropped (scratch folders, process groups).
    close: Optional[Callable[[], None]] = None
    #: Seconds this load spent compiling the model ahead of time (optimum-neuron's export),
    #: kept out of ``load_time_s`` and recorded as ``compile_s``; None when nothing was
    #: compiled (a cache hit, or an engine that does not compile).
    compile_s: Optional[float] = None


class Engine:
    name: ClassVar[str] = ""
    #: The dtypes this engine runs; another one is a usage error (not a skip): the test asked
    #: for a combination that cannot exist.
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    #: The kinds of model (``ModelSpec.task``) this engine builds; another is a usage error.
    #: The quantizing, offloading and DeepSpeed engines build causal LMs only.
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm",)
    #: Engine options (``engine_options={...}``) this engine takes: name -> accepted types.
    #: Anything else is a usage error naming the option, before a model is built.
    options: ClassVar[dict[str, tuple[type, ...]]] = {}
    #: The engine can take the interpreter down (a native crash in its library): the ``auto``
    #: launcher runs it in a child process, so a crash is an ``error`` record, not a lost session.
    may_crash: ClassVar[bool] = False
    #: How ``devices > 1`` divides a decode step (``roofline.PARALLELISMS``): "tensor" — each
    #: device reads its share of the weights and KV heads; "data" — each rank reads every
    #: weight and generates its own batch. roofline_fraction counts the bytes per device so.
    parallelism: ClassVar[str] = "tensor"
    #: The engine's library drives all ``devices`` from one process (optimum-neuron: the
    #: tensor parallelism is compiled into its graph), so several devices need no rank group:
    #: the launchers run it as they run one device.
    one_process: ClassVar[bool] = False
    #: The rank-group launcher ``auto`` starts ``devices > 1`` under (``launchers.NAMES``):
    #: DeepSpeed's engines take DeepSpeed's (torchrun where DeepSpeed is not installed).
    launcher: ClassVar[str] = "torchrun"
    #: Modules ``load`` needs, imported before it: ``llmperf.load`` times their import apart
    #: (``import_s``), so a cold start's interpreter cost is not read as the engine's load time.
    #: Every built-in engine loads through transformers' ``from_pretrained``; most of its import
    #: is ``transformers.modeling_utils``, which ``import transformers`` alone defers. An engine
    #: whose own library is safe to import plainly adds it; one that is not (DeepSpeed picks its
    #: accelerator at import) imports it in ``load``.
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers", "transformers.modeling_utils")

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise UsageError naming an unknown option or one of the wrong type."""
        from ..errors import UsageError

        for name, value in options.items():
            if name not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise UsageError(
                    f"engine_options[{name!r}]: unknown option for engine {self.name!r} "
                    f"(known: {known})"
                )
            types = self.options[name]
            if isinstance(value, bool) and bool not in types:
                types = ()
            if not isinstance(value, types):
                want = " or ".join(t.__name__ for t in self.options[name])
                raise UsageError(
                    f"engine_options[{name!r}]={value!r}: expected {want} for engine {self.name!r}"
                )

    def implements(self, method: str) -> bool:
        """Whether this engine has its own ``method`` (``generate``, ``forward``): a workload
        kind whose scenario calls a method the engine lacks is a usage error, not a skip, as a
        dtype it does not run is: no hardware makes the combination exist. Only the plain
        transformers engine has :meth:`forward` today."""
        return getattr(type(self), method, None) is not getattr(Engine, method, None)

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        """Why this engine cannot run this workload on this node (a skip reason), or None."""
        return backend.dtype_reason(spec.dtype)

    def weight_bytes(self, model: ModelSpec, dtype: str) -> int:
        """Bytes the weights occupy over all devices."""
        return model.weight_bytes(dtype)

    def device_weight_bytes(self, model: ModelSpec, spec: WorkloadSpec) -> int:
        """The least of the weights this workload must hold on its devices: all of them,
        unless the engine offloads (to host memory or disk) what does not fit."""
        return self.weight_bytes(model, spec.dtype)

    def memory_need(self, model: ModelSpec, spec: WorkloadSpec, runtime_bytes: int) -> int:
        """Bytes the workload needs over all its devices: weights plus what the scenario needs
        to run (KV cache, activations). Engines with workspaces of their own add them."""
        return self.device_weight_bytes(model, spec) + runtime_bytes

    def static_shapes(self, spec: WorkloadSpec) -> tuple[Any, ...]:
        """The input shapes a loaded model is built for, when the engine compiles for fixed
        shapes (optimum-neuron: batch size and sequence length): a spec with other shapes gets
        a model of its own instead of the cached one. Empty: any shape runs."""
        return ()

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        """Load ``model`` for ``spec``; ``store`` gives a checkpoint directory to load from
        (``store.checkpoint``: the real one, or the seeded one written once) and scratch folders.
        Synchronize the backend around the timed part; ``load_time_s`` is that span."""
        raise NotImplementedError

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        """Greedy generation of exactly ``new_tokens``; returns prompt + new token ids.
        ``hook`` (when given) is called once per new token, the first right after prefill."""
        raise NotImplementedError

    def forward(self, loaded: LoadedModel, inputs: dict[str, Any]) -> Any:
        """One forward pass of the model on ``inputs`` (keyword tensors on the device: token ids
        and masks, or pixel values), without gradients; returns the model's output."""
        raise NotImplementedError
