"""Reading what a run left behind, the way a user would: results.json, baseline files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

#: Selects the fake chip of tests/fakes.py.
FAKE = "--llmperf-backend=fake"

#: A test file with one generate workload on the fake chip (key ``test_gen``).
GENERATE = """
    def test_gen(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)
"""


def one_line_error(result: pytest.RunResult) -> str:
    """The single ``ERROR: ...`` line pytest prints for a usage error."""
    lines = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(lines) == 1, result.stderr.str()
    return lines[0]


def no_traceback(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text
    assert "INTERNALERROR" not in text


def read_results(directory: Path) -> list[dict[str, Any]]:
    """The rows of ``<directory>/results.json`` written by ``--llmperf-report``."""
    return json.loads((Path(directory) / "results.json").read_text())["results"]


def record_of(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    found = [row["record"] for row in rows if row["record"]["key"] == key]
    assert len(found) == 1, (
        f"expected one record {key!r}, got keys {[r['record']['key'] for r in rows]}"
    )
    return found[0]


def samples(record: dict[str, Any], metric: str) -> list[float]:
    return record["metrics"][metric]["samples"]


def baseline_file(root: Path, suite: str, device: str = "fake-chip") -> dict[str, Any]:
    return json.loads((Path(root) / "baselines" / device / f"{suite}.json").read_text())


def execute_fresh(spec: Any, context: Any, backend: Any, store: Any) -> Any:
    """``execute`` one spec with a model cache of its own, dropped afterwards: each engine
    test starts without a model another test left resident."""
    from pytest_llmperf.execute import ModelCache, execute

    cache = ModelCache(store=store)
    try:
        return execute(spec, context, backend, cache)
    finally:
        cache.drop(backend)
