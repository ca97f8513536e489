"""One test's measured record: what the verdict judges, the report prints and baselines store."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .metrics import METRICS, main_metric, metric


@dataclass
class MetricValue:
    """A metric's summary (the median of its samples, or a single reading) plus the samples."""

    name: str
    value: float | None
    samples: list[float] = field(default_factory=list)
    #: With --llmperf-processes=N: each process's median (the parent's last); ``value`` is
    #: their median and ``samples`` all processes' rounds. Empty for one process.
    processes: list[float] = field(default_factory=list)

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
        out: dict[str, Any] = {
            "unit": self.unit,
            "direction": self.direction,
            "median": self.value,
            "samples": list(self.samples),
        }
        if self.processes:
            out["processes"] = list(self.processes)
        return out


@dataclass
class Record:
    """Everything one workload of one test produced on one backend.

    ``key`` is the canonical baseline key (test function + sorted workload parameters +
    ``:name``), never the raw node id, so renaming parametrize ids orphans nothing.

    What the gate decides from is a field, never a phrase in ``note`` (which is for people):

    * ``busy_load`` — the load average when the part of it that is not ours (our process
      family's share: ``noise.own_load``) exceeded what a quiet host shows (another job on
      the node); ``shared_workers`` — pytest-xdist workers that shared the
      device while this was measured; ``scatter`` — the rounds' robust CV, or the spread of
      confirmation measurements, when beyond what a quiet device shows (the load average lags a
      minute behind a neighbour's job, the scatter does not). Any of them makes a regression
      *inconclusive*. ``device_users`` — processes outside our process family that were
      active on the measured devices during the rounds (``Backend.device_users``: another
      job's kernels on the GPU), as ``pid 4242 python (3.1 GiB)``; any makes it inconclusive
      too.
    * ``inconclusive`` — set by the gate when it did not fail a regression for that reason.
    * ``measurements`` — the headline medians of every measurement when a change was
      re-measured to confirm it (the first is the original).
    * ``change`` — ``"regressed"`` or ``"improved"`` when the gate found a change against the
      stored history that survived the confirmation: storing this run starts a new history.
    * ``processes`` — how many processes' records this one combines (--llmperf-processes);
      ``gated`` — the metrics the gate judged (the family-wise correction counts them).
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
    busy_load: float | None = None
    shared_workers: int = 0
    scatter: float | None = None
    device_users: list[str] = field(default_factory=list)
    inconclusive: bool = False
    measurements: list[float] = field(default_factory=list)
    change: str | None = None
    #: The first prompts as the model saw them and the text it generated after them
    #: ({"prompt", "continuation"}), for people to read: in results.json and summary.md,
    #: never in a baseline (text is no measurement; output_digest is what is compared).
    generated_text: list[dict[str, str]] = field(default_factory=list)
    processes: int = 1
    gated: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        # result.e2e_latency_s reads like the README's metric table.
        if name in METRICS:
            return self.value(name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def value(self, name: str) -> float | None:
        m = self.metrics.get(name)
        return None if m is None else m.value

    @property
    def main_metric(self) -> str:
        """The headline metric: ``e2e_latency_s`` for generate, ``time_s`` for measure,
        ``dataset_time_s`` for generate_dataset, ``load_time_s`` for load."""
        return main_metric(self.metrics)

    @property
    def median(self) -> float | None:
        """Median of the headline metric's rounds, in seconds (None unless outcome is ok)."""
        return self.value(self.main_metric)

    @property
    def samples(self) -> list[float]:
        """The headline metric's per-round values, in seconds, in the order measured."""
        m = self.metrics.get(self.main_metric)
        return list(m.samples) if m is not None else []

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def contended(self) -> bool:
        """Measured while something else competed for the device: numbers not to judge on."""
        return (
            self.busy_load is not None
            or self.shared_workers > 1
            or self.scatter is not None
            or bool(self.device_users)
        )

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
            "busy_load": self.busy_load,
            "shared_workers": self.shared_workers,
            "scatter": self.scatter,
            "device_users": list(self.device_users),
            "inconclusive": self.inconclusive,
            "measurements": list(self.measurements),
            "change": self.change,
            "generated_text": [dict(item) for item in self.generated_text],
            "processes": self.processes,
            "gated": list(self.gated),
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
                n: MetricValue(
                    n,
                    m.get("median"),
                    list(m.get("samples", [])),
                    list(m.get("processes") or []),
                )
                for n, m in data.get("metrics", {}).items()
            },
            provenance=data.get("provenance", {}),
            busy_load=data.get("busy_load"),
            shared_workers=int(data.get("shared_workers") or 0),
            scatter=data.get("scatter"),
            device_users=[str(user) for user in data.get("device_users") or []],
            inconclusive=bool(data.get("inconclusive", False)),
            measurements=list(data.get("measurements") or []),
            change=data.get("change"),
            generated_text=[dict(item) for item in data.get("generated_text") or []],
            processes=int(data.get("processes") or 1),
            gated=[str(name) for name in data.get("gated") or []],
        )
