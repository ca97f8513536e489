"""accelerate's big-model inference: ``from_pretrained(device_map="auto")``.

The seed posts' "accelerate bf16" rows: accelerate builds the model empty, sizes every layer,
and fills the device first, then host memory, then disk; hooks move offloaded weights onto the
device just before each layer runs. The ``offload`` option forces the host and disk paths on
a node where the model would fit (a CI box never holds a model too big for it), so their cost
is measured and gated like any other number.

The loader helpers shared with the bitsandbytes engines (they load the same way, through
``from_pretrained``) live here too: greedy generation through whatever hooks the loader
installed, and the bytes each placement holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Union

from ..backends.base import Backend
from ..errors import SkipWorkload, UsageError
from .base import Engine, LoadedModel, Prompt, TokenHook
from .hf_transformers import greedy_generate

if TYPE_CHECKING:
    from pathlib import Path

    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

#: Where the part of the model that does not stay on the device goes.
OFFLOAD = ("cpu", "disk")

#: torch device type -> the accelerate helper that says this accelerate knows the device
#: (None: every supported accelerate does). Neuron (``xla``) has no device_map placement.
_PLACES: dict[str, Optional[str]] = {
    "cpu": None,
    "cuda": None,
    "xpu": "is_xpu_available",
    "hpu": "is_hpu_available",
    "mps": "is_mps_available",
}

# "2GiB", "1.5 GB", "512MiB", "1000000B": the B is required, so accelerate's own reading of a
# lower-case "b" as bits can never differ from ours (we hand accelerate plain integers).
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(i?))?B\s*")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}

DeviceKey = Union[int, str]


def parse_bytes(value: Any) -> Optional[int]:
    """Bytes from an int or a size string like "2GiB" (KiB = 1024, KB = 1000); None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        return None
    number, prefix, binary = match.groups()
    scale = 1 if prefix is None else (1024 if binary else 1000) ** _POWERS[prefix.lower()]
    return int(float(number) * scale)


def parse_max_memory(value: Any) -> dict[DeviceKey, int]:
    """``engine_options["max_memory"]`` as accelerate takes it: device index or "cpu"/"mps" ->
    bytes. JSON object keys are strings, so "0" is device 0. UsageError names the bad entry."""
    if not isinstance(value, Mapping) or not value:
        raise UsageError(
            f"engine_options['max_memory']={value!r}: expected a dict of device -> bytes, "
            "e.g. {'0': '20GiB', 'cpu': '64GiB'}"
        )
    out: dict[DeviceKey, int] = {}
    for key, amount in value.items():
        if key in ("cpu", "mps"):
            device: DeviceKey = key
        elif isinstance(key, str) and key.isdigit():
            device = int(key)
        else:
            raise UsageError(
                f"engine_options['max_memory'] key {key!r}: expected a device index ('0', "
                "'1', ...), 'cpu' or 'mps'"
            )
        size = parse_bytes(amount)
        if size is None:
            raise UsageError(
                f"engine_options['max_memory'][{key!r}]={amount!r}: expected bytes as a "
                "non-negative int or a size like '2GiB' or '500MB'"
            )
        out[device] = size
    return out


def main_device(backend: Backend) -> DeviceKey:
    """The device this process runs on, as accelerate's max_memory names it."""
    if backend.torch_device in ("cpu", "mps"):
        return backend.torch_device
    import torch

    return int(getattr(torch, backend.torch_device).current_device())


def device_target(backend: Backend) -> str:
    """The whole model on this process's device (``device_map={"": ...}``)."""
    key = main_device(backend)
    return key if isinstance(key, str) else f"{backend.torch_device}:{key}"


def _tensor_bytes(tensors: Any, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if id(t) not in seen:  # tied weights (BLOOM's embeddings and lm_head) count once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def placed_bytes(model: Any, device_type: str) -> dict[str, int]:
    """Weight bytes per place ("cuda:0", "cpu", "disk"): accelerate's ``hf_device_map`` where
    it dispatched the model (device indices are of ``device_type``), else the device of the
    weights. Quantized parameters count their stored bytes (bitsandbytes packs two 4-bit
    weights into a uint8); offloaded ones (on the meta device) their size where they live."""
    seen: set[int] = set()
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        tensors = [*model.parameters(), *model.buffers()]
        place = str(tensors[0].device) if tensors else "cpu"
        return {place: _tensor_bytes(tensors, seen)}
    out: dict[str, int] = {}
    for name, device in device_map.items():
        try:
            part = model.get_submodule(name) if name else model
            tensors = [*part.parameters(), *part.buffers()]
        except AttributeError:  # a single parameter or buffer placed on its own
            try:
                tensors = [model.get_parameter(name)]
            except AttributeError:
                tensors = [model.get_buffer(name)]
        place = f"{device_type}:{device}" if isinstance(device, int) else str(device)
        out[place] = out.get(place, 0) + _tensor_bytes(tensors, seen)
    return out


def placement_text(places: Mapping[str, int]) -> str:
    from ..units import format_value

    return ", ".join(f"{place} {format_value(n, 'B')}" for place, n in places.items())


def stored_checkpoint(
    engine: str, store: CheckpointStore, model: ModelSpec, dtype: str, seed: int
) -> tuple[Path, str]:
    """``store.checkpoint``, where a checkpoint that fits neither the cache nor the disk is a
    skip: these engines load from a directory as users do, or not at all (the transformers
    engine can build seeded weights in memory instead; a loader cannot)."""
    try:
        return store.checkpoint(model, dtype, seed)
    except OSError as exc:
        raise SkipWorkload(f"engine {engine!r} loads from a checkpoint on disk: {exc}") from None


def dropper(store: CheckpointStore, directory: Path, *scratch: Path) -> Callable[[], None]:
    """``LoadedModel.close``: the checkpoint may be evicted and the scratch folders go, once
    the model is dropped (accelerate's disk offload reads the checkpoint until then)."""

    def close() -> None:
        store.unpin(directory)
        for folder in scratch:
            store.release(folder)

    return close


def timed_from_pretrained(
    backend: Backend, directory: Path, close: Callable[[], None], **kwargs: Any
) -> tuple[Any, float]:
    """``from_pretrained`` from ``directory`` between synchronized clock reads: (the model in
    eval mode, prepared for the backend; seconds). A load that fails runs ``close`` (the pin
    and scratch folders must not outlive it) and raises."""
    from transformers import AutoModelForCausalLM

    loader: Any = AutoModelForCausalLM  # transformers' decorated classmethods confuse mypy
    try:
        backend.synchronize()
        start = backend.clock()
        loaded = loader.from_pretrained(str(directory), local_files_only=True, **kwargs).eval()
        loaded = backend.prepare(loaded)
        backend.synchronize()
        return loaded, backend.clock() - start
    except BaseException:
        close()
        raise


def remote_code(model: ModelSpec) -> bool:
    """A registered model with its own modeling code (``trust_remote_code`` in the registry)."""
    return bool(getattr(model, "trust_remote_code", False))


def host_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class AccelerateEngine(Engine):
    name: ClassVar[str] = "accelerate"
    options: ClassVar[dict[str, tuple[type, ...]]] = {"max_memory": (dict,), "offload": (str,)}

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        offload = options.get("offload")
        if offload is not None and offload not in OFFLOAD:
            raise UsageError(
                f"engine_options['offload']={offload!r}: expected 'cpu' or 'disk' for engine "
                f"{self.name!r}"
            )
        if "max_memory" in options:
            parse_max_memory(options["max_memory"])

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        reason = backend.dtype_reason(spec.dtype)
        if reason:
            return reason
        if spec.devices > 1:
            return single_process_reason(self.name, spec.devices)
        device = backend.torch_device
        if device not in _PLACES:
            return (
                f"accelerate has no device_map placement for {backend.name} devices (torch "
                f"device {device!r})"
            )
        helper = _PLACES[device]
        if helper is not None:
            import accelerate.utils

            if not hasattr(accelerate.utils, helper):
                return (
                    f"accelerate {accelerate.__version__} cannot place models on "
                    f"{backend.name}: it has no {helper}() (pip install -U accelerate)"
                )
        if spec.options.get("offload") == "cpu" and device in ("cpu", "mps"):
            return (
                f"engine_options offload='cpu' on {backend.name} measures nothing: the weights "
                "are already in host memory (use offload='disk')"
            )
        return None

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:

        from .. import models

        directory, source = stored_checkpoint(self.name, store, model, spec.dtype, spec.seed)
        tdtype = models.torch_dtype(spec.dtype)
        budget = self.max_memory(directory, tdtype, spec.options, backend, remote_code(model))
        # Always given: accelerate goes on to disk whenever the budget runs out, and
        # from_pretrained refuses a map with "disk" in it without a folder.
        folder = store.scratch("accelerate-offload")
        close = dropper(store, directory, folder)
        loaded, load_time = timed_from_pretrained(
            backend,
            directory,
            close,
            device_map="auto",
            max_memory=budget,
            offload_folder=str(folder),
            trust_remote_code=remote_code(model),
            **models.dtype_kwargs(tdtype),
        )
        tokenizer, real = models.build_tokenizer(model)
        places = placed_bytes(loaded, backend.torch_device)
        return LoadedModel(
            model=loaded,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            # What the device holds: offloaded weights live in host memory or on disk.
            weight_bytes=sum(
                n for place, n in places.items() if place.split(":")[0] == backend.torch_device
            ),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note=self.note(places, spec.options),
            close=close,
        )

    def device_weight_bytes(self, model: ModelSpec, spec: WorkloadSpec) -> int:
        # With an offload target or a memory budget, accelerate places on the device only what
        # fits and the rest in host memory or on disk: a model larger than the device is the
        # point, so only the placement (the note) says how much stayed.
        if spec.options.get("offload") or spec.options.get("max_memory"):
            return 0
        return self.weight_bytes(model, spec.dtype)

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        return greedy_generate(loaded, prompt, new_tokens, hook)

    def max_memory(
        self,
        directory: Path,
        tdtype: Any,
        options: Mapping[str, Any],
        backend: Backend,
        trust_remote_code: bool = False,
    ) -> dict[DeviceKey, int]:
        """accelerate's ``max_memory`` for this load: this process's device (90 % of what is
        free, transformers' own default margin for activations) and host memory, so a
        ``devices=1`` workload never spreads over the node's other GPUs. ``offload`` caps the
        device at the largest layer plus half the rest, so about half the model goes to
        host memory ("cpu") or disk ("disk"; host memory then gets nothing). The user's
        ``max_memory`` entries win over all of it."""
        main = main_device(backend)
        user = parse_max_memory(options["max_memory"]) if "max_memory" in options else {}
        budget: dict[DeviceKey, int] = {}
        if main in ("cpu", "mps"):
            budget[main] = host_available()
        else:
            free = backend.usable_memory_bytes()
            if free is None:
                from accelerate.utils import get_max_memory

                free = int(get_max_memory()[main])
            budget[main] = int(free * 0.9)
            budget["cpu"] = host_available()
        offload = options.get("offload")
        if offload is not None and main not in user:
            budget[main] = offload_cap(directory, tdtype, trust_remote_code)
        if offload == "disk" and main not in ("cpu", "mps"):
            budget["cpu"] = 0
        budget.update(user)
        return budget

    @staticmethod
    def note(places: Mapping[str, int], options: Mapping[str, Any]) -> str:
        text = f"device_map=auto: {placement_text(places)}"
        if options.get("offload"):
            text += f" (offload={options['offload']!r})"
        return text


def offload_cap(directory: Path, tdtype: Any, trust_remote_code: bool = False) -> int:
    """Device bytes that leave about half the model to offload: the largest layer (accelerate
    keeps that much free on the main device to bring an offloaded layer back) plus half of
    the rest. Sized on an empty (meta) model with accelerate's own module sizes, so tied
    weights and no-split blocks count as accelerate counts them."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_max_layer_size
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import dtype_kwargs

    config = AutoConfig.from_pretrained(
        str(directory), local_files_only=True, trust_remote_code=trust_remote_code
    )
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, **dtype_kwargs(tdtype)
        )
    empty.tie_weights()
    sizes = compute_module_sizes(empty, dtype=tdtype)
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    layer, _ = get_max_layer_size(list(empty.named_children()), sizes, no_split)
    return int(layer + (sizes[""] - layer) // 2)


def single_process_reason(engine: str, devices: int) -> str:
    return (
        f"engine {engine!r} runs one process on one device; devices={devices} runs one rank "
        "per device here, and each rank would load the whole model (use deepspeed-inference "
        "or transformers for several devices)"
    )
