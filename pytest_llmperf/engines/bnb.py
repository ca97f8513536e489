"""bitsandbytes quantization at load time: LLM.int8 (``bnb-int8``, the seed posts' "accelerate
int8" rows) and 4-bit NF4/FP4 (``bnb-4bit``, QLoRA's format).

The checkpoint on disk is 16-bit (fp16 for int8, which computes in fp16; the compute dtype for
4-bit) and ``from_pretrained(quantization_config=...)`` quantizes the Linear layers of the
blocks while loading, as users do; so ``load_time_s`` includes the quantization.

Whether bitsandbytes can run here is decided from its installed version and the device, never
by importing it: its native library is loaded at import, and a broken build can take the
process down (the engines declare ``may_crash``; the auto launcher then runs them in a child,
but ``unsupported`` runs in the parent).
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..backends.base import Backend
from ..errors import UsageError
from .accelerate import (
    device_target,
    dropper,
    placed_bytes,
    remote_code,
    single_process_reason,
    stored_checkpoint,
    timed_from_pretrained,
)
from .base import Engine, LoadedModel, Prompt, TokenHook
from .hf_transformers import greedy_generate

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

PACKAGE = "bitsandbytes"
#: The ``[bnb]`` extra's floor (pyproject.toml): the first release this plugin ran on CUDA.
FLOOR = "0.43"
#: The first release whose support table (bitsandbytes' README) marks LLM.int8 and 4-bit as
#: supported on each torch device type: 0.46 had "partial" CPU support, 0.47 full; Intel GPUs
#: and Gaudi arrived in 0.48, Apple's MPS in 0.49. Other devices (Neuron's xla) have none.
DEVICE_FLOOR = {"cuda": "0.43", "cpu": "0.47", "xpu": "0.48", "hpu": "0.48", "mps": "0.49"}
#: Gaudi's 4-bit kernel dequantizes NF4 only (bitsandbytes/backends/hpu/ops.py raises on fp4).
_HPU_QUANT_TYPES = ("nf4",)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")

# bitsandbytes' packed CPU 4-bit kernel (used where the CPU has AVX512-BF16) asserts that a
# layer's output features are a multiple of 32 and its input features of the quantization
# block size (bitsandbytes/functional.py, _convert_weight_packed_for_cpu); tiny-llama's MLP
# (176 wide) fails it. Such layers are sent down bitsandbytes' generic path instead.
_PACK_ROWS = 32


def installed_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def _transformers_floor() -> Optional[str]:
    """The bitsandbytes version transformers' own quantizer demands (0.46.1 in 5.x), if any."""
    try:
        from transformers.utils import import_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    floor = getattr(import_utils, "BITSANDBYTES_MIN_VERSION", None)
    return floor if isinstance(floor, str) else None


def _cpu_lacks_avx2() -> bool:
    """bitsandbytes' x86-64 CPU build needs AVX2 (its installation guide); read from the
    kernel's flags, so nothing native is loaded to find out."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx2" not in line.split()
    except OSError:
        return False
    return False


class _BitsAndBytesEngine(Engine):
    """What both bitsandbytes engines share: the support checks, the load and the note."""

    #: bitsandbytes takes ~2 s to import (it probes its native backends); a load-time record
    #: counts that in ``import_s``, not in the engine's load.
    libraries: ClassVar[tuple[str, ...]] = (*Engine.libraries, "bitsandbytes")

    may_crash: ClassVar[bool] = True

    def storage_dtype(self, options: dict[str, Any]) -> str:
        """The dtype of the checkpoint on disk and of the layers left unquantized."""
        raise NotImplementedError

    def quantization(self, options: dict[str, Any]) -> Any:
        """The transformers ``BitsAndBytesConfig`` for ``options``."""
        raise NotImplementedError

    def describe(self, options: dict[str, Any]) -> str:
        raise NotImplementedError

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        if spec.devices > 1:
            return single_process_reason(self.name, spec.devices)
        found = installed_version()
        if found is None:
            return (
                f"{self.name} needs {PACKAGE} ≥ {FLOOR} (pip install 'pytest-llmperf[bnb]'); "
                "it is not installed"
            )
        device = backend.torch_device
        if device not in DEVICE_FLOOR:
            return (
                f"{self.name} does not run on {backend.name}: {PACKAGE} has no kernels for "
                f"torch device {device!r} (it runs on {', '.join(sorted(DEVICE_FLOOR))})"
            )
        from packaging.version import InvalidVersion, Version

        floors = [DEVICE_FLOOR[device], _transformers_floor() or FLOOR]
        need = max(floors, key=Version)
        try:
            too_old = Version(found) < Version(need)
        except InvalidVersion:
            too_old = False  # a local build ("0.51.0.dev0+abc") is the user's to vouch for
        if too_old:
            return (
                f"{self.name} on {backend.name} needs {PACKAGE} ≥ {need} "
                f"(pip install -U '{PACKAGE}>={need}'); {found} is installed"
            )
        if device == "cpu" and _cpu_lacks_avx2():
            return f"{self.name} on cpu needs AVX2 ({PACKAGE}'s CPU build); this CPU lacks it"
        storage = self.storage_dtype(spec.options)
        reason = backend.dtype_reason(storage)
        if reason:
            return f"{self.name} keeps unquantized layers in {storage}: {reason}"
        return None

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:

        from .. import models

        options = spec.options
        storage = self.storage_dtype(options)
        directory, source = stored_checkpoint(self.name, store, model, storage, spec.seed)
        close = dropper(store, directory)
        loaded, load_time = timed_from_pretrained(
            backend,
            directory,
            close,
            quantization_config=self.quantization(options),
            device_map={"": device_target(backend)},
            trust_remote_code=remote_code(model),
            **models.dtype_kwargs(models.torch_dtype(storage)),
        )
        generic = _avoid_packed_cpu_kernel(loaded) if backend.torch_device == "cpu" else 0
        tokenizer, real = models.build_tokenizer(model)
        places = placed_bytes(loaded, backend.torch_device)
        return LoadedModel(
            model=loaded,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            weight_bytes=sum(places.values()),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note=self.note(loaded, options, storage, generic),
            close=close,
        )

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        return greedy_generate(loaded, prompt, new_tokens, hook)

    def note(self, model: Any, options: dict[str, Any], storage: str, generic: int) -> str:
        quantized = sum(1 for m in model.modules() if _is_bnb_linear(m))
        text = (
            f"{PACKAGE} {installed_version()}: {quantized} linear layers in "
            f"{self.describe(options)}, the rest in {storage}"
        )
        if generic:
            text += (
                f"; {generic} of them on {PACKAGE}' generic CPU path (shapes its packed "
                "AVX512-BF16 kernel rejects)"
            )
        return text


def _is_bnb_linear(module: Any) -> bool:
    return type(module).__name__ in ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")


def _avoid_packed_cpu_kernel(model: Any) -> int:
    """Turn bitsandbytes' packed CPU 4-bit kernel off for layers it cannot take; returns how
    many. Its flag is read on every forward, so this holds for the whole model's life."""
    count = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        block = getattr(state, "blocksize", None) or 1
        if module.out_features % _PACK_ROWS or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


class BnbInt8Engine(_BitsAndBytesEngine):
    """LLM.int8: int8 weights with fp16 outlier columns (threshold 6.0, bitsandbytes' default),
    computing in fp16."""

    name: ClassVar[str] = "bnb-int8"
    dtypes: ClassVar[tuple[str, ...]] = ("int8",)

    def storage_dtype(self, options: dict[str, Any]) -> str:
        return "fp16"

    def quantization(self, options: dict[str, Any]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)

    def describe(self, options: dict[str, Any]) -> str:
        return "int8 (LLM.int8)"


class Bnb4bitEngine(_BitsAndBytesEngine):
    """4-bit weights (NF4 by default, or FP4) dequantized per block into ``compute_dtype``;
    ``double_quant`` also quantizes the per-block scales (QLoRA's setting)."""

    name: ClassVar[str] = "bnb-4bit"
    dtypes: ClassVar[tuple[str, ...]] = ("int4",)
    options: ClassVar[dict[str, tuple[type, ...]]] = {
        "quant_type": (str,),
        "compute_dtype": (str,),
        "double_quant": (bool,),
    }

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        for name, allowed in (("quant_type", QUANT_TYPES), ("compute_dtype", COMPUTE_DTYPES)):
            value = options.get(name)
            if value is not None and value not in allowed:
                raise UsageError(
                    f"engine_options[{name!r}]={value!r}: expected one of "
                    f"{', '.join(allowed)} for engine {self.name!r}"
                )

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        reason = super().unsupported(backend, spec)
        if reason:
            return reason
        quant_type = spec.options.get("quant_type", "nf4")
        if backend.torch_device == "hpu" and quant_type not in _HPU_QUANT_TYPES:
            return (
                f"{self.name} quant_type={quant_type!r} does not run on hpu: {PACKAGE}'s Gaudi "
                "kernel dequantizes nf4 only"
            )
        return None

    def memory_need(self, model: ModelSpec, spec: WorkloadSpec, runtime_bytes: int) -> int:
        need = super().memory_need(model, spec, runtime_bytes)
        if self.storage_dtype(spec.options) == "fp32":
            # The catalog's int4 size keeps unquantized layers in 16 bit; fp32 doubles them.
            parts = model.param_breakdown()
            need += (parts["embedding"] + parts["norm"] + parts["bias"]) * 2
        return need

    def storage_dtype(self, options: dict[str, Any]) -> str:
        return str(options.get("compute_dtype", "bf16"))

    def quantization(self, options: dict[str, Any]) -> Any:
        from transformers import BitsAndBytesConfig

        from .. import models

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.get("quant_type", "nf4"),
            bnb_4bit_compute_dtype=models.torch_dtype(self.storage_dtype(options)),
            bnb_4bit_use_double_quant=bool(options.get("double_quant", False)),
        )

    def describe(self, options: dict[str, Any]) -> str:
        double = ", double quant" if options.get("double_quant") else ""
        return f"{options.get('quant_type', 'nf4')} (compute {self.storage_dtype(options)}{double})"
