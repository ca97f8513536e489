"""One test's measured record: what the verdict judges, the report prints and baselines store."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .metrics import METRICS, metric


@dataclass
class MetricValue:
    """A metric's summary (the median of its samples, or a single reading) plus the samples."""

    name: str
    value: float | None
    samples: list[float] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return metric(self.name).unit

    @property
    def direction(self) -> str:
        return metric(self.name).direction

    @classmethod
    def from_samples(cls, name: str, samples: list[float]) -> MetricValue:
        return cls(name, statistics.median(samples) if samples else None, list(samples))

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "direction": self.direction,
            "median": self.value,
            "samples": list(self.samples),
        }


@dataclass
class Record:
    """Everything one workload of one test produced on one backend.

    ``key`` is the canonical baseline key (test function + sorted workload parameters +
    ``:name``), never the raw node id, so renaming parametrize ids orphans nothing.
    """

    key: str
    suite: str
    backend: str
    device_key: str
    outcome: str
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    output_digest: str | None = None
    output_head: list[int] | None = None
    workload: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    nodeid: str = ""

    def __getattr__(self, name: str) -> Any:
        # result.e2e_latency_s reads like the README's metric table.
        if name in METRICS:
            return self.value(name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def value(self, name: str) -> float | None:
        m = self.metrics.get(name)
        return None if m is None else m.value

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "nodeid": self.nodeid,
            "suite": self.suite,
            "backend": self.backend,
            "device_key": self.device_key,
            "outcome": self.outcome,
            "note": self.note,
            "workload": self.workload,
            "output_digest": self.output_digest,
            "output_head": self.output_head,
            "metrics": {n: m.to_json() for n, m in sorted(self.metrics.items())},
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(
            key=data["key"],
            nodeid=data.get("nodeid", ""),
            suite=data["suite"],
            backend=data["backend"],
            device_key=data["device_key"],
            outcome=data["outcome"],
            note=data.get("note", ""),
            workload=data.get("workload", {}),
            output_digest=data.get("output_digest"),
            output_head=data.get("output_head"),
            metrics={
                n: MetricValue(n, m.get("median"), list(m.get("samples", [])))
                for n, m in data.get("metrics", {}).items()
            },
            provenance=data.get("provenance", {}),
        )
