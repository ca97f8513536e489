"""Where a number came from: library, SDK and driver versions plus performance-relevant env.

Versions go into provenance, never into the baseline key: after an upgrade the new numbers
are compared against the old baseline and the failure message names what changed.
"""

from __future__ import annotations

import platform
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .backends.base import Backend, installed_versions
from .units import utc_now

#: Distributions whose version can move a benchmark; read from metadata, never imported.
DISTRIBUTIONS = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "deepspeed",
    "bitsandbytes",
    "optimum",
    "optimum-habana",
    "optimum-neuron",
    "intel-extension-for-pytorch",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "pytest-llmperf": __version__}
    out.update(installed_versions(*DISTRIBUTIONS))
    return out


def git_commit(root: Path) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def collect(backend: Backend, root: Path) -> dict[str, Any]:
    versions = library_versions()
    versions.update(backend.versions())
    return {
        "versions": dict(sorted(versions.items())),
        "env": backend.environment(),
        "git_commit": git_commit(root),
        "hostname": socket.gethostname(),
        "date": utc_now(),
        # Tells one process's run from another's: accepting the same results twice must not
        # store one run twice (identical numbers are possible on a deterministic device).
        "run_id": secrets.token_hex(8),
        "memory_bandwidth": memory_bandwidth(backend),
    }


def memory_bandwidth(backend: Backend) -> dict[str, Any]:
    """The bandwidth roofline_fraction divides by, with its method ("published peak" or
    "measured copy") and source; for hardware without a figure, a line saying so (the run
    says it once here instead of a note on every record). Collected in the pytest process and
    carried to workers and ranks with the rest of provenance, so they never measure it."""
    from . import roofline

    found = backend.memory_bandwidth()
    return found.to_json() if found is not None else roofline.unknown(backend.device_name())
