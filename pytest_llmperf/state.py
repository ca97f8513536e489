"""The run's state: settings, the launchers (and with them the model cache), verdicts and what
goes into reports and baselines.

One object per pytest process, held in ``config.stash`` and created only when a test uses
llmperf (the plugin is loaded by every pytest run in the environment). Workers of
pytest-xdist judge their own tests; the controller collects every record from the test
reports and is the only writer of the report and of baseline files.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import backends, baselines, gate, provenance, report, verdict
from .backends.base import Backend
from .devicelock import DEFAULT_LOCK_DIR
from .launchers import Launchers, LaunchSettings, default_cache_dir
from .processes import ProcessPool
from .results import Record
from .series import OomSeries
from .settings import RECORD_RUN_ENV, DeviceAliases, MarkerOptions, Settings


@dataclass
class JudgeOutcome:
    verdicts: list[Optional[verdict.EntryVerdict]]
    failure: Optional[str]


@dataclass
class RunState:
    settings: Settings
    rootdir: Path
    baselines_root: Path
    report_dir: Optional[Path] = None
    aliases: DeviceAliases = field(default_factory=DeviceAliases)
    #: pytest-xdist workers of this session (0: not distributed).
    workers: int = 0
    benchmark_json: Optional[str] = None
    _launchers: Optional[Launchers] = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    collected_keys: set[tuple[str, str]] = field(default_factory=set)
    #: Tests skipped by llmperf: {"nodeid", "kind": "backend" | "node", "reason"}.
    skips: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: What the report could not do that fails nothing (a plot not drawn), one line each.
    report_notes: list[str] = field(default_factory=list)
    changes: list[baselines.Change] = field(default_factory=list)
    _selected: Optional[list[str]] = None
    #: Batch-size series that ran out of memory: their larger sizes are not run.
    oom_series: OomSeries = field(default_factory=OomSeries)
    _device_keys: dict[str, str] = field(default_factory=dict)
    _provenance: dict[str, dict] = field(default_factory=dict)
    _devices: dict[str, dict] = field(default_factory=dict)
    _files: dict[Path, Any] = field(default_factory=dict)
    _report_failed: bool = False
    #: What the run judged, computed once when it finished.
    final_coverage: Optional[report.Coverage] = None
    #: --llmperf-processes above 1: the child processes' records (set before the tests run).
    process_pool: Optional[ProcessPool] = None

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        rootdir: Path,
        baselines_root: Optional[Path] = None,
        report_dir: Optional[Path] = None,
        aliases: Optional[DeviceAliases] = None,
        workers: int = 0,
    ) -> RunState:
        return cls(
            settings=settings,
            rootdir=rootdir,
            baselines_root=baselines_root or rootdir / "baselines",
            report_dir=report_dir,
            aliases=aliases or DeviceAliases(),
            workers=workers,
        )

    # -- where things are ----------------------------------------------------------------
    @property
    def launchers(self) -> Launchers:
        if self._launchers is None:
            cache_dir = self.settings.cache_dir
            self._launchers = Launchers(
                LaunchSettings(
                    timeout=self.settings.timeout,
                    cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
                    cache_size=self.settings.cache_size,
                    memory_limit=self.settings.memory_limit,
                    lock_dir=(
                        Path(self.settings.lock_dir).expanduser()
                        if self.settings.lock_dir
                        else DEFAULT_LOCK_DIR
                    ),
                    lock_timeout=self.settings.lock_timeout,
                )
            )
        return self._launchers

    def close(self) -> None:
        """End of the session: stop child processes, drop the cached model."""
        if self._launchers is not None:
            self._launchers.close()

    @property
    def selected_backends(self) -> list[str]:
        # Probed on first use, not at configure: most pytest runs never ask.
        if self._selected is None:
            self._selected = backends.select(self.settings.backend)
        return self._selected

    @property
    def updating(self) -> bool:
        return bool(self.settings.update_baselines or self.settings.reset_baselines)

    @property
    def gating(self) -> bool:
        return not (self.settings.no_gate or self.updating)

    @property
    def policy(self) -> gate.GatePolicy:
        return gate.GatePolicy(
            gating=self.gating,
            # Re-measuring in this process cannot average away what differs between processes:
            # with N processes the N medians are the confirmation.
            confirm=0 if self.process_pool is not None else self.settings.confirm,
            strict=self.settings.strict,
            updating=self.updating,
        )

    def describe(self) -> str:
        mode = "updating baselines" if self.updating else ("gate on" if self.gating else "no gate")
        if self.settings.sources.get("tolerance") == "default":
            tol = ", ".join(
                f"{b} {backends.get_backend(b).default_tolerance:.1%}"
                for b in self.selected_backends
            )
        else:
            tol = f"{self.settings.tolerance.get('*', 0.03):.1%}"
        text = (
            f"baselines {self.baselines_root}"
            + (f" (label {self.settings.label})" if self.settings.label else "")
            + f"; {mode}; tolerance {tol}, alpha {self.settings.alpha}; "
            f"{self.settings.rounds} rounds after {self.settings.warmup} warm-up"
        )
        if self.settings.processes > 1:
            text += (
                f"; {self.settings.processes} processes (judged on their medians, "
                f"run-wide alpha {self.settings.family_alpha:g})"
            )
        return text

    def header_lines(self) -> list[str]:
        lines = [f"llmperf: backends {', '.join(self.selected_backends)}; {self.describe()}"]
        if self.aliases.mapping:
            pairs = ", ".join(f"{k} → {v}" for k, v in self.aliases.mapping)
            lines.append(f"llmperf: device aliases ({self.aliases.source}): {pairs}")
        if self.workers > 1:
            lines.append(
                f"llmperf: {self.workers} pytest-xdist workers share each device: their "
                "measurements compete; regressions measured so are inconclusive (run without "
                "-n for numbers to gate on)"
            )
        if self.settings.memory_limit is not None:
            from .units import format_value

            lines.append(
                f"llmperf: memory capped at {format_value(self.settings.memory_limit, 'B')} "
                f"({self.settings.sources.get('memory_limit', '')}): larger workloads are "
                "recorded oom; on cpu the auto launcher runs them in capped child processes"
            )
        if os.environ.get("CI") and self.updating:
            lines.append("llmperf: updating baselines in CI: results are not gated")
        return lines

    def real_device_key(self, backend: Backend) -> str:
        return baselines.safe_component(backend.device_key())

    def device_key(self, backend: Backend) -> str:
        """The device key this backend's baselines are kept under (after device_aliases)."""
        if backend.name not in self._device_keys:
            real = self.real_device_key(backend)
            key = self.aliases.resolve(real)
            self._device_keys[backend.name] = key
            self._devices[backend.name] = backend.device_info() | {"key": key}
        return self._device_keys[backend.name]

    def provenance(self, backend: Backend) -> dict[str, Any]:
        if backend.name not in self._provenance:
            prov = provenance.collect(backend, self.rootdir)
            real = self.real_device_key(backend)
            if real != self.device_key(backend):
                prov["device_key"] = real  # measured on an aliased device
            self._provenance[backend.name] = prov
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
        marker: MarkerOptions,
        override: Optional[dict[str, Any]],
        measured: Optional[set[str]] = None,
        backend: Optional[str] = None,
    ) -> verdict.GateSettings:
        tolerance = dict(self.settings.tolerance)
        if self.settings.sources.get("tolerance") == "default" and backend is not None:
            tolerance["*"] = backends.get_backend(backend).default_tolerance
        tolerance.update(marker.tolerance)
        if override:
            tolerance.update(override.get("tolerance", {}))
        default = tolerance.pop("*", 0.03)
        kwargs: dict[str, Any] = {
            "tolerance": default,
            "tolerances": tolerance,
            "alpha": self.settings.alpha if marker.alpha is None else marker.alpha,
            # A test may mix workloads (generate and measure): a limit applies to those that
            # measure its metric; judge() reports a limit that no workload could meet.
            "limits": {
                k: v for k, v in marker.limits.items() if measured is None or k[4:] in measured
            },
            "check_outputs": bool(self.settings.check_outputs),
        }
        if self.process_pool is not None:
            kwargs["family_alpha"] = self.settings.family_alpha
            kwargs["comparisons"] = self.process_pool.gated_comparisons()
        if marker.gate is not None:
            kwargs["gate"] = marker.gate
        elif override and "gate" in override:  # the workload's kind's own (llmperf.load)
            kwargs["gate"] = override["gate"]
        return verdict.GateSettings(**kwargs)

    def judge(
        self,
        records: list[Record],
        marker: MarkerOptions,
        overrides: dict[str, dict[str, Any]],
        remeasure: Optional[dict[str, Callable[[], Record]]] = None,
    ) -> JudgeOutcome:
        """Verdicts for one test's records, and the failure message when the gate trips.

        ``records`` is updated in place when a change was re-measured: the report and any
        baseline update carry the measurement the verdict was made on.
        """
        verdicts: list[Optional[verdict.EntryVerdict]] = []
        problems: list[str] = []
        measured_anywhere = {
            n for r in records for n, m in r.metrics.items() if m.value is not None
        }
        for limit in marker.limits:
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
            settings = self.gate_settings(
                marker, overrides.get(record.key), measured, record.backend
            )
            record.gated = [name for name in settings.gate if name in measured]
            if self.process_pool is not None:
                record = self.process_pool.combine(record)
            decision = gate.decide(
                record, runs, settings, self.policy, (remeasure or {}).get(record.key)
            )
            records[index] = decision.record
            report.attach_history(decision.verdict, runs)
            verdicts.append(decision.verdict)
            if decision.failed:
                problems.append(report.failure_text(decision.record, decision.verdict, runs))
            elif decision.missing_baseline:
                path = self.baseline_path(record.device_key, record.suite)
                problems.append(
                    f"{record.key}: no baseline in {path} and --llmperf-strict is set; "
                    "record one with --llmperf-update-baselines"
                )
        return JudgeOutcome(verdicts, "\n".join(problems) if problems else None)

    # -- collecting and finishing --------------------------------------------------------
    def collect(self, nodeid: str, test_outcome: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.rows.append({"nodeid": nodeid, "test_outcome": test_outcome, **row})
            record = row["record"]
            self._devices.setdefault(record["backend"], {"key": record["device_key"]})
        self._write_results()

    def note_skip(self, nodeid: str, info: dict[str, str]) -> None:
        self.skips.append({"nodeid": nodeid, **info})

    def _write_results(self) -> None:
        if self.report_dir is None or self._report_failed:
            return
        try:
            report.write_results(self.report_dir, self.rows, self.run_info())
        except OSError as exc:
            # The measurements go on (and baselines are still updated): a report that cannot
            # be written is one error at the end, not an internal error per test.
            self._report_failed = True
            self.errors.append(f"report not written: {exc}")

    def run_info(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings.values),
            "baselines": str(self.baselines_root),
            "label": self.settings.label,
            "devices": {info["key"]: info for info in self._devices.values()},
        }

    def finish(self) -> None:
        if self.updating:
            self._update_baselines()
        # Final from here on: the terminal summary and summary.md show this one count.
        self.final_coverage = self.coverage()
        self.errors += self.strict_problems(self.final_coverage)
        text = report.summary_markdown(self.rows, self.final_coverage) if self.rows else None
        if self.report_dir is not None:
            self._write_results()
            if not self._report_failed:
                try:
                    baselines.atomic_write(
                        self.report_dir / "summary.md", text or report.summary_markdown([])
                    )
                except OSError as exc:
                    self.errors.append(f"report not written: {exc}")
                else:
                    self._draw_plots()
        step = os.environ.get("GITHUB_STEP_SUMMARY")
        if step and text:
            try:
                with open(step, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                self.errors.append(f"GITHUB_STEP_SUMMARY={step}: not written ({exc.strerror})")
        if self.benchmark_json:
            try:
                report.write_benchmark_json(self.benchmark_json, self.benchmark_entries())
            except OSError as exc:
                self.errors.append(f"--benchmark-json: {exc}")

    def _draw_plots(self) -> None:
        """DIR/plots/*.png, after results.json and summary.md are on disk (a chart that fails
        costs one line, never the report), then summary.md again with links to them."""
        assert self.report_dir is not None
        from . import plots

        if not self.rows or not plots.charts(self.rows):
            return
        drawn: Optional[plots.Drawn] = None
        not_drawn = plots.missing()
        if not_drawn is None:
            try:
                drawn = plots.draw(self.rows, self.report_dir / "plots")
            except Exception as exc:  # whatever matplotlib raises: the report stands
                not_drawn = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not_drawn:
            self.report_notes.append(f"plots not drawn: {not_drawn}")
        if drawn is not None:
            self.report_notes += drawn.errors
        lines = plots.summary_lines(drawn, self.report_dir, not_drawn)
        text = report.summary_markdown(self.rows, self.final_coverage, plot_lines=lines)
        try:
            baselines.atomic_write(self.report_dir / "summary.md", text)
        except OSError as exc:
            self.errors.append(f"report not written: {exc}")

    def _update_baselines(self) -> None:
        records = []
        for row in self.rows:
            # A test that failed (its own assertion, a wrong token count) proves nothing about
            # the hardware; only passing tests' ok/oom results become history.
            if row["test_outcome"] == "passed":
                records.append(Record.from_json(row["record"]))
        if self.process_pool is not None:
            # N processes are N runs of history, as `llmperf baselines record --runs N` stores.
            records = self.process_pool.stored_records(records)
        changes, errors = baselines.store_records(
            self.baselines_root,
            records,
            devices=self._devices,
            label=self.settings.label,
            # N processes stored as N runs are all kept: dropping some would judge the next
            # run against fewer of them than were measured.
            keep_runs=max(
                self.settings.baseline_runs,
                self.process_pool.total if self.process_pool is not None else 1,
            ),
            reset=bool(self.settings.reset_baselines),
            append_only=_record_run() > 1,
        )
        self.changes += changes
        self.errors += errors

    # -- what the run checked ------------------------------------------------------------
    def coverage(self) -> report.Coverage:
        """How many workloads were judged against a baseline, and why the others were not."""
        cov = report.Coverage(gating=self.gating, updating=self.updating)
        missing: dict[str, int] = defaultdict(int)
        crashed = unusable = unjudged = 0
        for row in self.rows:
            record = row["record"]
            cov.total += 1
            v = row.get("verdict")
            if record["outcome"] == "error":
                crashed += 1
            elif v is None and row.get("gate_failed"):
                unusable += 1
            elif v is None:
                unjudged += 1
            elif _no_history(v):
                missing[self._missing_reason(record["device_key"], record["suite"])] += 1
            else:
                cov.judged += 1
        if crashed:
            cov.reasons.append(f"{crashed} crashed (outcome error): see their test failures")
        if unusable:
            cov.reasons.append(
                f"{unusable} not judged: their baseline file is unusable (see their test failures)"
            )
        if unjudged:
            cov.reasons.append(
                f"{unjudged} not judged: their test failed before its workloads were judged"
            )
        for reason, count in sorted(missing.items()):
            cov.reasons.append(f"{count} not judged: {reason}")
        cov.missing = sum(missing.values())
        if self.updating:
            cov.reasons = []  # storing, not judging: "not judged" is the point
        self._skip_reasons(cov)
        cov.hints = self._hints(cov)
        return cov

    def _missing_reason(self, device_key: str, suite: str) -> str:
        path = self.baseline_path(device_key, suite)
        if not self.baselines_root.is_dir():
            return f"the baselines directory {self.baselines_root} does not exist"
        if not path.parent.is_dir():
            unlabelled = path.parent.name.split("@", 1)[0]
            also = ""
            if self.settings.label and (self.baselines_root / unlabelled).is_dir():
                also = f" ({unlabelled} without the label has baselines)"
            return f"no baselines for device key {path.parent.name} in {self.baselines_root}{also}"
        if not path.is_file():
            return f"no file {path}"
        return f"no entry for it in {path}"

    def _skip_reasons(self, cov: report.Coverage) -> None:
        grouped: dict[tuple[str, str], int] = defaultdict(int)
        for skip in self.skips:
            grouped[(skip["kind"], skip["reason"])] += 1
        for (kind, reason), count in sorted(grouped.items()):
            tests = f"{count} test{'s' if count != 1 else ''}"
            if kind == "backend":
                # A backend the user selected is not here: what was asked was not checked.
                cov.total += count
                cov.unavailable += count
                cov.reasons.append(f"{tests} not run: {reason}")
            else:
                # This node cannot run it (too few devices, a model that cannot load): by
                # design, not a gap in what was asked; said, but the count stays complete.
                cov.skipped += count
                cov.notes.append(f"{tests} skipped on this node: {reason}")
        cov.all_unavailable = cov.unavailable > 0 and cov.unavailable == cov.total

    def _hints(self, cov: report.Coverage) -> list[str]:
        if cov.judged == cov.total or not self.gating:
            return []
        hints = []
        known = _device_dirs(self.baselines_root)
        measured = {
            row["record"]["device_key"]: row["record"].get("provenance", {}).get("device_key")
            for row in self.rows
        }
        for device_key, real in sorted(measured.items()):
            if device_key in known or not known:
                continue
            others = ", ".join(known)
            hints.append(f"{self.baselines_root} has baselines for: {others}")
            if real:
                hints.append(
                    f"device_aliases ({self.aliases.source}) maps {real} onto {device_key}, "
                    "which has no baselines there: fix the alias, or record baselines for it"
                )
                continue
            close = _closest(device_key, known)
            if close:
                hints += [
                    f"to gate {device_key} against {close[0]}'s baselines deliberately, add to "
                    "pyproject.toml:",
                    "    [tool.llmperf]",
                    f'    device_aliases = {{ "{device_key}" = "{close[0]}" }}',
                ]
        if cov.missing:
            label = f" --llmperf-label={self.settings.label}" if self.settings.label else ""
            hints.append(
                "to record baselines on this node: llmperf baselines record --runs 3 "
                f"<your pytest arguments>{label}"
            )
        return hints

    def strict_problems(self, cov: report.Coverage) -> list[str]:
        """Run-level failures of --llmperf-strict: a run that checked nothing is not green."""
        if not (self.settings.strict and self.gating):
            return []
        problems = []
        for skip in self.skips:
            if skip["kind"] == "backend":
                problems.append(
                    f"--llmperf-strict: {skip['reason']} ({skip['nodeid']} did not run)"
                )
        if cov.shown and cov.judged == 0 and not problems:
            problems.append("--llmperf-strict: no workload was judged against a baseline")
        return problems

    def summary_lines(self, width: int = 120) -> list[str]:
        lines = report.terminal_table(self.rows, width=width)
        lines += [f"llmperf report: {note}" for note in self.report_notes]
        if self.updating:
            lines.append("= llmperf baselines")
            lines += [str(c) for c in self.changes] or ["no baseline changed"]
        return lines

    def benchmark_entries(self) -> list[dict[str, Any]]:
        return report.benchmark_entries(self.rows)


def _no_history(v: dict[str, Any]) -> bool:
    outcome = next((m for m in v.get("metrics", []) if m["metric"] == "outcome"), None)
    return outcome is not None and outcome["verdict"] == "no-baseline"


def _record_run() -> int:
    text = os.environ.get(RECORD_RUN_ENV, "")
    try:
        return int(text.split("/", 1)[0])
    except ValueError:
        return 0


def _device_dirs(root: Path) -> list[str]:
    try:
        return sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.json"))
        )
    except OSError:
        return []


def _closest(device_key: str, known: list[str]) -> list[str]:
    """Device keys of the same backend, most similar first (same vendor and family first)."""
    import difflib

    backend = device_key.split("-", 1)[0]
    same = [k.split("@", 1)[0] for k in known if k.split("-", 1)[0] == backend]
    return sorted(
        dict.fromkeys(same),
        key=lambda k: -difflib.SequenceMatcher(None, device_key, k).ratio(),
    )
