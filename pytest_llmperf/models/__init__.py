"""Offline model catalog: exact ids -> real shapes, seeded weights, an offline tokenizer.

The shipped suites must run on a node with no network and no checkpoints, yet measure the
shapes of the published models. So each id maps to a shipped config.json with the real
hyperparameters; weights come from a local checkpoint or the HF cache when present, and from a
seed otherwise. Importing this package costs json and pathlib only (collection must stay light);
torch and transformers load inside build_model / build_tokenizer / encode_prompt.
"""

from __future__ import annotations

from .catalog import (
    CONFIG_DIR,
    DTYPE_BYTES,
    DTYPES,
    FAMILIES,
    KNOWN_PROMPT_TOKENS,
    SEED_PROMPT,
    SEED_PROMPT_TOKENS,
    TASKS,
    TIERS,
    ModelShape,
    ModelSpec,
    catalog,
    estimate_generation_bytes,
    forward_runtime_bytes,
    generation_runtime_bytes,
    get,
    infer_task,
    models_for_tier,
    torch_dtype,
)
from .registry import Registration, lookup, parse_registry, read_models_file
from .tokenizer import build_tokenizer, encode_prompt
from .weights import (
    build_model,
    checkpoint_fingerprint,
    dtype_kwargs,
    has_tp_plan,
    hf_cache_snapshot,
    save_seeded,
    seeded_dir,
)

__all__ = [
    "CONFIG_DIR",
    "DTYPES",
    "DTYPE_BYTES",
    "FAMILIES",
    "KNOWN_PROMPT_TOKENS",
    "SEED_PROMPT",
    "SEED_PROMPT_TOKENS",
    "TASKS",
    "TIERS",
    "ModelShape",
    "ModelSpec",
    "Registration",
    "build_model",
    "build_tokenizer",
    "catalog",
    "checkpoint_fingerprint",
    "dtype_kwargs",
    "encode_prompt",
    "estimate_generation_bytes",
    "forward_runtime_bytes",
    "generation_runtime_bytes",
    "get",
    "has_tp_plan",
    "hf_cache_snapshot",
    "infer_task",
    "lookup",
    "parse_registry",
    "read_models_file",
    "models_for_tier",
    "save_seeded",
    "seeded_dir",
    "torch_dtype",
]
