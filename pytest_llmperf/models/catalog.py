"""The model catalog: exact ids, shipped configs, and the arithmetic done on their shapes.

Everything here is plain json/pathlib on purpose: the plugin consults the catalog while pytest is
collecting (parametrize ids, tier selection, OOM pre-checks), and collection must not pay for, or
depend on, importing torch or transformers.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

TIERS = ("tiny", "full")
FAMILIES = ("bloom", "llama", "gpt2")

# Bytes per weight. int8/int4 are bitsandbytes formats: only the Linear layers of the blocks are
# quantized, everything else stays 16-bit (see _quantized_bytes).
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}

# bitsandbytes 4-bit stores one fp32 absmax per block of 64 weights (without double quantization).
_INT4_BLOCK = 64

# The reference BLOOMZ workload (seed blog posts) prompts with this text; the real BLOOM tokenizer
# makes 7 tokens of it. Where only the offline tokenizer exists we cut/pad to that count so the
# measured workload has the published shape.
SEED_PROMPT = "DeepSpeed is a machine learning framework"
SEED_PROMPT_TOKENS = 7
KNOWN_PROMPT_TOKENS: dict[str, int] = {SEED_PROMPT: SEED_PROMPT_TOKENS}


class _LazyDtypes(Mapping):
    """dtype name -> torch.dtype, resolved on first lookup so that importing costs no torch."""

    _NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def __getitem__(self, name: str) -> Any:
        if name not in self._NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, self._NAMES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


DTYPES: Mapping[str, Any] = _LazyDtypes()


def torch_dtype(name: str) -> Any:
    """The torch dtype a model is *built* in.

    int8/int4 are not build dtypes: they are produced by a quantizing engine (bitsandbytes) from a
    16-bit model, so asking for them here is a usage error rather than a silent fp16 fallback.
    """
    if name in DTYPES:
        return DTYPES[name]
    if name in DTYPE_BYTES:
        raise ValueError(
            f"dtype {name!r} is a quantized format: build the model in fp16/bf16 and let the "
            "bnb-int8/bnb-4bit engine quantize it"
        )
    raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")


@dataclass(frozen=True)
class ModelShape:
    """Family-independent view of a config.

    BLOOM, GPT-2 and Llama spell the same hyperparameters differently (n_layer / num_hidden_layers,
    n_embed / n_embd / hidden_size, ...); memory and roofline arithmetic should not care.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: Optional[int]  # None: no learned/rotary limit (BLOOM's ALiBi)
    tie_word_embeddings: bool


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry. Frozen so it can key caches and be shared across tests safely."""

    id: str
    family: str
    tier: str
    config_file: str
    hf_id: Optional[str]

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config_file

    def config_dict(self) -> dict[str, Any]:
        """The shipped config.json; a fresh copy, so callers may edit it without corrupting the
        per-process cache."""
        return copy.deepcopy(_load_config(str(self.config_path)))

    def shape(self) -> ModelShape:
        """Layers, widths, heads and vocabulary under one spelling for every family."""
        return _shape(self.family, self.config_dict())

    def param_breakdown(self) -> dict[str, int]:
        """Parameters by kind.

        Split because quantizers treat kinds differently: bitsandbytes quantizes block Linear
        weights and keeps embeddings, norms and biases in 16 bit.
        """
        return _param_breakdown(self.family, self.shape(), self.config_dict())

    def param_count(self) -> int:
        """Counted from the config, tied embeddings once, matching
        ``sum(p.numel() for p in model.parameters())`` without building the model."""
        return sum(self.param_breakdown().values())

    def weight_bytes(self, dtype: str) -> int:
        """Bytes the weights occupy on the device in `dtype`."""
        _check_dtype(dtype)
        parts = self.param_breakdown()
        if dtype in ("fp32", "fp16", "bf16"):
            return int(sum(parts.values()) * DTYPE_BYTES[dtype])
        return _quantized_bytes(parts, dtype)


def _quantized_bytes(parts: dict[str, int], dtype: str) -> int:
    # Per-row int8 scales (one fp32 per output row) are left out: 0.3% of bloom-560m's Linear
    # bytes, 0.02% of bloom-176b's.
    kept_16bit = (parts["embedding"] + parts["norm"] + parts["bias"]) * 2
    linear = parts["linear"]
    if dtype == "int8":
        return int(linear + kept_16bit)
    return int(linear // 2 + (linear // _INT4_BLOCK) * 4 + kept_16bit)


# Insertion order is the order `llmperf models` lists them: tiny first, then by family and size.
_ENTRIES: tuple[ModelSpec, ...] = (
    ModelSpec("tiny-bloom", "bloom", "tiny", "tiny-bloom.json", None),
    ModelSpec("tiny-llama", "llama", "tiny", "tiny-llama.json", None),
    ModelSpec("tiny-gpt2", "gpt2", "tiny", "tiny-gpt2.json", None),
    ModelSpec("bloom-560m", "bloom", "full", "bloom-560m.json", "bigscience/bloom-560m"),
    ModelSpec("bloomz-7b1", "bloom", "full", "bloomz-7b1.json", "bigscience/bloomz-7b1"),
    ModelSpec("bloom-176b", "bloom", "full", "bloom-176b.json", "bigscience/bloom"),
    ModelSpec("llama-2-7b", "llama", "full", "llama-2-7b.json", "meta-llama/Llama-2-7b-hf"),
    ModelSpec("gpt2", "gpt2", "full", "gpt2.json", "openai-community/gpt2"),
)


def catalog() -> dict[str, ModelSpec]:
    """All models by id. A new dict each call, so a caller cannot mutate the catalog."""
    return {spec.id: spec for spec in _ENTRIES}


def get(model_id: str) -> ModelSpec:
    """Look a model up by its exact id.

    Ids are exact (no fuzzy matching, no HF ids) because they end up in baseline keys: two
    spellings of one model would split its history.
    """
    specs = catalog()
    if model_id not in specs:
        raise ValueError(f"unknown model {model_id!r}; known: {', '.join(sorted(specs))}")
    return specs[model_id]


def models_for_tier(tier: str) -> list[str]:
    """Ids of one tier; "auto" is resolved by the plugin (it depends on the backend), not here."""
    if tier not in TIERS:
        raise ValueError(f"unknown model tier {tier!r}; known: {', '.join(TIERS)}")
    return [spec.id for spec in _ENTRIES if spec.tier == tier]


def estimate_generation_bytes(
    spec: ModelSpec, dtype: str, batch_size: int, prompt_tokens: int, new_tokens: int
) -> int:
    """Device bytes a greedy ``generate`` needs: weights + KV cache + a rough activation bound.

    Used to record ``oom`` without running a workload that cannot fit: on a CPU host the kernel's
    OOM killer takes the whole pytest process instead of raising. It is a floor, not a ceiling:
    allocator fragmentation, engine workspaces (DeepSpeed-inference reserves its own) and uneven
    device_map splits come on top, so a workload above it surely fails, one below it may still
    OOM (accelerators raise, and the engine records that). Compare against free memory with a
    margin where a real OOM cannot be caught (CPU). Linear in batch size.
    """
    return int(
        spec.weight_bytes(dtype)
        + generation_runtime_bytes(spec, dtype, batch_size, prompt_tokens, new_tokens)
    )


def generation_runtime_bytes(
    spec: ModelSpec, dtype: str, batch_size: int, prompt_tokens: int, new_tokens: int
) -> int:
    """The part of :func:`estimate_generation_bytes` that is not weights.

    - KV cache: 2 (K and V) x layers x batch x (prompt + new) x kv_heads x head_dim, so Llama's
      grouped-query attention shrinks it. Kept in 16 bit for int8/int4 (bitsandbytes quantizes
      weights only) and in fp32 for fp32.
    - Activations (one layer at a time is alive during prefill, the largest step):
      batch x prompt x (4 x hidden + intermediate) for hidden state, QKV and MLP intermediate;
      batch x heads x prompt x seq x 4 for attention scores (eager softmax runs in fp32);
      batch x prompt x vocab logits in the compute dtype (older transformers compute logits for
      every prompt position) plus batch x vocab x 8 for generate's fp32 scores.
    """
    _check_dtype(dtype)
    for name, value in (
        ("batch_size", batch_size),
        ("prompt_tokens", prompt_tokens),
        ("new_tokens", new_tokens),
    ):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    s = spec.shape()
    seq = prompt_tokens + new_tokens
    act_bytes = 4 if dtype == "fp32" else 2
    kv = 2 * s.num_layers * batch_size * seq * s.num_kv_heads * s.head_dim * act_bytes
    hidden_acts = batch_size * prompt_tokens * (4 * s.hidden_size + s.intermediate_size)
    scores = batch_size * s.num_heads * prompt_tokens * seq * 4
    logits = batch_size * prompt_tokens * s.vocab_size * act_bytes + batch_size * s.vocab_size * 8
    return int(kv + hidden_acts * act_bytes + scores + logits)


@functools.cache
def _load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _shape(family: str, cfg: dict[str, Any]) -> ModelShape:
    # Key aliases follow the transformers config classes (BloomConfig accepts the legacy
    # "n_embed" that bigscience/bloom's own config.json still uses).
    if family == "bloom":
        hidden = _first(cfg, "n_embed", "hidden_size")
        heads = _first(cfg, "n_head", "num_attention_heads")
        layers = _first(cfg, "n_layer", "num_hidden_layers")
        return ModelShape(
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=4 * hidden,  # BloomMLP hard-codes 4h and ignores n_inner
            vocab_size=cfg["vocab_size"],
            max_positions=None,
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )
    if family == "gpt2":
        hidden = _first(cfg, "n_embd", "hidden_size")
        heads = _first(cfg, "n_head", "num_attention_heads")
        return ModelShape(
            num_layers=_first(cfg, "n_layer", "num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=_first(cfg, "n_inner", default=4 * hidden),
            vocab_size=cfg["vocab_size"],
            max_positions=_first(cfg, "n_positions", "max_position_embeddings"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )
    if family == "llama":
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        return ModelShape(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=_first(cfg, "num_key_value_heads", default=heads),
            head_dim=_first(cfg, "head_dim", default=hidden // heads),
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_positions=cfg.get("max_position_embeddings"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def _param_breakdown(family: str, s: ModelShape, cfg: dict[str, Any]) -> dict[str, int]:
    h, n_layers, inter = s.hidden_size, s.num_layers, s.intermediate_size
    embedding = s.vocab_size * h * (1 if s.tie_word_embeddings else 2)
    if family == "bloom":
        # word embeddings + their LayerNorm; per block: LN, fused QKV, dense, LN, h->4h, 4h->h.
        linear = n_layers * (3 * h * h + h * h + 2 * h * inter)
        bias = n_layers * (3 * h + h + inter + h)
        norm = 2 * h + n_layers * 4 * h + 2 * h
    elif family == "gpt2":
        embedding += (s.max_positions or 0) * h  # learned position embeddings
        linear = n_layers * (3 * h * h + h * h + 2 * h * inter)
        bias = n_layers * (3 * h + h + inter + h)
        norm = n_layers * 4 * h + 2 * h
    else:  # llama
        q_out = s.num_heads * s.head_dim
        kv_out = s.num_kv_heads * s.head_dim
        linear = n_layers * (h * q_out + 2 * h * kv_out + q_out * h + 3 * h * inter)
        bias = 0
        if cfg.get("attention_bias"):
            bias += n_layers * (q_out + 2 * kv_out + h)
        if cfg.get("mlp_bias"):
            bias += n_layers * (2 * inter + h)
        norm = n_layers * 2 * h + h
    return {"embedding": embedding, "linear": linear, "bias": bias, "norm": norm}
