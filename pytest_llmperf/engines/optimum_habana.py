"""optimum-habana on Gaudi: transformers with Habana's Gaudi model classes, lazy mode, HPU graphs.

Built against optimum-habana 1.21.2's source and its text-generation example
(``examples/text-generation/utils.py``: ``setup_env``, ``setup_model``,
``setup_distributed_model``, ``setup_generation_config``; ``run_generation.py``'s
``model.generate(..., lazy_mode=True, hpu_graphs=, ignore_eos=)``); not run on a Gaudi here.

- ``adapt_transformers_to_gaudi()`` runs once per process, before the first model is built: it
  swaps transformers' model classes and generate for Gaudi's, process-wide. That is why the
  engine is ``may_crash``: the auto launcher gives each workload a child process, so a
  transformers-engine workload later in the pytest process is not measured on patched classes
  (and a SynapseAI abort is an ``error`` record, not a lost session).
- Lazy mode: the plugin reads ``PT_HPU_LAZY_MODE`` once, when ``habana_frameworks.torch`` is
  imported (unset means lazy). The engine sets it to 1 when this process has not imported the
  plugin yet, and refuses (a skip naming the variable) where it is ``0``: HPU graphs and the
  per-token ``mark_step`` need lazy mode.
- The model is ``from_pretrained`` on the host, ``.eval().to("hpu")``, then, with
  ``engine_options={"hpu_graphs": True}``, ``wrap_in_hpu_graph(model)``. That wrapper sets an
  instance-level ``forward``, and Gaudi's generate calls ``self(**inputs)`` once per token, so
  ``token_stamps`` wraps the graph's forward and its hook still fires once per token.
- The generation config follows ``setup_generation_config``: ``static_shapes`` (default: the
  model type is one optimum-habana optimizes), ``bucket_size``/``bucket_internal``,
  ``trim_logits``, ``attn_softmax_bf16``, ``limit_hpu_graphs``, ``reuse_cache``,
  ``use_flash_attention``; ``ignore_eos`` is always on and ``min_new_tokens = max_new_tokens``,
  so every round makes exactly ``new_tokens``. With bucketing the returned ids are padded to
  the bucket, and are cut back to prompt + ``new_tokens``.
- Compile: lazy mode builds and compiles a graph (recipe) the first time each shape runs, and
  HPU graphs are captured on first call; nothing runs a forward during ``load``, so the
  compile lands in the warm-up (``warmup_s``) and ``warmup=0`` is a usage error.
- Several devices: DeepSpeed-inference through Habana's DeepSpeed fork, as
  ``setup_distributed_model``: the model on the host (``deepspeed.OnDevice(device="cpu")``),
  ``deepspeed.init_inference(model, dtype=, tensor_parallel={"tp_size": devices},
  enable_cuda_graph=hpu_graphs, injection_policy=get_ds_injection_policy(config))``, then its
  ``.module`` is generated with. One rank per device under a rank-group launcher
  (:attr:`OptimumHabanaEngine.launcher`: ``deepspeed``, as optimum-habana's ``gaudi_spawn.py
  --use_deepspeed``); the group is joined over ``hccl``.
- dtypes bf16 and fp32 (the example's ``--bf16`` or not). fp8 is not offered: optimum-habana
  quantizes through Intel Neural Compressor with a calibration run and ``QUANT_CONFIG`` files
  (measure, then quantize), a workflow of its own, not a dtype switch.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..backends.base import Backend
from ..errors import SkipWorkload, UsageError
from .base import Engine, LoadedModel, Prompt, TokenHook
from .hf_transformers import greedy_kwargs, token_stamps

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

DISTRIBUTION = "optimum-habana"
INSTALL = "pip install optimum-habana"
DEEPSPEED_INSTALL = "pip install git+https://github.com/HabanaAI/DeepSpeed.git@<SynapseAI release>"
LAZY_VAR = "PT_HPU_LAZY_MODE"
#: Workload kinds whose rounds call generate: their first call compiles.
GENERATE_KINDS = ("generate", "generate_dataset")

_adapted = False


@dataclass
class HabanaLoaded(LoadedModel):
    """A loaded model plus what every generate call passes (the Gaudi generation config)."""

    generation_config: Any = None
    hpu_graphs: bool = False


def adapt_once() -> None:
    """``adapt_transformers_to_gaudi()`` once per process, before any model is built."""
    global _adapted
    if _adapted:
        return
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi

    adapt_transformers_to_gaudi()
    _adapted = True


def lazy_mode_reason(environ: Any = None) -> Optional[str]:
    """Why lazy mode cannot be had here (``PT_HPU_LAZY_MODE=0``), or None."""
    env = os.environ if environ is None else environ
    if env.get(LAZY_VAR, "1").strip() == "0":
        return (
            f"optimum-habana runs in lazy mode (HPU graphs, a mark_step per token) but "
            f"{LAZY_VAR}=0 selects eager mode for the whole process: unset it or set "
            f"{LAZY_VAR}=1 before pytest starts"
        )
    return None


def ensure_lazy_mode() -> None:
    """Lazy mode before the plugin is imported; a skip where the process already runs eager."""
    reason = lazy_mode_reason()
    if reason:
        raise SkipWorkload(reason)
    if "habana_frameworks.torch" not in sys.modules:
        os.environ.setdefault(LAZY_VAR, "1")


def _requirement_reason() -> Optional[str]:
    """optimum-habana missing, or the installed transformers outside its pin (1.21.2:
    ``transformers<4.56.0,>=4.55.0``), read from package metadata without importing either."""
    from importlib import metadata

    try:
        version = metadata.version(DISTRIBUTION)
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return f"optimum-habana is not installed ({INSTALL})"
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with transformers
        return None
    for line in requires:
        req = Requirement(line)
        if req.name != "transformers" or req.marker is not None:
            continue
        try:
            have = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            return f"optimum-habana {version} needs transformers{req.specifier}, not installed"
        if not req.specifier.contains(have, prereleases=True):
            return (
                f"optimum-habana {version} needs transformers{req.specifier}, "
                f"transformers {have} is installed"
            )
    return None


class OptimumHabanaEngine(Engine):
    name: ClassVar[str] = "optimum-habana"
    dtypes: ClassVar[tuple[str, ...]] = ("bf16", "fp32")
    #: The text-generation example's switches (``setup_generation_config``), by the same names.
    options: ClassVar[dict[str, tuple[type, ...]]] = {
        "hpu_graphs": (bool,),
        "static_shapes": (bool,),
        "bucket_size": (int,),
        "bucket_internal": (bool,),
        "trim_logits": (bool,),
        "attn_softmax_bf16": (bool,),
        "limit_hpu_graphs": (bool,),
        "reuse_cache": (bool,),
        "use_flash_attention": (bool,),
    }
    may_crash: ClassVar[bool] = True
    #: ``devices > 1``: one rank per device under this launcher (DeepSpeed's, as
    #: ``gaudi_spawn.py --use_deepspeed`` starts optimum-habana's multi-card runs); any
    #: rank-group launcher that sets RANK/WORLD_SIZE/LOCAL_RANK runs it the same way.
    launcher: ClassVar[str] = "deepspeed"

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        self._check_usage(spec)
        if backend.name != "hpu":
            return f"optimum-habana runs on Gaudi (the hpu backend), not on {backend.name}"
        reason = _requirement_reason() or lazy_mode_reason()
        if reason:
            return reason
        if spec.devices > 1:
            from .deepspeed_inference import install_reason

            reason = install_reason(self.name)
            if reason:
                return f"{reason}; on Gaudi use Habana's fork: {DEEPSPEED_INSTALL}"
        return backend.dtype_reason(spec.dtype)

    def _check_usage(self, spec: WorkloadSpec) -> None:
        """What optimum-habana would assert on mid-run, as one-line usage errors up front."""
        opts = spec.options
        if spec.kind in GENERATE_KINDS and spec.warmup < 1:
            raise UsageError(
                "warmup=0 with engine 'optimum-habana': the first generate compiles the graphs "
                "(minutes on a large model) and would be timed as a round; use warmup >= 1"
            )
        bucket = opts.get("bucket_size", -1)
        if bucket != -1 and bucket < 1:
            raise UsageError(
                f"engine_options['bucket_size']={bucket}: -1 (no bucketing) or a positive size"
            )
        if bucket > 0 and opts.get("static_shapes") is False:
            raise UsageError(
                "engine_options['bucket_size'] needs static shapes: drop static_shapes=False"
            )
        if opts.get("bucket_internal") and bucket < 1:
            raise UsageError("engine_options['bucket_internal']=True needs a bucket_size > 0")
        if opts.get("reuse_cache") and bucket > 0 and not opts.get("bucket_internal"):
            raise UsageError(
                "engine_options['reuse_cache']=True with bucket_size needs bucket_internal=True "
                "(optimum-habana's rule)"
            )
        if opts.get("limit_hpu_graphs") and not opts.get("hpu_graphs"):
            raise UsageError("engine_options['limit_hpu_graphs']=True needs hpu_graphs=True")

    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        from .. import models
        from .deepspeed_inference import checkpoint_dir, load_pretrained

        ensure_lazy_mode()
        import habana_frameworks.torch.core  # noqa: F401  (lazy mode, mark_step)

        adapt_once()
        tdtype = models.torch_dtype(spec.dtype)
        directory, source = checkpoint_dir(model, spec, store, spec.dtype)
        hpu_graphs = bool(spec.options.get("hpu_graphs", False))
        notes = ["lazy mode", "HPU graphs" if hpu_graphs else "no HPU graphs"]
        deepspeed = self._deepspeed(backend) if spec.devices > 1 else None
        backend.synchronize()
        start = backend.clock()
        if spec.devices > 1:
            hf_model = self._load_distributed(deepspeed, directory, tdtype, spec, hpu_graphs)
            notes.append(f"DeepSpeed-inference over {spec.devices} ranks")
        else:
            hf_model = load_pretrained(directory, tdtype).eval().to(backend.torch_device)
            if hpu_graphs:
                from habana_frameworks.torch.hpu import wrap_in_hpu_graph

                hf_model = wrap_in_hpu_graph(hf_model)
        backend.synchronize()
        load_time = backend.clock() - start

        tokenizer, real = models.build_tokenizer(model)
        config = self.generation_config(hf_model, spec, getattr(tokenizer, "pad_token_id", None))
        if config.static_shapes:
            size = config.bucket_size
            notes.append(f"static shapes, bucket_size={size}" if size > 0 else "static shapes")
        return HabanaLoaded(
            model=hf_model,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=source,
            weight_bytes=self.weight_bytes(model, spec.dtype),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note="optimum-habana: " + "; ".join(notes),
            close=functools.partial(store.unpin, directory),
            generation_config=config,
            hpu_graphs=hpu_graphs,
        )

    def _deepspeed(self, backend: Backend) -> Any:
        """Habana's DeepSpeed (its ``hpu`` accelerator) and the rank group over hccl."""
        from .deepspeed_inference import ensure_process_group, import_deepspeed

        deepspeed, _accelerator = import_deepspeed(self.name, backend)
        ensure_process_group(deepspeed, backend)
        return deepspeed

    @staticmethod
    def _load_distributed(
        deepspeed: Any, directory: Any, tdtype: Any, spec: WorkloadSpec, hpu_graphs: bool
    ) -> Any:
        """``setup_distributed_model``'s host-side path (no meta-device checkpoint json)."""
        from optimum.habana.checkpoint_utils import get_ds_injection_policy

        from .deepspeed_inference import load_pretrained

        with deepspeed.OnDevice(dtype=tdtype, device="cpu"):
            hf_model = load_pretrained(directory, tdtype)
        hf_model.eval()
        engine = deepspeed.init_inference(
            hf_model,
            dtype=tdtype,
            tensor_parallel={"tp_size": spec.devices},
            enable_cuda_graph=hpu_graphs,
            injection_policy=get_ds_injection_policy(hf_model.config),
        )
        return engine.module

    @staticmethod
    def generation_config(hf_model: Any, spec: WorkloadSpec, pad_token_id: Optional[int]) -> Any:
        """The Gaudi generation config as ``setup_generation_config`` fills it."""
        from optimum.habana.checkpoint_utils import model_is_optimized

        opts = spec.options
        optimized = bool(model_is_optimized(hf_model.config))
        config = copy.deepcopy(hf_model.generation_config)
        config.static_shapes = bool(opts.get("static_shapes", optimized))
        config.bucket_size = int(opts.get("bucket_size", -1)) if config.static_shapes else -1
        config.bucket_internal = bool(opts.get("bucket_internal", False))
        config.trim_logits = bool(opts.get("trim_logits", False))
        # The example turns the bf16 softmax off for fp32 models.
        config.attn_softmax_bf16 = bool(opts.get("attn_softmax_bf16", False)) and (
            spec.dtype == "bf16"
        )
        config.limit_hpu_graphs = bool(opts.get("limit_hpu_graphs", False))
        config.reuse_cache = bool(opts.get("reuse_cache", False))
        config.use_flash_attention = bool(opts.get("use_flash_attention", False))
        config.ignore_eos = True
        config.use_cache = True
        config.do_sample = False
        config.num_beams = 1
        config.pad_token_id = 0 if pad_token_id is None else pad_token_id
        return config

    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        import torch

        assert isinstance(loaded, HabanaLoaded), "optimum-habana generates its own loads only"
        pad = getattr(loaded.tokenizer, "pad_token_id", None)
        with torch.inference_mode(), token_stamps(loaded.model, hook):
            out = loaded.model.generate(
                prompt.input_ids,
                attention_mask=prompt.attention_mask,
                generation_config=loaded.generation_config,
                lazy_mode=True,
                hpu_graphs=loaded.hpu_graphs,
                ignore_eos=True,
                **greedy_kwargs(new_tokens, pad),
            )
        # Bucketing pads the ids to the bucket's end; past prompt + new_tokens is padding.
        end = prompt.tokens + new_tokens
        if loaded.generation_config.bucket_size > 0 and out.shape[-1] > end:
            return out[:, :end]
        return out
