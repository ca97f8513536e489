"""The run's state: settings, the model cache, verdicts and what goes into reports and baselines.

One object per pytest process, held in ``config.stash``. Workers of pytest-xdist judge their own
tests; the controller collects every record from the test reports and is the only writer of
the report and of baseline files.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import backends, baselines, provenance, report, verdict
from .backends.base import Backend
from .metrics import main_metric
from .results import Record
from .runner import BUSY_NOTE, INCONCLUSIVE_NOTE, ModelCache
from .settings import Settings


@dataclass
class JudgeOutcome:
    verdicts: list[Optional[verdict.EntryVerdict]]
    failure: Optional[str]


@dataclass
class RunState:
    settings: Settings
    rootdir: Path
    selected_backends: list[str]
    benchmark_json: Optional[str] = None
    cache: ModelCache = field(default_factory=ModelCache)
    rows: list[dict[str, Any]] = field(default_factory=list)
    collected_keys: set[tuple[str, str]] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    changes: list[baselines.Change] = field(default_factory=list)
    _device_keys: dict[str, str] = field(default_factory=dict)
    _provenance: dict[str, dict] = field(default_factory=dict)
    _devices: dict[str, dict] = field(default_factory=dict)
    _files: dict[Path, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        rootdir: Path,
    ) -> RunState:
        return cls(
            settings=settings,
            rootdir=rootdir,
            selected_backends=backends.select(settings.backend),
        )

    # -- where things are ----------------------------------------------------------------
    @property
    def baselines_root(self) -> Path:
        value = self.settings.baselines
        if not value:
            return self.rootdir / "baselines"
        path = Path(value)
        return path if path.is_absolute() else self.rootdir / path

    @property
    def updating(self) -> bool:
        return bool(self.settings.update_baselines or self.settings.reset_baselines)

    @property
    def gating(self) -> bool:
        return not (self.settings.no_gate or self.updating)

    def describe(self) -> str:
        mode = "updating baselines" if self.updating else ("gate on" if self.gating else "no gate")
        if self.settings.sources.get("tolerance") == "default":
            tol = ", ".join(
                f"{b} {backends.get_backend(b).default_tolerance:.1%}"
                for b in self.selected_backends
            )
        else:
            tol = f"{self.settings.tolerance.get('*', 0.03):.1%}"
        return (
            f"baselines {self.baselines_root}"
            + (f" (label {self.settings.label})" if self.settings.label else "")
            + f"; {mode}; tolerance {tol}, alpha {self.settings.alpha}; "
            f"{self.settings.rounds} rounds after {self.settings.warmup} warm-up"
        )

    def device_key(self, backend: Backend) -> str:
        if backend.name not in self._device_keys:
            self._device_keys[backend.name] = baselines.safe_component(backend.device_key())
            self._devices[backend.name] = backend.device_info() | {
                "key": self._device_keys[backend.name]
            }
        return self._device_keys[backend.name]

    def provenance(self, backend: Backend) -> dict[str, Any]:
        if backend.name not in self._provenance:
            self._provenance[backend.name] = provenance.collect(backend, self.rootdir)
        return self._provenance[backend.name]

    def baseline_path(self, device_key: str, suite: str) -> Path:
        return baselines.baseline_path(self.baselines_root, device_key, suite, self.settings.label)

    def _file(self, device_key: str, suite: str) -> Optional[baselines.BaselineFile]:
        path = self.baseline_path(device_key, suite)
        if path not in self._files:
            try:
                self._files[path] = baselines.load(path)
            except baselines.BaselineError as exc:
                self._files[path] = exc
        value = self._files[path]
        if isinstance(value, baselines.BaselineError):
            raise value
        return value

    # -- the gate ------------------------------------------------------------------------
    def gate_settings(
        self,
        marker: dict[str, Any],
        override: Optional[dict[str, Any]],
        measured: Optional[set[str]] = None,
        backend: Optional[str] = None,
    ) -> verdict.GateSettings:
        tolerance = dict(self.settings.tolerance)
        if self.settings.sources.get("tolerance") == "default" and backend is not None:
            tolerance["*"] = backends.get_backend(backend).default_tolerance
        tolerance.update(marker.get("tolerance", {}))
        if override:
            tolerance.update(override.get("tolerance", {}))
        default = tolerance.pop("*", 0.03)
        kwargs: dict[str, Any] = {
            "tolerance": default,
            "tolerances": tolerance,
            "alpha": marker.get("alpha", self.settings.alpha),
            # A test may mix workloads (generate and measure): a limit applies to those that
            # measure its metric; judge() reports a limit that no workload could meet.
            "limits": {
                k: v
                for k, v in marker.get("limits", {}).items()
                if measured is None or k[4:] in measured
            },
            "check_outputs": bool(self.settings.check_outputs),
        }
        if "gate" in marker:
            kwargs["gate"] = tuple(marker["gate"])
        return verdict.GateSettings(**kwargs)

    def judge(
        self,
        records: list[Record],
        marker: dict[str, Any],
        overrides: dict[str, dict[str, Any]],
        remeasure: Optional[dict[str, Callable[[], Record]]] = None,
    ) -> JudgeOutcome:
        """Verdicts for one test's records, and the failure message when the gate trips.

        ``records`` is updated in place when a regression was re-measured: the report and any
        baseline update carry the measurement the verdict was made on.
        """
        verdicts: list[Optional[verdict.EntryVerdict]] = []
        problems: list[str] = []
        measured_anywhere = {
            n for r in records for n, m in r.metrics.items() if m.value is not None
        }
        for limit in marker.get("limits", {}):
            if limit[4:] not in measured_anywhere and any(r.outcome == "ok" for r in records):
                problems.append(
                    f"marker llmperf({limit}=...): no workload of this test measures "
                    f"{limit[4:]} (measured: {', '.join(sorted(measured_anywhere))})"
                )
        for index, record in enumerate(records):
            if record.outcome == "error":
                verdicts.append(None)
                continue
            try:
                base = self._file(record.device_key, record.suite)
            except baselines.BaselineError as exc:
                verdicts.append(None)
                problems.append(f"{record.key}: {exc}")
                continue
            runs = base.runs(record.key) if base is not None else []
            measured = {n for n, m in record.metrics.items() if m.value is not None}
            gate = self.gate_settings(marker, overrides.get(record.key), measured, record.backend)
            entry = verdict.judge(record, runs, gate)
            again = (remeasure or {}).get(record.key)
            if self.gating and again is not None and _confirmable(entry):
                record, entry = self._confirm(record, entry, runs, gate, again)
                records[index] = record
            verdicts.append(entry)
            if not self.gating:
                continue
            busy = BUSY_NOTE in record.note and not self.settings.strict
            if busy and _confirmable(entry) and not all(m.limit for m in entry.failures()):
                # Numbers taken while other processes fought for the CPU say nothing about
                # the code; a red here would be noise. --llmperf-strict fails it anyway.
                record.note += f"; {INCONCLUSIVE_NOTE}"
                continue
            if entry.failed:
                problems.append(self._failure_text(record, entry, runs))
            elif self.settings.strict and entry.worst is verdict.Verdict.NO_BASELINE:
                path = self.baseline_path(record.device_key, record.suite)
                problems.append(
                    f"{record.key}: no baseline in {path} and --llmperf-strict is set; "
                    "record one with --llmperf-update-baselines"
                )
        return JudgeOutcome(verdicts, "\n".join(problems) if problems else None)

    def _confirm(
        self,
        record: Record,
        entry: verdict.EntryVerdict,
        runs: list[dict],
        gate: verdict.GateSettings,
        again: Callable[[], Record],
    ) -> tuple[Record, verdict.EntryVerdict]:
        """Re-measure a regressed workload; it fails only if no measurement passes.

        Noise on shared machines is bursty: a neighbour's job slows one workload for a few
        seconds (measured here: single runs 1.8x slower, the next workload unaffected). A real
        regression is still there when measured again; a burst is not.
        """
        attempts = [record]
        first_failure = entry.failures()[0].metric
        while _confirmable(entry) and len(attempts) <= self.settings.confirm:
            attempts.append(again())
            best = min(attempts, key=_main_median)
            entry = verdict.judge(best, runs, gate)
        best = min(attempts, key=_main_median)
        # The numbers of the metric that failed first, so the note speaks of what the gate saw.
        name = first_failure
        medians = ", ".join(
            report.format_metric(r.value(name), name) if name in r.metrics else "-"
            for r in attempts
        )
        if entry.failed:
            word = f"regression confirmed by {len(attempts)} measurements ({medians})"
        else:
            word = (
                f"not confirmed: re-measured {len(attempts) - 1}x ({medians}), judged on the best"
            )
        best.note = "; ".join(n for n in (best.note, word) if n)
        return best, entry

    def _failure_text(self, record: Record, entry: verdict.EntryVerdict, runs: list[dict]) -> str:
        lines = [f"{record.key} on {record.device_key}:"]
        lines += [
            f"  {'over the limit' if m.limit else m.verdict.value}: {m.detail}"
            for m in entry.failures()
        ]
        if "confirmed by" in record.note:
            lines.append("  " + record.note.split("; ")[-1])
        if all(m.limit for m in entry.failures()):
            lines.append(
                "  an absolute limit of the marker llmperf(...): raise it there if the new "
                "numbers are acceptable"
            )
            return "\n".join(lines)
        if runs:
            changed = baselines.version_changes(
                baselines.perf_versions(runs[-1].get("provenance", {})),
                baselines.perf_versions(record.provenance),
            )
            lines.append(
                "  changed since the baseline: " + (", ".join(changed) if changed else "nothing")
            )
        lines.append(
            "  if the new numbers are right: pytest ... --llmperf-update-baselines "
            "(or --llmperf-reset-baselines after an upgrade)"
        )
        return "\n".join(lines)

    # -- collecting and finishing --------------------------------------------------------
    def collect(self, nodeid: str, test_outcome: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.rows.append({"nodeid": nodeid, "test_outcome": test_outcome, **row})
            record = row["record"]
            self._devices.setdefault(record["backend"], {"key": record["device_key"]})
        if self.settings.report:
            report.write_results(self.report_dir, self.rows, self.run_info())

    @property
    def report_dir(self) -> Path:
        path = Path(self.settings.report)
        return path if path.is_absolute() else self.rootdir / path

    def run_info(self) -> dict[str, Any]:
        return {
            "settings": {k: v for k, v in self.settings.values.items()},
            "baselines": str(self.baselines_root),
            "label": self.settings.label,
        }

    def finish(self) -> None:
        if self.updating:
            self._update_baselines()
        text = report.summary_markdown(self.rows) if self.rows else None
        if self.settings.report:
            report.write_results(self.report_dir, self.rows, self.run_info())
            (self.report_dir / "summary.md").write_text(text or report.summary_markdown([]))
        step = os.environ.get("GITHUB_STEP_SUMMARY")
        if step and text:
            with open(step, "a") as f:
                f.write(text)
        if self.benchmark_json:
            report.write_benchmark_json(self.benchmark_json, self.benchmark_entries())

    def _update_baselines(self) -> None:
        groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
        devices: dict[str, dict] = {}
        for row in self.rows:
            record = Record.from_json(row["record"])
            # A test that failed (its own assertion, a wrong token count) proves nothing about
            # the hardware; only passing tests' ok/oom results become history.
            if record.outcome not in ("ok", "oom") or row["test_outcome"] != "passed":
                continue
            groups[(record.device_key, record.suite)].append(record)
            devices[record.device_key] = self._devices.get(
                record.backend, {"key": record.device_key, "backend": record.backend}
            )
        for (device_key, suite), records in sorted(groups.items()):
            path = self.baseline_path(device_key, suite)
            try:
                self.changes += baselines.update(
                    path,
                    records,
                    device=devices[device_key],
                    suite=suite,
                    keep_runs=self.settings.baseline_runs,
                    reset=bool(self.settings.reset_baselines),
                )
            except (baselines.BaselineError, OSError) as exc:
                self.errors.append(f"baselines not updated: {exc}")

    def summary_lines(self, width: int = 120) -> list[str]:
        lines = report.terminal_table(self.rows, width=width, updating=self.updating)
        if self.updating:
            lines.append("= llmperf baselines")
            lines += [str(c) for c in self.changes] or ["no baseline changed"]
        lines += [f"ERROR {e}" for e in self.errors]
        return lines

    def benchmark_entries(self) -> list[dict[str, Any]]:
        return report.benchmark_entries(self.rows)


def _main_median(record: Record) -> float:
    value = record.value(main_metric(record.metrics))
    return float("inf") if value is None else value


def _confirmable(entry: verdict.EntryVerdict) -> bool:
    """Failed on measured numbers only: an OOM or a changed output does not go away."""
    failures = entry.failures()
    return bool(failures) and all(m.verdict is verdict.Verdict.REGRESSED for m in failures)
