"""The two ways a workload can end without a measurement, shared by every layer.

They cross process boundaries (a worker reports them as JSON) and are turned into a one-line
test failure or a skip by the plugin, so they carry a message for people and nothing else.
"""

from __future__ import annotations


class UsageError(Exception):
    """A call with arguments that cannot be right; reported as a one-line test failure."""


class SkipWorkload(Exception):
    """The workload cannot run on this node (no such device count, dtype, memory to load)."""
