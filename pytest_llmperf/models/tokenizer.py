"""Tokenizers: the checkpoint's own when it is on disk, else a small BPE trained offline.

Benchmark nodes often have no network and no HF cache, yet a workload is specified with a text
prompt. The offline tokenizer is a byte-level BPE trained in memory on the shipped corpus.txt, so
it can encode any text, needs no download and is identical on every machine. Its token ids mean
nothing to a random-weight model; what matters is the prompt length, which encode_prompt pins to
the real tokenizer's count for the reference prompts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from .catalog import KNOWN_PROMPT_TOKENS, ModelSpec
from .weights import hf_cache_snapshot

CORPUS_PATH = Path(__file__).resolve().parent / "corpus.txt"

# Enough merges to give realistic ~4 characters per token on English; the corpus is a few KB,
# so training stays in the tens of milliseconds.
OFFLINE_VOCAB_CAP = 4096

# Ids 0..3 follow BLOOM's and Llama's conventions (unk 0, bos 1, eos 2; BLOOM pads with 3), so
# the shipped configs' special ids point at the same tokens.
_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def build_tokenizer(spec: ModelSpec, checkpoint: Optional[str] = None) -> tuple[Any, bool]:
    """(tokenizer, is_real).

    is_real says whether token counts match the published model's, which the report records
    next to the prompt length. Looks in `checkpoint` (a local directory or a cached HF id, as
    for build_model), then the local HF cache of spec.hf_id; never downloads.
    """
    directory = _tokenizer_dir(spec, checkpoint)
    if directory is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if tok.pad_token is None:
            # GPT-2 and Llama ship without a pad token; batched generate needs one.
            tok.pad_token = tok.eos_token
        return tok, True
    vocab = min(spec.shape().vocab_size, OFFLINE_VOCAB_CAP)
    return _offline_tokenizer(vocab), False


def _tokenizer_dir(spec: ModelSpec, checkpoint: Optional[str]) -> Optional[Path]:
    candidates: list[Optional[Path]] = []
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        candidates.append(path if path.is_dir() else hf_cache_snapshot(checkpoint))
    if spec.location:
        candidates.append(Path(spec.location))
    elif spec.source == "config":
        candidates.append(spec.config_path.parent)  # a tokenizer shipped next to the shape
    elif spec.hf_id:
        candidates.append(hf_cache_snapshot(spec.hf_id))
    for directory in candidates:
        if directory is not None and any((directory / f).is_file() for f in _TOKENIZER_FILES):
            return directory
    return None


def _offline_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # A fresh wrapper per call: callers set padding_side and the like, and must not leak those
    # settings into other tests through a shared object.
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def encode_prompt(
    tokenizer: Any,
    is_real: bool,
    prompt: Optional[str],
    batch_size: int,
    prompt_tokens: Optional[int] = None,
) -> tuple[Any, Any, int]:
    """(input_ids [batch, n] int64, attention_mask, n) on CPU; every row is the same prompt.

    Length rules, so a workload has the shape the published benchmark had:
    - `prompt_tokens` given: cut or extend (repeating the tokens) to exactly that many;
    - else a real tokenizer: the text as tokenized;
    - else (offline tokenizer): the real tokenizer's count for a known reference prompt (7 for
      SEED_PROMPT), or the offline count for any other text.
    With no `prompt`, the tokens come from the shipped corpus: deterministic, and text-like
    rather than a constant id that could hit a degenerate path.
    """
    import torch

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if prompt_tokens is not None and (not isinstance(prompt_tokens, int) or prompt_tokens < 1):
        raise ValueError(f"prompt_tokens must be a positive int, got {prompt_tokens!r}")
    if prompt is None:
        if prompt_tokens is None:
            raise ValueError("encode_prompt needs prompt= text or prompt_tokens=")
        ids = list(tokenizer(corpus_text(), add_special_tokens=False)["input_ids"])
        target = prompt_tokens
    else:
        ids = list(tokenizer(prompt)["input_ids"])
        if prompt_tokens is not None:
            target = prompt_tokens
        elif is_real:
            target = len(ids)
        else:
            target = KNOWN_PROMPT_TOKENS.get(prompt, len(ids))
    ids = _fit(ids, target, tokenizer)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    input_ids = torch.tensor([ids] * batch_size, dtype=torch.long)
    return input_ids, torch.ones_like(input_ids), len(ids)


def _fit(ids: list[int], target: int, tokenizer: Any) -> list[int]:
    if len(ids) >= target:
        return ids[:target]
    # Keep a leading BOS (Llama adds one) once, and repeat the text tokens after it.
    head = ids[:1] if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else []
    body = ids[len(head) :] or list(tokenizer(corpus_text(), add_special_tokens=False)["input_ids"])
    out = list(head)
    while len(out) < target:
        out.extend(body[: target - len(out)])
    return out
