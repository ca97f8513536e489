"""Third-party backends and engines arrive by entry point; one loader for both groups."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

_loaded: set[str] = set()


def load_once(group: str, what: str) -> list[tuple[str, Any]]:
    """:func:`load` the first time a group is asked for, nothing afterwards (registries call
    this on every lookup)."""
    if group in _loaded:
        return []
    _loaded.add(group)
    return load(group, what)


def load(group: str, what: str) -> list[tuple[str, Any]]:
    """``(name, loaded object)`` of every entry point in ``group``.

    A plugin that fails to import is an error naming it, not a silently missing backend: a
    node whose Gaudi plugin broke must not quietly run the suites on CPU.
    """
    if sys.version_info >= (3, 10):
        found = list(metadata.entry_points(group=group))
    else:  # pragma: no cover - Python 3.9 returns a dict of groups
        found = list(metadata.entry_points().get(group, []))
    out = []
    for ep in found:
        try:
            out.append((ep.name, ep.load()))
        except Exception as exc:
            raise RuntimeError(
                f"{what} entry point {ep.name!r} ({ep.value}) failed to load: {exc}"
            ) from exc
    return out
