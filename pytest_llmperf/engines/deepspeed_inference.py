"""DeepSpeed-inference: ``deepspeed.init_inference`` with tensor parallelism (AutoTP) over the
workload's devices, and DeepSpeed's fused kernels where they can run (seed post 001's
``ds-inference fp16/int8`` rows).

What can run where is decided from the installed DeepSpeed, not assumed:

- Kernel injection (``replace_with_kernel_inject``) needs the accelerator's
  ``transformer_inference`` op, a DeepSpeed policy for the model's layers, a dtype the policy
  runs (BLOOM: fp16 only, as in DeepSpeed's own tests) and a transformers release whose
  ``generate`` still accepts the tuple KV cache the injected layers return (before 4.36, when
  caches became ``Cache`` objects; DeepSpeed issue #5388 is still open). Otherwise injection is
  off and the record's note says why: the numbers are AutoTP on plain transformers layers.
- int8 is quantized inside the injected kernels, so it needs injection and an accelerator whose
  ``supported_dtypes()`` lists ``torch.int8``.
- On the cpu backend, AutoTP with two ranks died with SIGSEGV in DeepSpeed's shared-memory
  ``inference_all_reduce`` (DeepSpeed 0.19.8, gloo, 2-core AVX-512 host): several devices on CPU
  are refused with that reason, so a CPU CI stays green instead of losing a rank group.

DeepSpeed is imported only by :meth:`load` (in the process that runs the workload: by default a
child, ``may_crash``); what the pytest process decides beforehand (:meth:`unsupported`) reads
the package metadata only. The helpers DeepSpeed-ZeRO shares live here too.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from ..backends.base import Backend
from ..errors import SkipWorkload, UsageError
from .base import Engine, LoadedModel, Prompt, TokenHook
from .hf_transformers import greedy_kwargs, token_stamps

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

#: The oldest DeepSpeed these engines are written against (the ``deepspeed`` extra's floor).
MIN_DEEPSPEED = "0.14"
INSTALL_HINT = "pip install 'pytest-llmperf[deepspeed]'"

#: DeepSpeed's accelerator (``DS_ACCELERATOR``) for each torch device a backend runs on; a
#: backend missing here (Neuron's ``xla``) has no DeepSpeed accelerator at all.
ACCELERATORS = {"cpu": "cpu", "cuda": "cuda", "hpu": "hpu", "xpu": "xpu", "mps": "mps"}

#: DeepSpeed's kernel-injection policy for each catalog family (module_inject.replace_policy).
KERNEL_POLICIES = {
    "bloom": "BLOOMLayerPolicy",
    "gpt2": "HFGPT2LayerPolicy",
    "llama": "LLAMALayerPolicy",
}
#: transformers 4.36 moved KV caches to ``Cache`` objects; injected layers still return tuples.
KERNEL_INJECT_TRANSFORMERS_BELOW = (4, 36)

CPU_TP_CRASH = (
    "DeepSpeed AutoTP over {n} ranks on the cpu backend is not supported: it died with SIGSEGV "
    "in DeepSpeed's shared-memory inference_all_reduce (DeepSpeed 0.19.8, gloo)"
)


# -- shared with deepspeed_zero -----------------------------------------------------------------


def install_reason(engine: str) -> Optional[str]:
    """Why DeepSpeed cannot be used, read from its package metadata (no import): the pytest
    process decides skips without paying DeepSpeed's import or taking on its global state."""
    import importlib.util
    from importlib import metadata

    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):  # a half-imported module in sys.modules
        found = False
    if not found:
        return f"{engine} needs deepspeed>={MIN_DEEPSPEED}, which is not installed ({INSTALL_HINT})"
    try:
        version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:  # a source checkout on sys.path: trust it
        return None
    if _version_tuple(version) < _version_tuple(MIN_DEEPSPEED):
        return f"{engine} needs deepspeed>={MIN_DEEPSPEED}, found {version} ({INSTALL_HINT})"
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def accelerator_reason(engine: str, backend: Backend) -> Optional[str]:
    if backend.torch_device not in ACCELERATORS:
        return f"{engine}: DeepSpeed has no accelerator for the {backend.name} backend"
    return None


@contextlib.contextmanager
def env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the variables not already set, for the block only (DeepSpeed reads
    ``DS_ACCELERATOR`` once, at import; children must not inherit the choice)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def import_deepspeed(engine: str, backend: Backend) -> tuple[Any, Any]:
    """(deepspeed, its accelerator) for ``backend``; SkipWorkload when DeepSpeed is missing,
    cannot be imported (the error's first line) or already runs another accelerator here.

    DeepSpeed picks its accelerator once per process, at import; on a CUDA node the cpu backend
    would otherwise get the GPU, so ``DS_ACCELERATOR`` is set for the import unless the user set
    it.
    """
    reason = install_reason(engine) or accelerator_reason(engine, backend)
    if reason:
        raise SkipWorkload(reason)
    wanted = ACCELERATORS[backend.torch_device]
    with env_defaults({"DS_ACCELERATOR": wanted}):
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
        except Exception as exc:  # a broken install raises anything at import
            lines = str(exc).strip().splitlines()
            raise SkipWorkload(
                f"{engine}: deepspeed is installed but cannot be imported: "
                f"{type(exc).__name__}: {lines[0] if lines else ''}"
            ) from None
    running = accelerator.device_name()
    if running != wanted:
        raise SkipWorkload(
            f"{engine}: DeepSpeed already runs its {running!r} accelerator in this process (it "
            f"picks one per process), this workload runs on {backend.name}: use "
            f"launcher='process' or DS_ACCELERATOR={wanted}"
        )
    import logging

    # DeepSpeed logs every config key at INFO; in a child those lines would push the crash
    # itself out of the stderr tail an error record keeps.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed, accelerator


def dtype_reason(engine: str, accelerator: Any, dtype: Any, name: str) -> Optional[str]:
    """DeepSpeed refuses a dtype its accelerator does not list (fp16 on a CPU without oneDNN
    fp16): a skip before the model is loaded, not a ValueError after."""
    supported = list(accelerator.supported_dtypes())
    if dtype in supported:
        return None
    runs = ", ".join(str(d).replace("torch.", "") for d in supported)
    return (
        f"{engine}: DeepSpeed's {accelerator.device_name()} accelerator runs {runs} on this "
        f"machine, not {name}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_process_group(deepspeed: Any, backend: Backend) -> None:
    """DeepSpeed's collectives need a process group even for one process.

    Under the torchrun launcher the group exists (``launchers.torchrun.init_rank``) and
    DeepSpeed only wraps it. A single process starts its own over the backend's distributed
    backend (gloo on CPU) at a free local port; the rendezvous variables stay set for the
    process, because ZeRO's partitioned init reads ``LOCAL_RANK`` at every load. Variables
    inherited from a parent that ran a group of its own are replaced: its port is its group's.
    The first start on a machine JIT-builds DeepSpeed's shared-memory comm op (~30 s, cached in
    ~/.cache/torch_extensions), which is why this runs before a load's clock starts.
    """
    import torch.distributed as dist

    # WORLD_SIZE > 1 without a group: an outside launcher (deepspeed, mpirun) set the
    # rendezvous, and init_distributed follows it.
    started = dist.is_available() and dist.is_initialized()
    if not started and os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
        # A group this process started is ended at its exit: NCCL warns about (and may leak)
        # one that is not.
        atexit.register(_end_group)
    deepspeed.init_distributed(dist_backend=backend.distributed_backend)
    # DeepSpeed probes every op's compatibility (compiler runs, a few seconds) on first use,
    # once per process: not part of any model's load time.
    getattr(deepspeed.ops, "__compatible_ops__", None)


def _end_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_dir(
    model: ModelSpec, spec: WorkloadSpec, store: CheckpointStore, dtype: str
) -> tuple[Path, str]:
    """(directory, weight source) the library's own loader reads, so load_time_s is real I/O.

    A launcher that wrote the weights for its ranks names them in ``spec.weights``; otherwise
    the store gives the real checkpoint or the seeded one (written once).
    """
    from ..models import weights

    if spec.weights:
        directory = Path(spec.weights)
        if (directory / weights.SEEDED_MARKER).is_file():
            return directory, weights.seeded_source(directory)
        return directory, f"checkpoint:{directory}@{weights.checkpoint_fingerprint(directory)}"
    try:
        return store.checkpoint(model, dtype, spec.seed)
    except OSError as exc:
        raise SkipWorkload(str(exc)) from None


def load_pretrained(directory: Path, tdtype: Any) -> Any:
    """``from_pretrained`` on the host, in eval mode; DeepSpeed moves (or partitions) it."""
    from transformers import AutoModelForCausalLM

    from ..models import dtype_kwargs

    # Typed as Any: transformers' decorated from_pretrained confuses type checkers.
    loader: Any = AutoModelForCausalLM
    return loader.from_pretrained(str(directory), local_files_only=True, **dtype_kwargs(tdtype))


# -- kernel injection ---------------------------------------------------------------------------


def kernel_inject_reason(
    accelerator: Any,
    family: str,
    dtype: str,
    transformers_version: str,
    policies: Optional[Callable[[], Iterable[str]]] = None,
) -> Optional[str]:
    """Why DeepSpeed's kernel injection cannot run this model here, or None when it can.

    ``policies`` gives the names of DeepSpeed's kernel-injection policies (default: its
    ``replace_policies``), so a DeepSpeed release that drops one is noticed.
    """
    builder = accelerator.create_op_builder("InferenceBuilder")
    if builder is None or getattr(builder, "NAME", "") != "transformer_inference":
        return (
            f"DeepSpeed's {accelerator.device_name()} accelerator has no transformer_inference "
            "kernels"
        )
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed's transformer_inference op cannot be built on this machine"
    if KERNEL_POLICIES.get(family) not in set((policies or policy_names)()):
        return f"DeepSpeed has no kernel-injection policy for {family} models"
    if family == "bloom" and dtype != "fp16":
        return f"DeepSpeed's BLOOM kernels run fp16 only, not {dtype}"
    if _version_tuple(transformers_version)[:2] >= KERNEL_INJECT_TRANSFORMERS_BELOW:
        return (
            f"transformers {transformers_version} (≥ 4.36) keeps KV caches in Cache objects and "
            "DeepSpeed's injected layers return tuples (DeepSpeed issue #5388)"
        )
    return None


def policy_names() -> list[str]:
    try:
        from deepspeed.module_inject.replace_policy import replace_policies
    except ImportError:
        return []
    return [policy.__name__ for policy in replace_policies]


class DeepSpeedInferenceEngine(Engine):
    name: ClassVar[str] = "deepspeed-inference"
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16", "int8")
    #: ``kernel_inject``: True requires DeepSpeed's kernels (a skip saying why where they cannot
    #: run), False turns them off; absent, they are used wherever they can run.
    options: ClassVar[dict[str, tuple[type, ...]]] = {"kernel_inject": (bool,)}
    may_crash: ClassVar[bool] = True
    #: ``devices > 1`` under ``auto``: DeepSpeed's launcher (launchers/deepspeed.py).
    launcher: ClassVar[str] = "deepspeed"

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        if spec.dtype == "int8" and spec.options.get("kernel_inject") is False:
            raise UsageError(
                "engine_options['kernel_inject']=False: deepspeed-inference quantizes int8 inside "
                "the injected kernels; drop the option or ask for another dtype"
            )
        reason = install_reason(self.name) or accelerator_reason(self.name, backend)
        if reason:
            return reason
        if backend.torch_device == "cpu":
            if spec.devices > 1:
                return CPU_TP_CRASH.format(n=spec.devices)
            if spec.dtype == "int8":
                return (
                    "deepspeed-inference int8 is quantized inside DeepSpeed's injected "
                    "transformer_inference kernels, which its cpu accelerator does not implement"
                )
        # int8 weights come from an fp16 model: that is the dtype the backend must run.
        return backend.dtype_reason("fp16" if spec.dtype == "int8" else spec.dtype)

    def _kernel_inject(
        self, accelerator: Any, model: ModelSpec, spec: WorkloadSpec, transformers_version: str
    ) -> Optional[str]:
        """None to inject DeepSpeed's kernels, else why not (for the note); SkipWorkload when
        the workload needs them (int8, ``kernel_inject=True``) and they cannot run."""
        asked = spec.options.get("kernel_inject")
        if asked is False:
            return "kernel_inject=False"
        int8 = spec.dtype == "int8"
        reason = kernel_inject_reason(
            accelerator, model.family, "fp16" if int8 else spec.dtype, transformers_version
        )
        if reason and (asked or int8):
            why = "int8 needs it" if int8 else "kernel_inject=True"
            raise SkipWorkload(f"{self.name}: kernel injection ({why}) cannot run: {reason}")
        return reason

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        import torch
        import transformers

        from .. import models

        deepspeed, accelerator = import_deepspeed(self.name, backend)
        int8 = spec.dtype == "int8"
        build = "fp16" if int8 else spec.dtype
        tdtype = torch.int8 if int8 else models.torch_dtype(spec.dtype)
        reason = dtype_reason(self.name, accelerator, tdtype, spec.dtype)
        if reason:
            raise SkipWorkload(reason)
        inject_reason = self._kernel_inject(accelerator, model, spec, transformers.__version__)
        directory, source = checkpoint_dir(model, spec, store, build)
        ensure_process_group(deepspeed, backend)

        backend.synchronize()
        start = backend.clock()
        hf_model = load_pretrained(directory, models.torch_dtype(build)).eval()
        engine = deepspeed.init_inference(
            hf_model,
            dtype=tdtype,
            tensor_parallel={"tp_size": spec.devices},
            replace_with_kernel_inject=inject_reason is None,
        )
        backend.synchronize()
        load_time = backend.clock() - start

        tokenizer, real = models.build_tokenizer(model)
        notes = [
            "kernel injection on"
            if inject_reason is None
            else f"kernel injection off: {inject_reason}"
        ]
        if spec.devices > 1:
            notes.append(f"AutoTP over {spec.devices} ranks")
        return LoadedModel(
            model=engine,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            weight_bytes=self.weight_bytes(model, spec.dtype),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note="deepspeed-inference: " + "; ".join(notes),
            close=functools.partial(_close, engine, functools.partial(store.unpin, directory)),
        )

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        import torch

        engine = loaded.model
        pad = getattr(loaded.tokenizer, "pad_token_id", None)
        # InferenceEngine.generate hands over to the wrapped transformers model's generate,
        # which calls that model's forward once per token: that is the forward to stamp (the
        # engine's own forward is never called by generate).
        with torch.inference_mode(), token_stamps(engine.module, hook):
            return engine.generate(
                prompt.input_ids,
                attention_mask=prompt.attention_mask,
                **greedy_kwargs(new_tokens, pad),
            )


def _close(engine: Any, unpin: Callable[[], None]) -> None:
    """Injected kernels keep a process-wide workspace the next model must not inherit; the
    checkpoint is never read again, so the cache may evict it."""
    try:
        from deepspeed.model_implementations.transformers.ds_transformer import (
            DeepSpeedTransformerInference,
        )

        if getattr(DeepSpeedTransformerInference, "workspace", None) is not None:
            engine.destroy()
    finally:
        unpin()
