"""optimum-neuron on AWS Inferentia2 / Trainium: models compiled ahead of time for static shapes.

Built against optimum-neuron 0.4.5's source (not run on Neuron hardware here):

- causal LMs: ``NeuronModelForCausalLM.get_neuron_config(checkpoint, batch_size=,
  sequence_length=, tensor_parallel_size=)`` then ``NeuronModelForCausalLM.export(checkpoint,
  neuron_config=, load_weights=False)`` and ``save_pretrained(folder)`` (the compiled
  ``model.pt`` plus the weights sharded per core); a load is ``from_pretrained(folder)``. 0.4.x
  takes the dtype from the model config, not ``auto_cast_type`` (its CLI drops that argument
  for decoders), so the engine sets ``neuron_config.torch_dtype``. Only the architectures
  optimum-neuron 0.4.5 has decoders for compile (llama, granite, mixtral, phi3, qwen2, qwen3,
  qwen3_moe, smollm3, llama4_text); another fails with its "not supported" message.
- encoders: ``NeuronModelForFeatureExtraction.from_pretrained(checkpoint, export=True,
  batch_size=, sequence_length=, auto_cast=, auto_cast_type=)`` — the base model, as the
  transformers engine builds encoders (``AutoModel``) — or, with ``engine_options={"head":
  "sequence-classification" | "masked-lm"}``, the class with that head.

Shapes are static: the batch size and ``sequence_length`` (prompt tokens + new tokens, not
rounded: 0.4.5's decoders need no multiple, and the context graph pads the prompt to it) are
part of the compiled graph, and ``num_cores`` is ``devices`` (NeuronCores, see
backends/neuron.py). The compile happens inside ``load`` before anything is timed, is kept
out of ``load_time_s`` (which is ``from_pretrained`` of the compiled folder, the same span on a
cache hit and a miss) and is recorded as ``compile_s``. The compiled folder lives in the
checkpoint store under ``compiled/``, named by everything it depends on — model and weights,
shapes, dtype, cores, chip, neuronx-cc / torch-neuronx / optimum-neuron versions — so a rerun
loads it without exporting, and a new compiler compiles again.

Per-token stamps: 0.4.5's generate loop calls ``self.forward`` once per token (prefill, then one
per decode step), and the call returns host tensors after the cores finish, so
``token_stamps``' instance-level ``forward`` wrapper stamps completion with no sync at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..backends.base import Backend, installed_versions
from ..errors import UsageError
from .base import Engine, LoadedModel, Prompt, TokenHook
from .hf_transformers import greedy_generate

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..models.store import CheckpointStore
    from ..spec import WorkloadSpec

INSTALL = (
    "pip install optimum-neuron[neuronx] --extra-index-url https://pip.repos.neuron.amazonaws.com"
)
#: ``engine_options={"head": ...}`` → the optimum-neuron class an encoder compiles as.
ENCODER_CLASSES = {
    "none": "NeuronModelForFeatureExtraction",
    "sequence-classification": "NeuronModelForSequenceClassification",
    "masked-lm": "NeuronModelForMaskedLM",
}
CAUSAL_LM_CLASS = "NeuronModelForCausalLM"
#: The versions compiled artifacts depend on (a new compiler or runtime API recompiles).
SDK_DISTS = ("neuronx-cc", "torch-neuronx", "neuronx-distributed", "optimum-neuron")


class NeuronCompileError(Exception):
    """The Neuron compile failed; the message is the compiler's, on one line. Not a
    RuntimeError: a compiler that ran out of host memory is still a compile error, not an
    out-of-memory of the device under test."""


@dataclass(frozen=True)
class Shapes:
    """What one compile is for."""

    batch_size: int
    sequence_length: int
    num_cores: int
    dtype: str

    def text(self) -> str:
        return (
            f"batch {self.batch_size} × sequence {self.sequence_length}, {self.dtype}, "
            f"{self.num_cores} NeuronCore{'s' if self.num_cores > 1 else ''}"
        )


def compiler_message(exc: BaseException, limit: int = 400) -> str:
    """The compiler's own words on one line: the tail of a failed subprocess's output (where
    neuronx-cc's diagnostics are), else the exception's text; its type when it has none."""
    parts: list[str] = []
    for attr in ("stderr", "output"):
        data = getattr(exc, attr, None)
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if isinstance(data, str) and data.strip():
            lines = [line.strip() for line in data.strip().splitlines() if line.strip()]
            errors = [line for line in lines if re.search(r"error|failed|fatal", line, re.I)]
            parts = (errors or lines)[-3:]
            break
    text = " | ".join([str(exc).strip().replace("\n", " | "), *parts]).strip(" |")
    return f"{type(exc).__name__}: {text}"[:limit] if text else type(exc).__name__


def folder_name(model: ModelSpec, shapes: Shapes, chip: str, key: dict[str, Any]) -> str:
    """A readable, path-safe name with a hash of the whole key: two keys never share one."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", model.id).strip("._")[:60] or "model"
    return (
        f"{base}-{shapes.dtype}-b{shapes.batch_size}-s{shapes.sequence_length}-"
        f"c{shapes.num_cores}-{chip}-{digest}"
    )


class OptimumNeuronEngine(Engine):
    name: ClassVar[str] = "optimum-neuron"
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder")
    options: ClassVar[dict[str, tuple[type, ...]]] = {"checkpoint": (str,), "head": (str,)}
    one_process: ClassVar[bool] = True
    libraries: ClassVar[tuple[str, ...]] = (
        "torch",
        "transformers",
        "transformers.modeling_utils",
        "optimum.neuron",
    )

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        head = options.get("head")
        if head is not None and head not in ENCODER_CLASSES:
            raise UsageError(
                f"engine_options['head']={head!r}: expected one of {', '.join(ENCODER_CLASSES)}"
            )

    def unsupported(self, backend: Backend, spec: WorkloadSpec) -> Optional[str]:
        if backend.name != "neuron":
            return (
                f"optimum-neuron runs on the neuron backend (Inferentia2/Trainium) only, "
                f"not on {backend.name}"
            )
        reason = backend.dtype_reason(spec.dtype)
        if reason:
            return reason
        missing = self._missing_library()
        if missing:
            return missing
        if spec.kind == "generate_dataset":
            return (
                "optimum-neuron rejects left-padded batches ('Left padding is not supported for "
                "Neuron models'), and generate_dataset left-pads its prompts"
            )
        from ..execute import model_of

        task = model_of(spec).task
        if spec.kind == "forward" and task == "causal-lm":
            return (
                "optimum-neuron's causal LMs run generate only: their forward takes the KV "
                "cache's position and sequence ids, not a plain prefill"
            )
        if task != "causal-lm" and spec.devices > 1:
            return f"optimum-neuron compiles encoders for one NeuronCore, not {spec.devices}"
        return None

    @staticmethod
    def _missing_library() -> Optional[str]:
        """Why optimum-neuron cannot run in this environment: absent, or installed beside a
        transformers its pin excludes (0.4.5 pins transformers~=4.57.1)."""
        from importlib.metadata import PackageNotFoundError, requires, version

        try:
            have = version("optimum-neuron")
        except PackageNotFoundError:
            return f"optimum-neuron is not installed ({INSTALL})"
        try:
            from packaging.requirements import Requirement

            for text in requires("optimum-neuron") or []:
                req = Requirement(text)
                if req.name == "transformers" and req.marker is None:
                    installed = version("transformers")
                    if not req.specifier.contains(installed, prereleases=True):
                        return (
                            f"optimum-neuron {have} needs transformers{req.specifier}, "
                            f"installed {installed}"
                        )
        except (ImportError, PackageNotFoundError, ValueError):
            pass
        return None

    def sdk_versions(self) -> dict[str, str]:
        """The versions compiled artifacts are keyed by (a method so tests can pin them)."""
        return installed_versions(*SDK_DISTS)

    def static_shapes(self, spec: WorkloadSpec) -> tuple[Any, ...]:
        return (
            spec.kind,
            spec.batch_size,
            spec.prompt,
            spec.prompt_tokens,
            spec.new_tokens,
            spec.sequence_length,
        )

    # -- load --------------------------------------------------------------------------------
    def load(
        self, model: ModelSpec, spec: WorkloadSpec, backend: Backend, store: CheckpointStore
    ) -> LoadedModel:
        """Compile (once per key, outside the timed span), then time ``from_pretrained`` of
        the compiled folder."""
        from .. import models

        if model.task == "causal-lm":
            tokenizer, real = models.build_tokenizer(model, spec.options.get("checkpoint"))
            prompt = prompt_length(spec, tokenizer, real)
            shapes = Shapes(spec.batch_size, prompt + spec.new_tokens, spec.devices, spec.dtype)
            cls_name = CAUSAL_LM_CLASS
        else:
            from ..scenarios.forward import sequence_length

            tokenizer, real = None, False
            shapes = Shapes(spec.batch_size, sequence_length(spec), 1, spec.dtype)
            cls_name = ENCODER_CLASSES[spec.options.get("head", "none")]
        cls = _neuron_class(cls_name)
        chip = backend.device_name()
        identity = weight_identity(model, spec, store)
        key = {
            "model": model.id,
            "weights": identity,
            "class": cls_name,
            "shapes": shapes.__dict__,
            "chip": chip,
            "versions": self.sdk_versions(),
        }
        name = folder_name(model, shapes, chip, key)

        def build(folder: Path) -> dict[str, Any]:
            directory, source = checkpoint_dir(model, spec, store)
            start = backend.clock()
            try:
                if cls_name == CAUSAL_LM_CLASS:
                    compile_causal_lm(cls, directory, shapes, folder)
                else:
                    compile_encoder(cls, directory, shapes, folder)
            except Exception as exc:
                raise NeuronCompileError(
                    f"Neuron compile of {model.id} ({shapes.text()}) failed: "
                    + compiler_message(exc)
                ) from exc
            return {**key, "weight_source": source, "compile_s": backend.clock() - start}

        folder, marker, built = store.compiled(name, build)
        backend.synchronize()
        start = backend.clock()
        loaded = cls.from_pretrained(str(folder))
        backend.synchronize()
        load_time = backend.clock() - start
        compile_s = float(marker["compile_s"]) if built else None
        how = f"compiled in {compile_s:.0f} s" if built else "compiled artifacts reused"
        return LoadedModel(
            model=loaded,
            tokenizer=tokenizer,
            real_tokenizer=real,
            weight_source=str(marker.get("weight_source") or identity),
            weight_bytes=self.weight_bytes(model, spec.dtype),
            load_time_s=load_time,
            dtype=spec.dtype,
            devices=spec.devices,
            note=f"optimum-neuron {cls_name} for {shapes.text()} on {chip} ({how}: {name})",
            compile_s=compile_s,
        )

    # -- run ---------------------------------------------------------------------------------
    def generate(
        self, loaded: LoadedModel, prompt: Prompt, new_tokens: int, hook: Optional[TokenHook]
    ) -> Any:
        return greedy_generate(loaded, prompt, new_tokens, hook)

    def forward(self, loaded: LoadedModel, inputs: dict[str, Any]) -> Any:
        """One call of the compiled encoder with the inputs it was compiled with (a model
        traced without ``token_type_ids`` does not take them)."""
        import torch

        shapes = getattr(loaded.model, "input_static_shapes", None)
        if isinstance(shapes, dict) and shapes:
            inputs = {k: v for k, v in inputs.items() if k in shapes}
        with torch.inference_mode():
            return loaded.model(**inputs)


def _neuron_class(name: str) -> Any:
    import optimum.neuron

    return getattr(optimum.neuron, name)


def prompt_length(spec: WorkloadSpec, tokenizer: Any, real: bool) -> int:
    """The prompt's token count as the generate scenario will encode it (the compiled
    sequence length must hold it plus the new tokens)."""
    from .. import models

    text = spec.prompt
    if text is None and spec.prompt_tokens is None:
        text = models.SEED_PROMPT
    _ids, _mask, n = models.encode_prompt(tokenizer, real, text, 1, spec.prompt_tokens)
    return int(n)


def weight_identity(model: ModelSpec, spec: WorkloadSpec, store: CheckpointStore) -> str:
    """What the weights are, without writing them: a compiled folder holds them (inlined or
    sharded), so other weights must not hit the same folder."""
    from ..models import weights

    explicit = spec.weights or spec.options.get("checkpoint")
    if explicit:
        _path, label, short_hash = weights._resolve_checkpoint(model, explicit)
        return f"checkpoint:{label}@{short_hash}"
    real = weights.real_checkpoint(model)
    if real is not None:
        return real[1]
    return "seeded:" + weights.seeded_dir(store.root, model, spec.dtype, spec.seed).name


def checkpoint_dir(
    model: ModelSpec, spec: WorkloadSpec, store: CheckpointStore
) -> tuple[Path, str]:
    """(directory to compile from, weight source): only needed on a cache miss, so a hit
    never writes seeded weights."""
    from ..models import weights

    explicit = spec.weights or spec.options.get("checkpoint")
    if explicit:
        directory, label, short_hash = weights._resolve_checkpoint(model, explicit)
        if (directory / weights.SEEDED_MARKER).is_file():
            return directory, weights.seeded_source(directory)
        return directory, f"checkpoint:{label}@{short_hash}"
    return store.checkpoint(model, spec.dtype, spec.seed)


def compile_causal_lm(cls: Any, directory: Path, shapes: Shapes, folder: Path) -> None:
    from .. import models

    neuron_config = cls.get_neuron_config(
        str(directory),
        batch_size=shapes.batch_size,
        sequence_length=shapes.sequence_length,
        tensor_parallel_size=shapes.num_cores,
    )
    # 0.4.x reads the dtype from the model config; ours is the workload's.
    neuron_config.torch_dtype = models.torch_dtype(shapes.dtype)
    compiled = cls.export(str(directory), neuron_config=neuron_config, load_weights=False)
    compiled.save_pretrained(str(folder))


def compile_encoder(cls: Any, directory: Path, shapes: Shapes, folder: Path) -> None:
    cast: dict[str, Any] = {"auto_cast": None}
    if shapes.dtype != "fp32":  # every fp32 op cast to the workload's dtype
        cast = {"auto_cast": "all", "auto_cast_type": shapes.dtype}
    compiled = cls.from_pretrained(
        str(directory),
        export=True,
        batch_size=shapes.batch_size,
        sequence_length=shapes.sequence_length,
        **cast,
    )
    compiled.save_pretrained(str(folder))
