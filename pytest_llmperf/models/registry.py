"""Models that are not catalog ids: a checkpoint directory, an HF id in the local cache, or a
name a project registered (``[tool.llmperf.models]``, or the file ini ``llmperf_models_file``
names), which maps a stable name to one of those or to a config.json alone.

The name a test gives is what its baseline is keyed by, so a registered name lets a project move
its checkpoints without orphaning a history, and a path is kept as written, never resolved to an
absolute path that differs between machines. Everything that can be wrong with a model (no
config, no weights, not in the cache, an architecture transformers does not know without the
model's own code) is found here, before any model is built, and said in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from .catalog import ModelSpec, catalog, infer_task

#: How a registered model is described: a checkpoint directory, a cached HF id, a config.json.
KINDS = ("path", "hf", "config")


@dataclass(frozen=True)
class Registration:
    name: str
    kind: str
    target: str
    trust_remote_code: bool
    #: Where it was registered, for messages ("pyproject.toml: [tool.llmperf.models] x").
    origin: str


def parse_registry(table: Any, origin: str, base: Path) -> dict[str, Registration]:
    """Registrations from a table ``NAME = "PATH-OR-HF-ID"`` or ``NAME = {path|hf|config = …,
    trust_remote_code = true}``; relative paths are read from ``base`` (the file's directory).
    Raises ValueError naming the origin and the entry."""
    if not isinstance(table, Mapping):
        raise ValueError(f"{origin}: expected a table of NAME = PATH or NAME = {{path = ...}}")
    ids = catalog()
    out: dict[str, Registration] = {}
    for name, value in table.items():
        where = f"{origin} {name}"
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            raise ValueError(f"{where}: a model name is one word without spaces")
        if name in ids:
            raise ValueError(
                f"{where}: the name collides with the catalog id {name!r}; pick another name "
                "(baselines are keyed by it)"
            )
        trust = False
        if isinstance(value, str):
            kind, target = _kind_of(value, base)
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - {*KINDS, "trust_remote_code"})
            given = [k for k in KINDS if k in value]
            if unknown or len(given) != 1:
                raise ValueError(
                    f"{where}: expected exactly one of path, hf, config (and optionally "
                    f"trust_remote_code){'; unknown: ' + ', '.join(unknown) if unknown else ''}"
                )
            kind, target = given[0], value[given[0]]
            if not isinstance(target, str) or not target:
                raise ValueError(f"{where}: {kind} = {target!r}: expected a non-empty string")
            if kind != "hf":
                target = str(_absolute(target, base))
            trust = value.get("trust_remote_code", False)
            if not isinstance(trust, bool):
                raise ValueError(f"{where}: trust_remote_code = {trust!r}: expected true or false")
        else:
            raise ValueError(f"{where}: expected a path, an HF id or a table, got {value!r}")
        out[name] = Registration(name, kind, target, trust, origin)
    return out


def read_models_file(path: Path, origin: str) -> dict[str, Registration]:
    """The registry file ini ``llmperf_models_file`` names: TOML or JSON, one table of models
    (at the top, or under ``models``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{origin}: cannot read {path} ({exc.strerror})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import sys

            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python < 3.11
                import tomli as tomllib
            data = tomllib.loads(text)
    except ValueError as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ValueError(f"{origin}: {path} is not valid {kind} ({exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("models"), Mapping):
        data = data["models"]
    return parse_registry(data, f"{path}:", path.parent)


def _absolute(target: str, base: Path) -> Path:
    path = Path(target).expanduser()
    return path if path.is_absolute() else base / path


def _kind_of(value: str, base: Path) -> tuple[str, str]:
    """A string entry: a config file (``*.json``), a directory, or else an HF id."""
    path = _absolute(value, base)
    if value.endswith(".json"):
        return "config", str(path)
    if path.exists() or value.startswith((".", "/", "~")) or value.count("/") != 1:
        return "path", str(path)
    return "hf", value


def lookup(name: str, registry: Optional[Mapping[str, Registration]] = None) -> ModelSpec:
    """The model ``name`` stands for; ValueError (one line, saying what to fix) otherwise.

    Order: a registered name, a catalog id, a local directory or config.json, an HF id complete
    in the local cache. Nothing is downloaded.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model={name!r}: expected a catalog id, a registered name or a path")
    registry = registry or {}
    if name in registry:
        entry = registry[name]
        where = f"{entry.origin} {name}"
        if entry.kind == "hf":
            return _from_hf(name, entry.target, entry.trust_remote_code, where)
        if entry.kind == "config":
            return _from_config(name, Path(entry.target), entry.trust_remote_code, where)
        return _from_directory(name, Path(entry.target), entry.trust_remote_code, where)
    ids = catalog()
    if name in ids:
        return ids[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(name, path.resolve(), False, f"model {name!r}")
    if path.is_file():
        if path.suffix == ".json":
            return _from_config(name, path.resolve(), False, f"model {name!r}")
        raise ValueError(
            f"model {name!r} is a file: give a checkpoint directory or a config.json (shape only)"
        )
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _from_hf(name, name, False, f"model {name!r}")
    known = ", ".join(sorted(ids))
    registered = f"; registered: {', '.join(sorted(registry))}" if registry else ""
    raise ValueError(
        f"unknown model {name!r}: not a catalog id, a registered name, an existing directory "
        f"or config.json, or an HF id (org/name); known: {known}{registered}"
    )


def task_hint(name: str, registry: Optional[Mapping[str, Registration]] = None) -> Optional[str]:
    """The task (``ModelSpec.task``) ``name`` stands for, from the catalog or its config.json
    read as plain JSON (``infer_task``), without importing transformers or checking the model:
    what collection can afford to keep encoders out of generation suites. None when there is no
    config to read (a typo, an HF id not in the cache); the workload then says what is wrong."""
    registry = registry or {}
    config: Optional[Path] = None
    if name in registry:
        entry = registry[name]
        if entry.kind == "config":
            config = Path(entry.target)
        elif entry.kind == "path":
            config = Path(entry.target) / "config.json"
        else:
            config = _cached_config(entry.target)
    elif name in catalog():
        return catalog()[name].task
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            config = path / "config.json"
        elif path.suffix == ".json":
            config = path
        elif name.count("/") == 1:
            config = _cached_config(name)
    if config is None:
        return None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return infer_task(cfg) if isinstance(cfg, dict) else None


def _cached_config(hf_id: str) -> Optional[Path]:
    from .weights import hf_cache_snapshot

    snapshot = hf_cache_snapshot(hf_id)
    return None if snapshot is None else snapshot / "config.json"


def _config_of(directory: Path, where: str) -> dict[str, Any]:
    config = directory / "config.json"
    if not config.is_file():
        raise ValueError(f"{where}: no config.json in {directory}")
    return _read_config(config, where)


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {path} is not a readable JSON config ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{where}: {path} has no model_type; is it a transformers config.json?")
    return data


def _from_directory(name: str, directory: Path, trust: bool, where: str) -> ModelSpec:
    from .weights import has_safetensors

    if not directory.is_dir():
        raise ValueError(f"{where}: no such checkpoint directory {directory}")
    cfg = _config_of(directory, where)
    if not has_safetensors(directory):
        raise ValueError(
            f"{where}: no complete set of *.safetensors weights in {directory} (save it with "
            "save_pretrained(), or register its config.json alone for seeded weights)"
        )
    return _checked(name, cfg, directory / "config.json", "directory", trust, where, directory)


def _from_config(name: str, path: Path, trust: bool, where: str) -> ModelSpec:
    if not path.is_file():
        raise ValueError(f"{where}: no such config file {path}")
    return _checked(name, _read_config(path, where), path, "config", trust, where)


def _from_hf(name: str, hf_id: str, trust: bool, where: str) -> ModelSpec:
    from .weights import hf_cache_snapshot

    snapshot = hf_cache_snapshot(hf_id, need_weights=True)
    if snapshot is None:
        partial = hf_cache_snapshot(hf_id) is not None
        raise ValueError(
            f"{where}: the HF model {hf_id!r} is "
            + (
                "in the local cache without its complete *.safetensors weights"
                if partial
                else "not in the local Hugging Face cache"
            )
            + " and nothing is downloaded; fetch it first (huggingface-cli download "
            f"{hf_id}) or give a local directory"
        )
    cfg = _config_of(snapshot, where)
    config = snapshot / "config.json"
    return _checked(name, cfg, config, "hf-cache", trust, where, snapshot, hf_id)


def _checked(
    name: str,
    cfg: dict[str, Any],
    config: Path,
    source: str,
    trust: bool,
    where: str,
    location: Optional[Path] = None,
    hf_id: Optional[str] = None,
) -> ModelSpec:
    """The spec of a model from disk, once transformers is known to build it."""
    spec = ModelSpec(
        id=name,
        family=cfg["model_type"],
        tier="",
        config_file=str(config),
        hf_id=hf_id,
        suite=False,
        source=source,
        location=None if location is None else str(location),
        trust_remote_code=trust,
    )
    return check_architecture(spec, cfg, where)


def check_architecture(spec: ModelSpec, cfg: dict[str, Any], where: str) -> ModelSpec:
    """A causal LM transformers can build, one whose own code the project trusts, or an encoder
    the base ``AutoModel`` builds (text, or image with an ``image_size``); the spec comes back
    with its ``task`` (``catalog.infer_task``). Which workloads a task runs is the scenario's
    check (an encoder is refused by ``llmperf.generate``, taken by ``llmperf.forward``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    model_type = cfg["model_type"]
    task = infer_task(cfg)
    if task != "causal-lm" and model_type in MODEL_MAPPING_NAMES:
        if task == "image-encoder" and not isinstance(cfg.get("image_size"), int):
            raise ValueError(
                f"{where}: model_type {model_type!r} is an image encoder without an integer "
                "image_size in its config; llmperf.forward needs the input's size"
            )
        return replace(spec, task=task)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return spec
    remote = "AutoModelForCausalLM" in (cfg.get("auto_map") or {})
    if remote and not spec.trust_remote_code:
        raise ValueError(
            f"{where}: model_type {model_type!r} needs the model's own code "
            "(auto_map in its config.json), which runs only when you allow it: register it "
            "with trust_remote_code = true in [tool.llmperf.models]"
        )
    if remote:
        return spec
    import transformers

    if model_type in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a causal language model "
            "(transformers has no AutoModelForCausalLM for it) nor an encoder llmperf.forward "
            "runs; llmperf.generate needs a causal LM"
        )
    raise ValueError(
        f"{where}: transformers {transformers.__version__} does not know model_type "
        f"{model_type!r}; upgrade transformers or register the model with its code "
        "(trust_remote_code = true)"
    )
