"""A workload as data: what to measure (:class:`WorkloadSpec`) and where its result belongs
(:class:`RecordContext`).

Both are frozen and round-trip through JSON, because a workload leaves the test function: a
child process (crash isolation, cold numbers) or the ranks of a torchrun group receive it as
JSON and send a Record back. Live objects (a loaded model, a closure) never cross. Re-measuring
a workload to confirm a regression is executing the same spec again.

The baseline key is *not* derived from the spec's fields: it is the test's name and parameters
(see ``plugin.baseline_key``), so existing baselines keep matching whatever the spec grows.
Rounds, warm-up and the launcher never enter the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from .errors import UsageError
from .results import Record

#: Workload kinds with a scenario (``scenarios/``).
KINDS = ("generate", "load", "generate_dataset", "forward")
#: How much process isolation a workload asks for: none (the launcher's choice), a fresh
#: process for the workload, or one per round (cold numbers).
FRESH = ("no", "workload", "round")
#: What the OS page cache holds of the checkpoint when a load starts (the load kind): nothing
#: (its files evicted first) or all of it (read once first).
FILE_CACHE = ("cold", "warm")


def freeze_options(options: Optional[Mapping[str, Any]], where: str) -> str:
    """``engine_options`` as canonical JSON text: hashable, comparable, and able to cross a
    process boundary. A value that is not plain JSON is a usage error naming the option."""
    if options is None:
        return "{}"
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}: expected a dict of option names to JSON values")
    for name, value in options.items():
        if not isinstance(name, str):
            raise UsageError(f"{where}: option names are strings, got {name!r}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise UsageError(
                f"{where}[{name!r}]={value!r}: not a JSON value (numbers, strings, booleans, "
                "null, lists and dicts of them); it must cross a process boundary"
            ) from None
    return json.dumps(dict(options), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class WorkloadSpec:
    """One measurement, complete enough to run it in another process."""

    kind: str
    model: str
    engine: str = "transformers"
    engine_options: str = "{}"
    dtype: str = "fp32"
    batch_size: int = 1
    new_tokens: int = 100
    prompt: Optional[str] = None
    prompt_tokens: Optional[int] = None
    sequence_length: Optional[int] = None
    devices: int = 1
    rounds: int = 10
    warmup: int = 2
    fresh: str = "no"
    seed: int = 0
    #: A directory holding this model's weights, set by a launcher that wrote the seeded
    #: weights to disk for its processes; the weight source stays what it describes.
    weights: Optional[str] = None
    #: A model that is not a catalog id, resolved where the test ran (``ModelSpec.to_json`` as
    #: canonical JSON: absolute paths, the registry's answer), so another process measures the
    #: same model without knowing the project's registry or working directory.
    model_source: Optional[str] = None
    #: The load kind: the checkpoint's files evicted from the page cache before each load
    #: (``cold``) or read once before it (``warm``); other kinds ignore it.
    file_cache: str = "cold"
    #: The generate_dataset kind: its prompts as text (they cross process boundaries with the
    #: spec) and where they came from (a file, the shipped file, the call's argument).
    prompts: Optional[tuple[str, ...]] = None
    prompts_source: Optional[str] = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(json.loads(self.engine_options))

    def again(self) -> WorkloadSpec:
        """The same workload measured once more: the model is warm, one warm-up call re-primes
        caches other tests may have evicted."""
        return replace(self, warmup=min(self.warmup, 1))

    def params(self) -> dict[str, Any]:
        """What a record's ``workload`` says about this measurement (for people and reports)."""
        out: dict[str, Any] = {
            "model": self.model,
            "batch_size": self.batch_size,
            "new_tokens": self.new_tokens,
            "dtype": self.dtype,
            "engine": self.engine,
            "devices": self.devices,
        }
        if self.options:
            out["engine_options"] = self.options
        if self.kind == "load":  # a load has no batch and no tokens, but a file cache
            del out["batch_size"], out["new_tokens"]
            out["file_cache"] = self.file_cache
        if self.kind == "forward":  # one pass over a fixed shape: no tokens generated
            del out["new_tokens"]
            if self.sequence_length is not None:  # an image model's shape is its image size
                out["sequence_length"] = self.sequence_length
        if self.prompts is not None:
            from .prompts import digest

            out["prompts"] = self.prompts_source
            out["prompts_sha256"] = digest(self.prompts)
            out["prompt_count"] = len(self.prompts)
            out["prompt_tokens"] = self.prompt_tokens
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine_options"] = self.options
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkloadSpec:
        """Rebuild a spec sent by another process; a malformed one is a ValueError naming the
        field (a worker reports it as an error, never runs half a workload)."""
        if not isinstance(data, Mapping):
            raise ValueError("workload spec: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"workload spec: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        values["engine_options"] = freeze_options(values.get("engine_options"), "engine_options")
        if isinstance(values.get("prompts"), list):  # JSON has no tuples
            values["prompts"] = tuple(values["prompts"])
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        """Types and ranges every launcher relies on; UsageError naming the field."""
        if self.kind not in KINDS:
            raise UsageError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("model", "engine", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"{name}={getattr(self, name)!r}: expected a non-empty string")
        for name in ("batch_size", "new_tokens", "devices", "rounds"):
            check_positive(name, getattr(self, name))
        for name in ("prompt_tokens", "sequence_length"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if not _is_int(self.warmup) or self.warmup < 0:
            raise UsageError(f"warmup={self.warmup!r}: expected an integer ≥ 0")
        if not _is_int(self.seed) or self.seed < 0:
            raise UsageError(f"seed={self.seed!r}: expected an integer ≥ 0")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise UsageError(f"prompt={self.prompt!r}: expected text")
        if self.prompts is not None and (
            not isinstance(self.prompts, tuple)
            or not self.prompts
            or not all(isinstance(p, str) and p.strip() for p in self.prompts)
        ):
            raise UsageError("prompts: expected a non-empty tuple of non-empty strings")
        if self.fresh not in FRESH:
            raise UsageError(f"fresh={self.fresh!r}: expected one of {', '.join(FRESH)}")
        if self.file_cache not in FILE_CACHE:
            raise UsageError(f"file_cache={self.file_cache!r}: expected 'cold' or 'warm'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> None:
    """A usage error naming ``name`` unless ``value`` is a whole number ≥ 1 (bools are not)."""
    if not _is_int(value) or value < 1:
        raise UsageError(f"{name}={value!r}: expected a positive integer")


@dataclass(frozen=True)
class RecordContext:
    """Where a workload's record belongs: the test's baseline key, suite and device, the
    provenance of this run. Computed by the plugin, carried to wherever the spec runs."""

    key: str
    suite: str
    device_key: str
    nodeid: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    #: The test's parameters (except the backend), as the report shows them.
    params: Mapping[str, Any] = field(default_factory=dict)
    #: pytest-xdist workers sharing this backend's device (0 or 1: none).
    shared_workers: int = 0

    def new_record(self, spec: Optional[WorkloadSpec], backend: str) -> Record:
        """A record of this test's workload; ``spec`` None for what is not a spec (a timed
        callable, a crash before any workload was described)."""
        return Record(
            key=self.key,
            suite=self.suite,
            backend=backend,
            device_key=self.device_key,
            outcome="ok",
            workload={**self.params, **(spec.params() if spec is not None else {})},
            provenance=dict(self.provenance),
            nodeid=self.nodeid,
            shared_workers=self.shared_workers,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordContext:
        if not isinstance(data, Mapping) or not all(
            isinstance(data.get(k), str) for k in ("key", "suite", "device_key")
        ):
            raise ValueError("record context: expected an object with key, suite and device_key")
        return cls(
            key=data["key"],
            suite=data["suite"],
            device_key=data["device_key"],
            nodeid=str(data.get("nodeid", "")),
            provenance=dict(data.get("provenance") or {}),
            params=dict(data.get("params") or {}),
            shared_workers=int(data.get("shared_workers") or 0),
        )
