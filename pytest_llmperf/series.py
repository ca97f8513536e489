"""Batch-size series and their OOM cells (the seed throughput tables' ``oom`` columns).

A series is one workload at growing batch sizes: same test, model, dtype, engine, options,
devices and backend. Once a batch size of a series ran out of memory — measured, or certain
from the memory estimate — every larger one would too: it is recorded as ``oom`` without
running. On an accelerator that saves minutes of loading and failing; on a CPU host, where an
out-of-memory is the kernel killing the process, it is the difference between a table with
``oom`` cells and a dead run.
"""

from __future__ import annotations

import json
from typing import Optional

from .results import Record
from .spec import RecordContext, WorkloadSpec

#: Spec fields that do not make a different series: the batch size is the series' axis, the
#: rest say how it is measured, not what.
_NOT_SERIES = ("batch_size", "rounds", "warmup", "fresh", "weights")


def series_key(spec: WorkloadSpec, context: RecordContext, backend: str) -> str:
    """What identifies a series: the workload without its batch size, the test function and
    workload name (not the full key: that holds the batch size), the backend and device."""
    fields = {k: v for k, v in spec.to_json().items() if k not in _NOT_SERIES}
    test, _, rest = context.key.partition("[")
    name = rest.rpartition("]")[2] if rest else ""
    where = [context.suite, test, name, backend, context.device_key]
    return json.dumps([where, fields], sort_keys=True)


class OomSeries:
    """The smallest batch size that ran out of memory, per series, for one session."""

    def __init__(self) -> None:
        self._oom_at: dict[str, int] = {}

    def blocked_by(self, spec: WorkloadSpec, context: RecordContext, backend: str) -> Optional[int]:
        """The smaller batch size of this series that was out of memory, if any."""
        at = self._oom_at.get(series_key(spec, context, backend))
        return at if at is not None and at < spec.batch_size else None

    def observe(
        self, spec: WorkloadSpec, context: RecordContext, backend: str, record: Record
    ) -> None:
        if record.outcome != "oom":
            return
        key = series_key(spec, context, backend)
        self._oom_at[key] = min(self._oom_at.get(key, spec.batch_size), spec.batch_size)

    def not_run(self, spec: WorkloadSpec, context: RecordContext, backend: str, at: int) -> Record:
        record = context.new_record(spec, backend)
        record.outcome = "oom"
        record.note = (
            f"not run: batch size {at} of this series (same model, dtype, engine, devices) was "
            f"out of memory, so batch size {spec.batch_size} is too"
        )
        return record
