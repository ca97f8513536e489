"""Prompt files: the prompts of a dataset-generation workload (``llmperf.generate_dataset``).

The Gaudi2 BLOOMZ post (reference 000) completes a whole dataset, each sample cut to its first
16 tokens. A benchmark node has no network, so the prompts come from a local file
(``--llmperf-prompts``) or the file shipped in this package, and travel inside the workload
spec as text, so a child process or a torchrun rank measures exactly the same prompts.

Formats, picked by the file's extension:

* ``.jsonl`` — one JSON value per line: a string, or an object with a ``"prompt"`` or ``"text"``
  field (the column names dataset exports use); blank lines are skipped;
* ``.txt`` — one prompt per non-blank line, surrounding whitespace stripped.

A file that yields no prompt, or a line that is not one, is refused at start-up with the file
and line number: a benchmark over a silently shorter dataset would be compared with a longer
one. Plain Python only (json, hashlib): the plugin reads the file at start-up, before torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The prompts used when a test gives none and ``--llmperf-prompts`` is not set.
SHIPPED_PATH = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
#: What a record's ``workload["prompts"]`` says for the shipped file.
SHIPPED_SOURCE = "shipped: pytest_llmperf/data/prompts.jsonl"
#: What it says for prompts given to ``generate_dataset(prompts=[...])``.
ARGUMENT_SOURCE = "prompts= argument"
SUFFIXES = (".jsonl", ".txt")
#: Object fields a JSON line's prompt is read from, in this order.
FIELDS = ("prompt", "text")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


def read_prompts(path: Path) -> tuple[str, ...]:
    """The prompts of ``path``, in file order; PromptFileError naming the file and line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise PromptFileError(f"{path}: is a directory; expected a .jsonl or .txt prompt file")
    if not path.exists():
        raise PromptFileError(f"{path}: no such file")
    if suffix not in SUFFIXES:
        raise PromptFileError(
            f"{path}: unknown extension {path.suffix or '(none)'!r}; expected .jsonl (a JSON "
            'string or an object with a "prompt" or "text" field per line) or .txt (one '
            "prompt per line)"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise PromptFileError(
            f"{path}:{bad_line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    parse = _jsonl_line if suffix == ".jsonl" else _txt_line
    prompts = []
    # Lines end at "\n" only: str.splitlines would also split a prompt at U+2028 or a form feed.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        prompts.append(parse(line, f"{path}:{number}"))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return tuple(prompts)


def _txt_line(line: str, where: str) -> str:
    return line.strip()


def _jsonl_line(line: str, where: str) -> str:
    try:
        value: Any = json.loads(line)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PromptFileError(f"{where}: not valid JSON ({first})") from None
    if isinstance(value, dict):
        field = next((f for f in FIELDS if f in value), None)
        if field is None:
            keys = ", ".join(repr(k) for k in list(value)[:5]) or "none"
            raise PromptFileError(
                f'{where}: an object without a "prompt" or "text" field (its keys: {keys})'
            )
        value = value[field]
        if not isinstance(value, str):
            raise PromptFileError(
                f'{where}: the "{field}" field is {_kind(value)}, expected a string'
            )
    elif not isinstance(value, str):
        raise PromptFileError(
            f'{where}: expected a JSON string or an object with a "prompt" or "text" field, '
            f"got {_kind(value)}"
        )
    if not value.strip():
        raise PromptFileError(f"{where}: empty prompt")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


@functools.lru_cache(maxsize=1)
def shipped() -> tuple[str, ...]:
    """The prompts shipped with the plugin (a few dozen sentences written for it)."""
    return read_prompts(SHIPPED_PATH)


def check_list(prompts: Any, where: str) -> tuple[str, ...]:
    """Prompts given in code, as a tuple; ValueError naming ``where`` and the bad item."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError(
            f"{where}: expected a list of prompt strings, got one {type(prompts).__name__} "
            "(for a single prompt: prompts=[text])"
        )
    if not isinstance(prompts, Sequence):
        raise ValueError(
            f"{where}: expected a list of prompt strings, got {type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError(f"{where}: expected at least one prompt, got an empty list")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{where}[{index}]: expected a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{where}[{index}]: empty prompt")
    return tuple(prompts)


def digest(prompts: Sequence[str]) -> str:
    """``sha256:…`` of the prompts as a JSON list: equal for equal prompts whichever file (or
    list) they came from, different for any change of text, order or count."""
    text = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
