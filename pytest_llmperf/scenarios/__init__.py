"""Scenario registry: workload kind → scenario."""

from __future__ import annotations

from ..errors import UsageError
from .base import Scenario
from .dataset import DatasetScenario
from .forward import ForwardScenario
from .generate import GenerateScenario
from .load import LoadScenario

__all__ = ["Scenario", "get_scenario"]

_SCENARIOS: dict[str, Scenario] = {
    s.kind: s for s in (GenerateScenario(), LoadScenario(), DatasetScenario(), ForwardScenario())
}


def get_scenario(kind: str) -> Scenario:
    try:
        return _SCENARIOS[kind]
    except KeyError:
        raise UsageError(
            f"unknown workload kind {kind!r}; known: {', '.join(_SCENARIOS)}"
        ) from None
