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
#: Families of the catalog. Any other architecture ``AutoModelForCausalLM`` (or, for an encoder,
#: ``AutoModel``) builds works from disk or a registry; its parameters are counted on the meta
#: device instead of from formulas.
FAMILIES = (
    "bloom",
    "llama",
    "gpt2",
    "mistral",
    "mixtral",
    "qwen2",
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "vit",
)
#: What kind of model an entry is, which decides how it is built and which workloads it runs:
#: a causal LM (``AutoModelForCausalLM``: ``llmperf.generate``, and ``llmperf.forward`` as a
#: prefill), a text encoder or an image encoder (the base ``AutoModel``: ``llmperf.forward``).
TASKS = ("causal-lm", "encoder", "image-encoder")
#: Text encoders whose position ids start after the padding id (RoBERTa's
#: ``create_position_ids_from_input_ids``): ``pad_token_id + 1`` of their positions never hold a
#: token, so roberta-base's 514 positions take 512 tokens.
_PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm")
#: Model types read as encoders when a config names no architectures (and as image encoders
#: for the second tuple): transformers' causal-LM mapping lists BERT and RoBERTa too (their
#: ``is_decoder`` variants), so the mapping alone would call bert-base a causal LM.
_ENCODER_TYPES = (
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "xlm-roberta",
    "camembert",
    "mpnet",
    "roberta-prelayernorm",
    "megatron-bert",
    "modernbert",
)
_IMAGE_TYPES = ("vit", "deit", "beit", "dinov2", "swin", "vit_msn")
# Families whose parameters are counted from the config by formula (no torch needed).
_CLOSED_FORM = ("bloom", "gpt2", "llama", "mistral", "mixtral", "qwen2")

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


#: Where a model's description comes from: a shipped config (catalog), a checkpoint directory,
#: the local HF cache, or a config.json alone (shape only, seeded weights).
SOURCES = ("catalog", "directory", "hf-cache", "config")


@dataclass(frozen=True)
class ModelSpec:
    """One model: a catalog entry, or a model from disk or a project's registry.

    Frozen so it can key caches and be shared across tests safely. ``id`` is the name the test
    gave (a catalog id, a registered name, a path as written): it is what baselines are keyed
    by, so it never holds a resolved absolute path.
    """

    id: str
    family: str
    tier: str
    config_file: str
    hf_id: Optional[str]
    #: In the default selection of the shipped suites (``--llmperf-models tiny|full``); other
    #: catalog entries run when named.
    suite: bool = True
    source: str = "catalog"
    #: The checkpoint directory of a ``directory`` or ``hf-cache`` model.
    location: Optional[str] = None
    #: The project allowed this model's own code (``trust_remote_code``); never implied.
    trust_remote_code: bool = False
    #: One of :data:`TASKS`: how the model is built and which workloads it runs.
    task: str = "causal-lm"

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config_file if self.source == "catalog" else Path(self.config_file)

    def config_dict(self) -> dict[str, Any]:
        """The config.json; a fresh copy, so callers may edit it without corrupting the
        per-process cache."""
        return copy.deepcopy(_load_config(str(self.config_path)))

    def shape(self) -> ModelShape:
        """Layers, widths, heads and vocabulary under one spelling for every family."""
        return _shape(self.family, self.config_dict(), self.task)

    def max_tokens(self) -> Optional[int]:
        """The most tokens one sequence can hold (None: no limit), RoBERTa's offset positions
        taken off (see ``_PADDED_POSITIONS``)."""
        limit = self.shape().max_positions
        if limit is not None and self.family in _PADDED_POSITIONS:
            limit -= int(self.config_dict().get("pad_token_id") or 0) + 1
        return limit

    def param_breakdown(self) -> dict[str, int]:
        """Parameters by kind.

        Split because quantizers treat kinds differently: bitsandbytes quantizes block Linear
        weights and keeps embeddings, norms and biases in 16 bit.
        """
        cfg = self.config_dict()
        if self.family in _CLOSED_FORM:
            return _param_breakdown(self.family, self.shape(), cfg)
        return _counted_breakdown(str(self.config_path), self.trust_remote_code, self.task)

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

    def describe(self) -> str:
        """Where the model comes from, for listings and provenance."""
        if self.source == "catalog":
            return self.hf_id or "(synthetic only)"
        if self.source == "config":
            return f"config {self.config_file} (seeded weights)"
        return f"{self.source} {self.hf_id or self.location}"

    def to_json(self) -> dict[str, Any]:
        """What crosses a process boundary for a model that is not a catalog id."""
        return {
            "id": self.id,
            "family": self.family,
            "config_file": self.config_file,
            "hf_id": self.hf_id,
            "source": self.source,
            "location": self.location,
            "trust_remote_code": self.trust_remote_code,
            "task": self.task,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict) or data.get("source") not in SOURCES[1:]:
            raise ValueError("model source: expected an object with a non-catalog source")
        return cls(
            id=str(data["id"]),
            family=str(data["family"]),
            tier="",
            config_file=str(data["config_file"]),
            hf_id=data.get("hf_id"),
            suite=False,
            source=str(data["source"]),
            location=data.get("location"),
            trust_remote_code=bool(data.get("trust_remote_code")),
            task=_task_of(data.get("task", "causal-lm")),
        )


def _task_of(value: Any) -> str:
    if value not in TASKS:
        raise ValueError(f"model source: task={value!r}, expected one of {', '.join(TASKS)}")
    return str(value)


def infer_task(cfg: Mapping[str, Any]) -> str:
    """What a config.json describes, from its ``architectures`` (what the checkpoint was saved
    as) and else its ``model_type``; plain JSON, so collection can ask it. A causal head
    (``*ForCausalLM``, ``*LMHeadModel``) makes a causal LM even for BERT; an image size without
    a vocabulary, or an image classifier, an image encoder; other architectures of a known
    encoder type an encoder. Whether transformers can build it is checked elsewhere
    (``registry.check_architecture``)."""
    model_type = cfg.get("model_type")
    names = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names) or cfg.get("is_decoder"):
        return "causal-lm"
    image = "image_size" in cfg and "vocab_size" not in cfg
    if image or model_type in _IMAGE_TYPES or any("ForImage" in a for a in names):
        return "image-encoder"
    if model_type in _ENCODER_TYPES and not cfg.get("is_encoder_decoder"):
        return "encoder"
    return "causal-lm"


def _quantized_bytes(parts: dict[str, int], dtype: str) -> int:
    # Per-row int8 scales (one fp32 per output row) are left out: 0.3% of bloom-560m's Linear
    # bytes, 0.02% of bloom-176b's.
    kept_16bit = (parts["embedding"] + parts["norm"] + parts["bias"]) * 2
    linear = parts["linear"]
    if dtype == "int8":
        return int(linear + kept_16bit)
    return int(linear // 2 + (linear // _INT4_BLOCK) * 4 + kept_16bit)


def _encoder(model_id: str, family: str, tier: str, hf_id: Optional[str]) -> ModelSpec:
    task = "image-encoder" if family in _IMAGE_TYPES else "encoder"
    return ModelSpec(model_id, family, tier, f"{model_id}.json", hf_id, task=task)


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
    # Current models, config only: run when named (model=..., --llmperf-models=NAME,...).
    ModelSpec("tiny-mistral", "mistral", "tiny", "tiny-mistral.json", None, suite=False),
    ModelSpec("tiny-mixtral", "mixtral", "tiny", "tiny-mixtral.json", None, suite=False),
    ModelSpec("tiny-qwen2", "qwen2", "tiny", "tiny-qwen2.json", None, suite=False),
    ModelSpec(
        "llama-3.1-8b", "llama", "full", "llama-3.1-8b.json", "meta-llama/Llama-3.1-8B", False
    ),
    ModelSpec(
        "llama-3.1-70b", "llama", "full", "llama-3.1-70b.json", "meta-llama/Llama-3.1-70B", False
    ),
    ModelSpec(
        "mistral-7b", "mistral", "full", "mistral-7b.json", "mistralai/Mistral-7B-v0.1", False
    ),
    ModelSpec(
        "mixtral-8x7b",
        "mixtral",
        "full",
        "mixtral-8x7b.json",
        "mistralai/Mixtral-8x7B-v0.1",
        False,
    ),
    ModelSpec("qwen2.5-7b", "qwen2", "full", "qwen2.5-7b.json", "Qwen/Qwen2.5-7B", False),
    # Encoders of reference 004 (Inferentia2: p95 latency of one forward pass), built as the
    # base AutoModel (BertModel with its pooler, ViTModel): llmperf.forward.
    _encoder("tiny-bert", "bert", "tiny", None),
    _encoder("tiny-roberta", "roberta", "tiny", None),
    _encoder("tiny-distilbert", "distilbert", "tiny", None),
    _encoder("tiny-albert", "albert", "tiny", None),
    _encoder("tiny-vit", "vit", "tiny", None),
    _encoder("bert-base", "bert", "full", "google-bert/bert-base-uncased"),
    _encoder("bert-large", "bert", "full", "google-bert/bert-large-uncased"),
    _encoder("roberta-base", "roberta", "full", "FacebookAI/roberta-base"),
    _encoder("distilbert-base", "distilbert", "full", "distilbert/distilbert-base-uncased"),
    _encoder("albert-base", "albert", "full", "albert/albert-base-v2"),
    _encoder("vit-base", "vit", "full", "google/vit-base-patch16-224"),
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


def models_for_tier(tier: str, tasks: Optional[tuple[str, ...]] = None) -> list[str]:
    """Ids of one tier (of those ``tasks`` only, when given); "auto" is resolved by the plugin
    (it depends on the backend), not here."""
    if tier not in TIERS:
        raise ValueError(f"unknown model tier {tier!r}; known: {', '.join(TIERS)}")
    return [
        spec.id
        for spec in _ENTRIES
        if spec.tier == tier and spec.suite and (tasks is None or spec.task in tasks)
    ]


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


def forward_runtime_bytes(spec: ModelSpec, dtype: str, batch_size: int, tokens: int) -> int:
    """Device bytes one forward pass needs besides the weights (``llmperf.forward``).

    One layer's activations are alive at a time: batch x tokens x (4 x hidden + intermediate)
    for the hidden state, QKV and the MLP intermediate, in the compute dtype, and the attention
    scores batch x heads x tokens² in fp32 (eager softmax; the term that grows with the square
    of the sequence, which at 512 tokens is bert-large's largest). A causal LM's forward is a
    prefill: it also returns logits for every position and fills the KV cache. Like
    :func:`generation_runtime_bytes`, a floor, not a ceiling.
    """
    _check_dtype(dtype)
    for name, value in (("batch_size", batch_size), ("tokens", tokens)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    s = spec.shape()
    act_bytes = 4 if dtype == "fp32" else 2
    hidden_acts = batch_size * tokens * (4 * s.hidden_size + s.intermediate_size) * act_bytes
    scores = batch_size * s.num_heads * tokens * tokens * 4
    total = hidden_acts + scores
    if spec.task == "causal-lm":
        kv = 2 * s.num_layers * batch_size * tokens * s.num_kv_heads * s.head_dim * act_bytes
        total += kv + batch_size * tokens * s.vocab_size * act_bytes
    return int(total)


@functools.cache
def _load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _shape(family: str, cfg: dict[str, Any], task: str = "causal-lm") -> ModelShape:
    # Key aliases follow the transformers config classes (BloomConfig accepts the legacy
    # "n_embed" that bigscience/bloom's own config.json still uses; GPT-2, GPT-J, Falcon,
    # Phi and OPT spell the same fields their own way).
    hidden = _first(cfg, "hidden_size", "n_embed", "n_embd", "d_model", "dim")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = _first(cfg, "vocab_size", "padded_vocab_size")
    if vocab is None and task == "image-encoder":
        vocab = 0  # pixels in, no token embedding
    missing = [
        name
        for name, value in (("hidden size", hidden), ("heads", heads), ("layers", layers))
        if not isinstance(value, int)
    ]
    if missing or not isinstance(vocab, int):
        raise ValueError(
            f"config of a {family!r} model: cannot read its {', '.join(missing or ['vocab'])} "
            "(no hidden_size / num_attention_heads / num_hidden_layers / vocab_size or their "
            "usual aliases)"
        )
    if family == "bloom":
        return ModelShape(
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=4 * hidden,  # BloomMLP hard-codes 4h and ignores n_inner
            vocab_size=vocab,
            max_positions=None,
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )
    kv_heads = _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        # Falcon's multi-query attention: one K/V head unless new_decoder_architecture.
        kv_heads = 1 if cfg.get("multi_query") and not cfg.get("num_kv_heads") else heads
    default_tie = family == "gpt2"
    return ModelShape(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_first(cfg, "head_dim", default=hidden // heads),
        intermediate_size=_first(
            cfg,
            "intermediate_size",
            "n_inner",
            "ffn_hidden_size",
            "ffn_dim",
            *(("hidden_dim",) if family == "distilbert" else ()),
            default=4 * hidden,
        ),
        vocab_size=vocab,
        max_positions=_first(cfg, "max_position_embeddings", "n_positions", "n_ctx"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", default_tie),
    )


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
    else:  # llama and its relatives: RMSNorm, gated MLP, grouped-query attention
        q_out = s.num_heads * s.head_dim
        kv_out = s.num_kv_heads * s.head_dim
        attention = h * q_out + 2 * h * kv_out + q_out * h
        if family == "mixtral":
            experts = int(cfg.get("num_local_experts", 8))
            mlp = experts * 3 * h * inter + h * experts  # experts + router
        else:
            mlp = 3 * h * inter
        linear = n_layers * (attention + mlp)
        bias = 0
        if family == "qwen2":
            bias += n_layers * (q_out + 2 * kv_out)  # Qwen2 biases q, k and v, not o
        elif cfg.get("attention_bias"):
            bias += n_layers * (q_out + 2 * kv_out + h)
        if cfg.get("mlp_bias"):
            bias += n_layers * (2 * inter + h)
        norm = n_layers * 2 * h + h
    return {"embedding": embedding, "linear": linear, "bias": bias, "norm": norm}


@functools.cache
def _counted_breakdown(
    config_path: str, trust_remote_code: bool, task: str = "causal-lm"
) -> dict[str, int]:
    """Parameters by kind of an architecture without a formula here, counted on the meta device
    as the engines build it (``AutoModelForCausalLM``, or the base ``AutoModel`` of an encoder).

    Costs importing torch and transformers (never during collection: only when a model from
    disk is measured or listed) and no memory. Kinds: embedding tables and the LM head are
    ``embedding``, other tensors of two or more dimensions ``linear`` (fused MoE expert tensors
    too), 1-D ``bias`` or ``norm`` by name.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        str(Path(config_path).parent) if Path(config_path).name == "config.json" else config_path,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    auto: Any = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # accelerate's meta init unties them; the checkpoint holds one copy
    head = model.get_output_embeddings()
    parts = {"embedding": 0, "linear": 0, "bias": 0, "norm": 0}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, torch.nn.Embedding) or module is head:
                kind = "embedding"
            elif param.ndim >= 2:
                kind = "linear"
            elif "norm" in type(module).__name__.lower():
                kind = "norm"
            else:
                kind = "bias" if name.endswith("bias") else "norm"
            parts[kind] += param.numel()
    return parts
