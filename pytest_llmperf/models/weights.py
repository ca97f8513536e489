"""Turning a catalog entry into a model: a real checkpoint when one is on disk, else seeded weights.

Benchmarks measure shapes, not knowledge, so random weights of the real shape time the same
kernels as the published checkpoint; the weight source is still recorded, because greedy outputs
(and so the output digest) depend on it. torch and transformers are imported inside functions
only: this module is imported while pytest collects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import queue
import re
from pathlib import Path
from typing import Any, Optional

from .catalog import ModelSpec, torch_dtype

# Random values are drawn in chunks, each from its own generator seeded by (seed, parameter
# name, chunk index). Fixed chunking makes the weights independent of the thread count, the device
# and the construction order; per-chunk generators let threads fill one tensor in parallel (a
# torch CPU generator is single-threaded: ~3.5 ns per value).
_CHUNK = 1 << 22
# Models on an accelerator are filled through a CPU staging slab of at most this many values, so
# building bloomz-7b1 on a GPU never holds a second full copy in host memory.
_SLAB = 1 << 28


#: A seeded model written to disk by :func:`save_seeded` carries this file: loading it reports
#: the seed as its weight source, so its outputs digest like the in-memory build's.
SEEDED_MARKER = "llmperf-weights.json"
#: Bumped whenever _build_random draws different values: old seeded checkpoints are not reused.
GENERATOR_VERSION = 1


def build_model(
    spec: ModelSpec,
    dtype: str,
    device: str = "cpu",
    seed: int = 0,
    checkpoint: Optional[str] = None,
    tensor_parallel: bool = False,
) -> tuple[Any, str]:
    """(model in eval mode, weight_source).

    Order: an explicit `checkpoint` (a local directory, or an HF id already in the local cache),
    which must exist (a typo must not silently benchmark random weights); then spec.hf_id if it is
    fully in the local HF cache; then random weights from `seed`. The HF cache is only read, never
    downloaded from, so a node without network fails over in milliseconds.

    weight_source is ``"seed:<seed>"`` or ``"checkpoint:<path or hf id>@<short hash>"``; it feeds
    the output digest, so a digest change can be told apart from a weights change.

    ``tensor_parallel`` (inside a torchrun group): transformers shards the checkpoint over the
    ranks by the model's tensor-parallel plan; it needs a directory (``save_seeded`` writes one
    for seeded weights).
    """
    tdtype = torch_dtype(dtype)
    if checkpoint is not None:
        directory, label, short_hash = _resolve_checkpoint(spec, checkpoint)
        if (directory / SEEDED_MARKER).is_file():
            source = seeded_source(directory)
        else:
            source = f"checkpoint:{label}@{short_hash}"
        return (
            _load_checkpoint(
                directory, tdtype, device, tensor_parallel, spec.trust_remote_code, spec.task
            ),
            source,
        )
    real = real_checkpoint(spec)
    if real is not None:
        model = _load_checkpoint(
            real[0], tdtype, device, tensor_parallel, spec.trust_remote_code, spec.task
        )
        return model, real[1]
    if tensor_parallel:
        raise ValueError(
            f"{spec.id}: tensor parallelism loads from a checkpoint directory; write the seeded "
            "weights with save_seeded() first"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return _build_random(spec, tdtype, device, seed), f"seed:{seed}"


def real_checkpoint(spec: ModelSpec) -> Optional[tuple[Path, str]]:
    """(directory, weight source) of the model's real weights on this machine, or None.

    The source names the model as the test did plus a content hash, never an absolute path:
    it feeds the output digest, which must not change when a checkout moves.
    """
    if spec.source == "directory" and spec.location:
        directory = Path(spec.location)
        return directory, f"checkpoint:{spec.id}@{checkpoint_fingerprint(directory)}"
    if spec.source == "hf-cache" and spec.location:
        directory = Path(spec.location)
        return directory, f"checkpoint:{spec.hf_id}@{directory.name[:12]}"
    if spec.source != "catalog":
        return None
    snapshot = hf_cache_snapshot(spec.hf_id, need_weights=True) if spec.hf_id else None
    if snapshot is None:
        return None
    _check_family(spec, snapshot)
    return snapshot, f"checkpoint:{spec.hf_id}@{snapshot.name[:12]}"


def seeded_source(directory: Path) -> str:
    """The weight source a seeded checkpoint written by :func:`save_seeded` records."""
    marker = json.loads((directory / SEEDED_MARKER).read_text(encoding="utf-8"))
    return str(marker["weight_source"])


def seeded_dir(cache_dir: Path, spec: ModelSpec, dtype: str, seed: int) -> Path:
    """Catalog ids name their directory; a model from disk is named by a hash of its config
    too (its name may be a path, and an edited config is another model)."""
    name = spec.id
    if spec.source != "catalog":
        digest = hashlib.sha256(spec.config_path.read_bytes()).hexdigest()[:10]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.id).strip("._")[:60] + f"-{digest}"
    return Path(cache_dir) / "weights" / f"{name}-{dtype}-seed{seed}-g{GENERATOR_VERSION}"


def save_seeded(spec: ModelSpec, dtype: str, seed: int, cache_dir: Path) -> Path:
    """The seeded model of ``spec`` as a checkpoint directory under ``cache_dir``, written once.

    Ranks of a torchrun group load the same weights from it. Written into a temporary
    directory and renamed, so a killed write is never reused; a model whose checkpoint would
    not fit on the disk is refused with the numbers (OSError) before anything is written.
    """
    import shutil
    import tempfile

    target = seeded_dir(cache_dir, spec, dtype, seed)
    if (target / SEEDED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    need = int(spec.weight_bytes(dtype) * 1.05) + (1 << 20)
    free = shutil.disk_usage(target.parent).free
    if need > free:
        raise OSError(
            f"{spec.id} {dtype}: its checkpoint needs {need / 2**30:.1f} GiB on disk, "
            f"{free / 2**30:.1f} GiB free in {target.parent} (--llmperf-cache-dir)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        from transformers.utils import logging as hf_logging

        model, source = build_model(spec, dtype, seed=seed)
        hf_logging.disable_progress_bar()  # a bar per shard on the user's terminal says nothing
        try:
            model.save_pretrained(str(tmp))
        finally:
            hf_logging.enable_progress_bar()
        (tmp / SEEDED_MARKER).write_text(json.dumps({"weight_source": source}), encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / SEEDED_MARKER).is_file():  # not another writer's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hf_config(spec: ModelSpec) -> Any:
    """The transformers config object of ``spec`` (its own code only if the project trusts it)."""
    from transformers import AutoConfig

    if spec.trust_remote_code:
        return AutoConfig.from_pretrained(
            str(spec.config_path.parent), trust_remote_code=True, local_files_only=True
        )
    return AutoConfig.for_model(**spec.config_dict())


def has_tp_plan(spec: ModelSpec) -> bool:
    """Whether transformers can shard this architecture over devices (a tensor-parallel plan)."""
    return bool(getattr(hf_config(spec), "base_model_tp_plan", None))


def dtype_kwargs(tdtype: Any) -> dict[str, Any]:
    """``{"dtype": ...}`` or ``{"torch_dtype": ...}``: transformers 4.56 renamed the keyword, and
    optimum-habana pins 4.55 while current releases warn on the old name."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": tdtype}


def hf_cache_snapshot(hf_id: str, need_weights: bool = False) -> Optional[Path]:
    """The local snapshot directory of `hf_id` at the cached ``main`` revision, or None.

    Reads the cache layout only (huggingface_hub.try_to_load_from_cache): no network, no lock,
    no warning, whatever HF_HUB_OFFLINE says. With `need_weights`, a snapshot that holds only
    config/tokenizer files, or a partly downloaded shard set, counts as absent.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    try:
        found = try_to_load_from_cache(hf_id, "config.json")
    except Exception:  # an id that is not a valid repo name is simply not cached
        return None
    if not isinstance(found, str):  # None, or the "known not to exist" sentinel
        return None
    snapshot = Path(found).parent
    if need_weights and not has_safetensors(snapshot):
        return None
    return snapshot


def has_safetensors(directory: Path) -> bool:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((directory / shard).is_file() for shard in shards)
    return any(directory.glob("*.safetensors"))


def _resolve_checkpoint(spec: ModelSpec, checkpoint: str) -> tuple[Path, str, str]:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"checkpoint {checkpoint!r}: no config.json in {path}")
        if not has_safetensors(path):
            raise ValueError(
                f"checkpoint {checkpoint!r}: no complete set of *.safetensors files in {path}"
            )
        _check_family(spec, path)
        return path, str(path), checkpoint_fingerprint(path)
    snapshot = hf_cache_snapshot(checkpoint, need_weights=True)
    if snapshot is not None:
        _check_family(spec, snapshot)
        return snapshot, checkpoint, snapshot.name[:12]
    raise ValueError(
        f"checkpoint {checkpoint!r} is neither a local directory with config.json and "
        "*.safetensors nor a model fully present in the local Hugging Face cache "
        "(nothing is downloaded)"
    )


def _check_family(spec: ModelSpec, directory: Path) -> None:
    # A bloom checkpoint passed for a llama id would benchmark the wrong architecture under the
    # right name, and the baseline would never notice.
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get(
        "model_type"
    )
    if model_type != spec.family:
        raise ValueError(
            f"checkpoint {directory} has model_type {model_type!r}, but model {spec.id!r} "
            f"is a {spec.family!r} model"
        )


def checkpoint_fingerprint(directory: Path) -> str:
    """Short hash identifying a local checkpoint without reading all of it.

    Hashing 350 GB of BLOOM weights would take minutes per test session, so this hashes
    config.json, each safetensors header (names, dtypes, shapes, offsets) and size, and 16
    sampled 64 KiB blocks of each file's data. Any fine-tune or re-quantization changes those.
    """
    files = sorted(directory.glob("*.safetensors"))
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    config = (directory / "config.json").read_bytes()
    return _fingerprint(key, hashlib.sha256(config).hexdigest())


@functools.lru_cache(maxsize=64)
def _fingerprint(files: tuple[tuple[str, int, int], ...], config_digest: str) -> str:
    h = hashlib.sha256(config_digest.encode())
    block, samples = 1 << 16, 16
    for path, size, _mtime in files:
        h.update(f"{Path(path).name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
            start = 8 + header_len
            span = max(size - start - block, 0)
            for i in range(samples):
                f.seek(start + span * i // max(samples - 1, 1))
                h.update(f.read(block))
    return h.hexdigest()[:12]


def auto_class(task: str) -> Any:
    """The transformers class a model of ``task`` is built and loaded with: the causal LM, or
    the base model of an encoder (BertModel with its pooler, ViTModel), whose forward is what
    reference 004 times; a checkpoint saved with a head (``*ForMaskedLM``, ViT's classifier)
    loads into it without the head."""
    # Typed as Any: transformers' decorated from_pretrained confuses type checkers.
    if task == "causal-lm":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from transformers import AutoModel

    return AutoModel


def _load_checkpoint(
    directory: Path,
    tdtype: Any,
    device: str,
    tensor_parallel: bool = False,
    trust_remote_code: bool = False,
    task: str = "causal-lm",
) -> Any:
    loader: Any = auto_class(task)
    kwargs = {
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
        **dtype_kwargs(tdtype),
    }
    if tensor_parallel:
        kwargs.update(_tensor_parallel_kwargs())
        return loader.from_pretrained(str(directory), **kwargs).eval()
    return loader.from_pretrained(str(directory), **kwargs).to(device).eval()


def _tensor_parallel_kwargs() -> dict[str, Any]:
    """``distributed_config=DistributedConfig(tp_plan="auto")`` on transformers 5, where the
    plain ``tp_plan="auto"`` of 4.5x (optimum-habana's pin) is deprecated. 4.55 has a
    ``DistributedConfig`` too, without ``tp_plan``: it takes the plain keyword."""
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}


def _build_random(spec: ModelSpec, tdtype: Any, device: str, seed: int) -> Any:
    """Build on the meta device in the target dtype, then fill each tensor once on `device`.

    No fp32 copy of the model ever exists (bloom-560m in bf16 adds 1.15 GB of resident memory,
    its weights being 1.12 GB), and transformers' own initialization, which draws from the global
    RNG and took ~19 s for bloom-560m fp32 here, never runs. Values are uniform with the config's
    initializer_range as standard deviation: CPU uniform_ is ~2.7x cheaper than normal_ and is a
    scalar loop over mt19937, so identical across CPU instruction sets (normal_ has an AVX2 path).
    Biases are 0 and norm weights 1, as transformers initializes them. bf16/fp16 weights are the
    fp32 draws rounded, so one seed is the same model in every dtype.
    """
    import torch
    from accelerate import init_empty_weights

    cfg = spec.config_dict()
    config = hf_config(spec)
    # include_buffers=False: buffers (RoPE inv_freq) are computed at construction and must stay
    # real; only parameters go to meta.
    with init_empty_weights(include_buffers=False):
        model = auto_class(spec.task).from_config(
            config, trust_remote_code=spec.trust_remote_code, **dtype_kwargs(tdtype)
        )
    # accelerate's patched register_parameter re-wraps every assigned Parameter, which unties
    # lm_head from the input embeddings; re-tie before materializing so they stay one tensor.
    model.tie_weights()

    bound = float(cfg.get("initializer_range", 0.02)) * math.sqrt(3.0)
    canonical = {id(p): name for name, p in model.named_parameters()}
    built: dict[int, Any] = {}
    with _UniformFiller(seed, bound) as filler:
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in built:
                    data = filler.materialize(canonical[id(param)], param, device)
                    built[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
                module._parameters[key] = built[id(param)]
    model.to(device)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{spec.id}: tensors left on the meta device: {leftover[:5]}")
    return model.eval()


class _UniformFiller:
    """Deterministic uniform fill of parameters, in parallel, with reused scratch memory.

    Scratch buffers (fp32 draws before rounding to 16 bit, the CPU staging slab for accelerators)
    are allocated once per build: allocating them per chunk fragmented the heap and left
    bloom-560m in bf16 at 1.75 GB resident instead of 1.1 GB.
    """

    def __init__(self, seed: int, bound: float) -> None:
        import torch

        self.seed, self.bound = seed, bound
        self.workers = max(1, min(torch.get_num_threads(), 16))
        self._scratch: queue.SimpleQueue = queue.SimpleQueue()
        self._slabs: dict[Any, Any] = {}
        self._pool: Any = None
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="llmperf-init")

    def __enter__(self) -> _UniformFiller:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._slabs.clear()

    def materialize(self, name: str, meta: Any, device: str) -> Any:
        import torch

        out = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if meta.ndim < 2:
            # 1-D parameters in these families are biases and norm scales.
            return out.fill_(0.0 if name.endswith("bias") else 1.0)
        flat = out.view(-1)
        total = flat.numel()
        if out.device.type == "cpu":
            self.fill(flat, 0, name)
            return out
        if meta.dtype not in self._slabs:
            self._slabs[meta.dtype] = torch.empty(min(_SLAB, total), dtype=meta.dtype)
        slab = self._slabs[meta.dtype]
        for start in range(0, total, slab.numel()):
            part = slab[: min(slab.numel(), total - start)]
            self.fill(part, start, name)
            flat[start : start + part.numel()].copy_(part)
        return out

    def fill(self, dst: Any, offset: int, name: str) -> None:
        """Fill the flat CPU tensor `dst`, which holds elements offset.. of parameter `name`.

        Chunk boundaries are multiples of _CHUNK in parameter coordinates (offset is one), so
        the values do not depend on how the caller splits the tensor.
        """
        firsts = range(offset, offset + dst.numel(), _CHUNK)
        if self._pool is None or len(firsts) == 1:
            for first in firsts:
                self._fill_chunk(dst, offset, name, first)
        else:
            list(self._pool.map(lambda first: self._fill_chunk(dst, offset, name, first), firsts))

    def _fill_chunk(self, dst: Any, offset: int, name: str, first: int) -> None:
        import torch

        n = min(_CHUNK, offset + dst.numel() - first)
        key = f"{self.seed}/{name}/{first // _CHUNK}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        view = dst[first - offset : first - offset + n]
        if view.dtype == torch.float32:
            view.uniform_(-self.bound, self.bound, generator=gen)
            return
        try:
            scratch = self._scratch.get_nowait()
        except queue.Empty:  # fewer buffers than concurrent chunks so far
            scratch = torch.empty(_CHUNK)
        view.copy_(scratch[:n].uniform_(-self.bound, self.bound, generator=gen))
        self._scratch.put(scratch)


def _fill_uniform(dst: Any, offset: int, name: str, seed: int, bound: float) -> None:
    """One-off fill (tests): the same values a build writes for these elements of `name`."""
    with _UniformFiller(seed, bound) as filler:
        filler.fill(dst, offset, name)
