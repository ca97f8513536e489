"""DeepSpeed ZeRO-Inference: ZeRO stage 3 partitions the weights over the ranks and offloads
them (to CPU by default, to NVMe with ``nvme_path``); every forward gathers a layer's weights
just before it runs (seed post 001's ``ds-zero`` row, and its CPU/NVMe offload runs).

The weights are partitioned while they load: transformers' ``from_pretrained`` builds the model
under ``deepspeed.zero.Init`` when a ``HfDeepSpeedConfig`` with stage 3 is alive, so no rank
ever holds the whole model. transformers keeps only a weak reference to that object: the engine
keeps it for as long as the model is loaded, and drops it on close (a later plain
``from_pretrained`` in the same worker would otherwise be partitioned too).

With several devices each rank generates its own batch from the partitioned weights, as the
post's script does, so ``tokens_per_s`` and ``ms_per_token`` are per rank (the record's note
says so); the ranks still step together (``synced_gpus``) because every forward gathers weights
from all of them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from ..backends.base import Backend
from ..errors import SkipWorkload, UsageError
from .base import Engine, LoadedModel, Prompt, TokenHook
from .deepspeed_inference import (
    accelerator_reason,
    checkpoint_dir,
    dtype_reason,
    ensure_process_group,
    import_deepspeed,
    install_reason,
    load_pretrained,
)
from .hf_transformers import greedy_kwargs, token_stamps

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

#: Where ZeRO-3 keeps the parameter partitions between forwards.
OFFLOAD = ("cpu", "nvme", "none")
#: DeepSpeed's default swap buffer (elements); a larger parameter needs a larger buffer.
_MIN_SWAP_BUFFER = 100_000_000


#: Where ``--llmperf-nvme-path`` reaches the engine, in this process and in its children: the
#: drive's mount point is the node's configuration, not part of the workload (nor of its key).
NVME_PATH_ENV = "LLMPERF_NVME_PATH"


def nvme_path(options: dict[str, Any]) -> Path:
    """The swap directory: the workload's own ``nvme_path``, else the node's."""
    return Path(options.get("nvme_path") or os.environ[NVME_PATH_ENV]).expanduser()


def _offload(options: dict[str, Any]) -> str:
    return str(options.get("offload") or ("nvme" if options.get("nvme_path") else "cpu"))


def aio_reason(accelerator: Any, prebuilt: bool) -> Optional[str]:
    """Why DeepSpeed's async-io op (NVMe swapping) cannot be used here, or None. ``prebuilt``:
    the op was built when DeepSpeed was installed (then only libaio.so is needed at run time,
    not the headers the compatibility probe compiles against)."""
    builder = accelerator.create_op_builder("AsyncIOBuilder")
    if builder is None or getattr(builder, "NAME", "") != "async_io":
        return f"DeepSpeed's {accelerator.device_name()} accelerator has no async_io op"
    if prebuilt or builder.is_compatible(verbose=False):
        return None
    return (
        "NVMe offload needs DeepSpeed's async_io op, which cannot be built here: libaio "
        "(headers and library) not found; install libaio-dev (apt) or libaio-devel (yum)"
    )


def swap_buffer_elements(model: ModelSpec) -> int:
    """ZeRO swaps whole parameters through buffers of this many elements: the largest weight
    (BLOOM-176B's embedding is 3.6e9; seed post 001 used 4e9)."""
    s = model.shape()
    largest = max(
        s.vocab_size * s.hidden_size,
        s.intermediate_size * s.hidden_size,
        3 * s.hidden_size * s.hidden_size,  # BLOOM's fused query_key_value
    )
    return max(_MIN_SWAP_BUFFER, largest)


def zero_config(
    model: ModelSpec, spec: WorkloadSpec, offload: str, swap: Optional[Path], pin: bool
) -> dict[str, Any]:
    """The ZeRO-3 inference config of seed post 001's script, for this workload."""
    hidden = model.shape().hidden_size
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        # Every parameter partitioned: small ones kept whole on each rank would make the
        # measured memory depend on a threshold, not on the model.
        "stage3_param_persistence_threshold": 0,
    }
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    elif offload == "nvme":
        zero["offload_param"] = {
            "device": "nvme",
            "nvme_path": str(swap),
            "pin_memory": pin,
            "buffer_size": swap_buffer_elements(model),
        }
    return {
        "zero_optimization": zero,
        "fp16": {"enabled": spec.dtype == "fp16"},
        "bf16": {"enabled": spec.dtype == "bf16"},
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _hf_deepspeed_config() -> tuple[Any, Callable[[], None]]:
    """(HfDeepSpeedConfig class, unset function) wherever this transformers keeps them."""
    try:
        from transformers.integrations.deepspeed import (
            HfDeepSpeedConfig,
            unset_hf_deepspeed_config,
        )
    except ImportError:  # transformers before the integrations package
        from transformers.deepspeed import (  # type: ignore[no-redef]
            HfDeepSpeedConfig,
            unset_hf_deepspeed_config,
        )
    return HfDeepSpeedConfig, unset_hf_deepspeed_config


class DeepSpeedZeroEngine(Engine):
    name: ClassVar[str] = "deepspeed-zero"
    #: ``offload``: cpu (default), nvme (with ``nvme_path``, a directory on the NVMe drive;
    #: giving ``nvme_path`` alone means nvme) or none (partitions stay on the devices).
    options: ClassVar[dict[str, tuple[type, ...]]] = {"offload": (str,), "nvme_path": (str,)}
    may_crash: ClassVar[bool] = True
    #: ``devices > 1`` under ``auto``: DeepSpeed's launcher (launchers/deepspeed.py).
    launcher: ClassVar[str] = "deepspeed"
    # Each rank gathers every partition for its own batch (see the module docstring).
    parallelism: ClassVar[str] = "data"

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        offload = options.get("offload")
        if offload is not None and offload not in OFFLOAD:
            raise UsageError(
                f"engine_options['offload']={offload!r}: expected one of {', '.join(OFFLOAD)} "
                f"for engine {self.name!r}"
            )
        nvme = options.get("nvme_path")
        if nvme is None:
            if offload == "nvme" and not os.environ.get(NVME_PATH_ENV):
                raise UsageError(
                    "engine_options['offload']='nvme' needs a directory on the NVMe drive: "
                    "--llmperf-nvme-path (the node's) or engine_options['nvme_path']"
                )
            return
        if offload not in (None, "nvme"):
            raise UsageError(
                f"engine_options['nvme_path'] is for offload='nvme', not offload={offload!r}"
            )
        path = Path(nvme).expanduser()
        if not path.is_dir():
            raise UsageError(f"engine_options['nvme_path']={nvme!r}: no such directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"engine_options['nvme_path']={nvme!r}: directory is not writable")

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        return (
            install_reason(self.name)
            or accelerator_reason(self.name, backend)
            or backend.dtype_reason(spec.dtype)
        )

    def device_weight_bytes(self, model: ModelSpec, spec: WorkloadSpec) -> int:
        # Offloaded, the devices hold one gathered layer at a time: a model larger than the
        # device is the point (seed post 001 ran BLOOM-176B from CPU and NVMe on one GPU).
        if _offload(spec.options) != "none":
            return 0
        return self.weight_bytes(model, spec.dtype)

    def memory_need(self, model: ModelSpec, spec: WorkloadSpec, runtime_bytes: int) -> int:
        # Every rank generates its own batch: KV cache and activations once per rank.
        return self.device_weight_bytes(model, spec) + runtime_bytes * spec.devices

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        from .. import models
        from ..models.store import CheckpointStore

        deepspeed, accelerator = import_deepspeed(self.name, backend)
        tdtype = models.torch_dtype(spec.dtype)
        offload = _offload(spec.options)
        reason = dtype_reason(self.name, accelerator, tdtype, spec.dtype)
        if offload == "nvme":
            installed = getattr(deepspeed.git_version_info, "installed_ops", {})
            reason = reason or aio_reason(accelerator, bool(installed.get("async_io")))
        if reason:
            raise SkipWorkload(reason if reason.startswith(self.name) else f"{self.name}: {reason}")
        directory, source = checkpoint_dir(model, spec, store, spec.dtype)
        ensure_process_group(deepspeed, backend)
        swap = None
        if offload == "nvme":
            # A fresh folder on the drive per load, so no swap file outlives its model.
            swap = CheckpointStore(nvme_path(spec.options)).scratch(self.name)
        config = zero_config(model, spec, offload, swap, pin=backend.torch_device != "cpu")
        hf_config_class, unset = _hf_deepspeed_config()
        unpin = functools.partial(store.unpin, directory)

        backend.synchronize()
        start = backend.clock()
        try:
            # Alive while the model is: transformers reads it through a weak reference.
            hf_config = hf_config_class(config)
            hf_model = load_pretrained(directory, tdtype)
            engine = deepspeed.initialize(model=hf_model, config_params=config)[0]
            engine.module.eval()
        except BaseException:
            _close(None, None, unset, swap, unpin)
            raise
        backend.synchronize()
        load_time = backend.clock() - start

        tokenizer, real = models.build_tokenizer(model)
        return LoadedModel(
            model=engine,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            weight_bytes=_resident_bytes(self.weight_bytes(model, spec.dtype), offload, backend),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note=_note(spec, offload, swap),
            # The partial holds hf_config: alive exactly as long as the model is loaded.
            close=functools.partial(_close, engine, hf_config, unset, swap, unpin),
        )

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        import torch

        engine = loaded.model
        pad = getattr(loaded.tokenizer, "pad_token_id", None)
        # generate() is the wrapped transformers model's: its forward runs once per token
        # (ZeRO's gather/release hooks fire around it inside Module.__call__).
        with torch.inference_mode(), token_stamps(engine.module, hook):
            return engine.module.generate(
                prompt.input_ids,
                attention_mask=prompt.attention_mask,
                # Every forward gathers weights from all ranks: no rank may stop early.
                synced_gpus=loaded.devices > 1,
                **greedy_kwargs(new_tokens, pad),
            )


def _close(
    engine: Any,
    hf_config: Any,
    unset: Callable[[], None],
    swap: Optional[Path],
    unpin: Callable[[], None],
) -> None:
    """Drop the model's DeepSpeed state (the engine's hooks, transformers' ZeRO-3 switch, the
    swap folder) and let the cache evict the checkpoint, which is never read again."""
    from ..models.store import CheckpointStore

    try:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    finally:
        unset()
        unpin()
        if swap is not None:
            CheckpointStore.release(swap)


def _resident_bytes(weights: int, offload: str, backend: Backend) -> int:
    """Weight bytes held in the backend's memory: all of them unless offloaded, and offloaded
    to cpu they still fill a CPU backend's memory."""
    if offload == "none" or (offload == "cpu" and backend.shared_memory):
        return weights
    return 0


def _note(spec: WorkloadSpec, offload: str, swap: Optional[Path]) -> str:
    where = {
        "cpu": "parameters offloaded to cpu",
        "nvme": f"parameters offloaded to NVMe ({swap})",
        "none": "parameters partitioned on the devices, no offload",
    }[offload]
    note = f"deepspeed-zero: ZeRO-3, {where}"
    if spec.devices > 1:
        note += (
            f"; each of the {spec.devices} ranks generated its own batch of {spec.batch_size} "
            "from the partitioned weights: tokens_per_s and ms_per_token are per rank (the "
            f"group's throughput is {spec.devices}x, as in seed post 001's ZeRO table)"
        )
    return note
