"""The gate policy: from one measured record and its baseline history to pass, fail or
inconclusive, including the re-measurement that confirms a change.

Pure code (no pytest, no files): the plugin calls :func:`decide` when a test ends, and
``benchmarks/gate_quality.py`` can call it on pooled runs. The statistics per metric live in
:mod:`pytest_llmperf.verdict`; this module adds what a CI gate needs on top of them:

* **confirmation** — noise on shared machines comes in bursts (a neighbour's job slows one
  workload for a few seconds; measured here: single runs 1.8x slower, the next workload
  unaffected). A change is measured again, up to ``confirm`` times, and judged on the
  measurement least in its favour: the best one for a regression, the worst one for an
  improvement. A real change is still there when measured again; a burst is not.
* **contention** — numbers taken while another job ran on the node (load average) or while
  pytest-xdist workers shared the device say nothing about the code: a regression then is
  *inconclusive* and does not fail, unless ``strict``.
* **a new level** — a change that survived confirmation is recorded on the record
  (``record.change``), so accepting the run (``--llmperf-update-baselines``) starts a fresh
  history instead of appending one run that the median of the old ones would outvote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import verdict
from .noise import SCATTER_LIMIT
from .results import Record
from .units import format_value

Remeasure = Callable[[], Record]


@dataclass(frozen=True)
class GatePolicy:
    """How the gate acts on a verdict (the statistics are :class:`verdict.GateSettings`)."""

    #: A failed verdict fails the test (off under --llmperf-no-gate and while updating).
    gating: bool = True
    #: Re-measurements allowed to confirm a change (--llmperf-confirm).
    confirm: int = 2
    #: Contended regressions and missing baselines fail too (--llmperf-strict).
    strict: bool = False
    #: The run will be stored (--llmperf-update-baselines): improvements are confirmed too,
    #: since a confirmed change starts a new history.
    updating: bool = False


@dataclass
class GateDecision:
    #: The measurement the verdict was made on (one of the confirmation's, when re-measured).
    record: Record
    verdict: verdict.EntryVerdict
    #: The test fails because of this verdict.
    failed: bool
    #: The verdict failed but the numbers were contended, so the test does not fail.
    inconclusive: bool
    #: No baseline, and --llmperf-strict asks for one.
    missing_baseline: bool


def change_of(entry: verdict.EntryVerdict) -> Optional[str]:
    """``"regressed"``, ``"improved"``, ``"limit"`` (only absolute limits failed) or None.

    An OOM or a changed greedy output is not noise: it is never re-measured and never a
    "change" of level (the outcome and digest are compared on their own).
    """
    failures = entry.failures()
    if failures:
        if not all(m.verdict is verdict.Verdict.REGRESSED for m in failures):
            return None
        return "limit" if all(m.limit for m in failures) else "regressed"
    if any(m.gated and m.verdict is verdict.Verdict.IMPROVED for m in entry.metrics):
        return "improved"
    return None


def _headline(record: Record) -> float:
    value = record.median
    return float("inf") if value is None else value


@dataclass
class _Confirmation:
    """Re-measuring one workload against its stored runs, up to ``allowed`` times."""

    runs: list[dict[str, Any]]
    settings: verdict.GateSettings
    again: Remeasure
    allowed: int

    def judge(self, record: Record) -> verdict.EntryVerdict:
        return verdict.judge(record, self.runs, self.settings)

    def regression(
        self, record: Record, entry: verdict.EntryVerdict
    ) -> tuple[Record, verdict.EntryVerdict]:
        """Judge on the best measurement, so it fails only if every measurement regresses."""
        direction = change_of(entry)
        attempts, chosen = [record], record
        while change_of(entry) == direction and len(attempts) <= self.allowed:
            attempts.append(self.again())
            chosen = min(attempts, key=_headline)
            entry = self.judge(chosen)
        chosen.measurements = [_headline(r) for r in attempts]
        confirmed = change_of(entry) == direction
        if confirmed and _spread(attempts) > SCATTER_LIMIT:
            # Every measurement regressed, but they disagree by more than a quiet device
            # allows: a neighbour's job, not (only) the code.
            chosen.scatter = _spread(attempts)
        if confirmed:
            word = confirmation_text(str(direction), chosen.measurements)
        else:
            shown = _listed(chosen.measurements)
            word = f"not confirmed: re-measured {len(attempts) - 1}x ({shown}), judged on the best"
        _add_note(chosen, word)
        if chosen is not record:
            _carry(record, chosen)
            entry = self.judge(chosen)
        return chosen, entry

    def improvement(
        self, record: Record, entry: verdict.EntryVerdict
    ) -> tuple[Record, verdict.EntryVerdict, bool]:
        """Confirmed when every measurement improves. An unconfirmed one keeps the original
        verdict: an improvement never turns into a failure because a re-measurement was slow."""
        attempts = [record]
        while len(attempts) <= self.allowed:
            attempts.append(self.again())
            if change_of(self.judge(attempts[-1])) != "improved":
                record.measurements = [_headline(r) for r in attempts]
                shown = _listed(record.measurements)
                _add_note(
                    record, f"improvement not confirmed: re-measured {len(attempts) - 1}x ({shown})"
                )
                return record, entry, False
        worst = max(attempts, key=_headline)
        if worst is not record:
            _carry(record, worst)
        worst.measurements = [_headline(r) for r in attempts]
        _add_note(worst, confirmation_text("improved", worst.measurements))
        return worst, self.judge(worst), True


def _spread(attempts: list[Record]) -> float:
    medians = [_headline(r) for r in attempts]
    return max(medians) / min(medians) - 1 if len(medians) > 1 and min(medians) > 0 else 0.0


#: Metrics of a workload's start (loading, the warm-up with its compile): measured once, by the
#: first measurement; a re-measurement reuses the warm model and warms up less.
_FIRST_ONLY = ("load_time_s", "warmup_s")


def _carry(first: Record, chosen: Record) -> None:
    for name in _FIRST_ONLY:
        if name == chosen.main_metric:  # a load record: each measurement's rounds are loads
            continue
        if name in first.metrics:
            chosen.metrics[name] = first.metrics[name]
        else:
            chosen.metrics.pop(name, None)


def _listed(medians: Sequence[float]) -> str:
    return ", ".join(format_value(m, "s") for m in medians)


def confirmation_text(direction: str, medians: Sequence[float]) -> str:
    """The sentence a change that survived re-measuring carries, in the record's note and in
    a red test's message: ``regression confirmed by 3 measurements (140.1 ms, …)``."""
    n, shown = len(medians), _listed(medians)
    if direction == "limit":
        return f"over the limit in all {n} measurements ({shown})"
    if direction == "improved":
        return f"improvement confirmed by {n} measurements ({shown})"
    return f"regression confirmed by {n} measurements ({shown})"


def _add_note(record: Record, text: str) -> None:
    record.note = "; ".join(n for n in (record.note, text) if n)


def decide(
    record: Record,
    runs: list[dict[str, Any]],
    settings: verdict.GateSettings,
    policy: GatePolicy,
    again: Optional[Remeasure] = None,
) -> GateDecision:
    """Judge ``record`` against ``runs`` (oldest first) under ``policy``.

    ``again`` measures the same workload once more (None: it cannot be re-measured). The
    returned record may be another measurement than ``record``; its ``change``,
    ``inconclusive`` and ``measurements`` fields and its note say what the gate did.
    """
    entry = verdict.judge(record, runs, settings)
    direction = change_of(entry)
    # With confirmation off the single measurement decides, as the user asked.
    confirmed = policy.confirm == 0
    confirming = _Confirmation(runs, settings, again, policy.confirm) if again else None
    if confirming and policy.confirm > 0 and direction in ("regressed", "limit"):
        # Also when not gating: a report should not call a burst a regression, and storing
        # the run must know whether the level changed.
        first = direction
        record, entry = confirming.regression(record, entry)
        direction = change_of(entry)
        confirmed = direction == first
    elif confirming and policy.confirm > 0 and direction == "improved" and policy.updating:
        # An improvement fails nothing: re-measured only when it is about to be stored.
        record, entry, confirmed = confirming.improvement(record, entry)
    failed = entry.failed
    limits_only = direction == "limit"
    inconclusive = failed and record.contended and not policy.strict and not limits_only
    if inconclusive:
        _add_note(record, "inconclusive: regressed while the device was contended")
    record.inconclusive = entry.inconclusive = inconclusive
    level = direction in ("regressed", "improved") and confirmed and not record.contended
    record.change = direction if level else None
    missing = policy.gating and policy.strict and entry.worst is verdict.Verdict.NO_BASELINE
    return GateDecision(
        record=record,
        verdict=entry,
        failed=policy.gating and failed and not inconclusive,
        inconclusive=inconclusive,
        missing_baseline=missing,
    )
