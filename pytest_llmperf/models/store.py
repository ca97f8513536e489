"""The checkpoint cache on disk: where engines that load with their library's own loader find a
directory to load from.

Engines load the way users load (``from_pretrained``, ``init_inference``, ZeRO's partitioned
init), so ``load_time_s`` is real file I/O and initialization, as in the seed posts' load-time
table. A real checkpoint (a local directory, the HF cache) is used where it exists; otherwise
the seeded weights are written here once, atomically, and reused by every later load, process
and rank. Offload folders (accelerate's disk offload, DeepSpeed's NVMe swap) live here too, so
one directory holds everything the plugin writes besides reports and baselines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .catalog import ModelSpec

#: The variable children read the session's cache directory from (the option's own env name).
CACHE_DIR_ENV = "LLMPERF_CACHE_DIR"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-llmperf"


class CheckpointStore:
    """Checkpoint directories and scratch folders under one root."""

    def __init__(self, root: Optional[Path] = None) -> None:
        if root is None:
            env = os.environ.get(CACHE_DIR_ENV)
            root = Path(env).expanduser() if env else default_cache_dir()
        self.root = Path(root)

    def checkpoint(self, model: ModelSpec, dtype: str, seed: int) -> tuple[Path, str]:
        """(directory, weight source) of ``model`` in ``dtype``: its real checkpoint when one
        is on disk, else the seeded weights written under this root once.

        Raises OSError with the numbers when a seeded checkpoint would not fit on the disk.
        """
        from . import weights

        real = weights.real_checkpoint(model)
        if real is not None:
            return real
        directory = weights.save_seeded(model, dtype, seed, self.root)
        return directory, weights.seeded_source(directory)

    def scratch(self, name: str) -> Path:
        """A fresh, empty folder for one load's offloaded weights; removed by :meth:`release`."""
        parent = self.root / "scratch"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}.", dir=parent))

    @staticmethod
    def release(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
