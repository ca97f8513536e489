"""Launchers: where a workload runs (``--llmperf-launcher``, marker ``launcher=``, or the
call's ``launcher=`` argument).

- ``inline`` — this process; the default for one device.
- ``process`` — a child Python process: a crash (a segfault in a native extension, an OOM kill
  on a CPU host) becomes an ``error`` (or ``oom``) record and the session goes on; a workload
  that asks for cold numbers (``fresh``) gets a new process per workload or per round. Several
  devices run as a torchrun group, whose ranks are child processes as well.
- ``torchrun`` — ``devices > 1``: one rank per device through ``torch.distributed.run``.
- ``deepspeed`` — the same rank group under DeepSpeed's launcher (``deepspeed --num_gpus N``;
  ``launchers/deepspeed.py``, which also documents multi-node runs).
- ``auto`` — for several devices the engine's rank launcher (``Engine.launcher``: ``deepspeed``
  for the DeepSpeed engines and optimum-habana where DeepSpeed is installed, else
  ``torchrun``; the record's ``provenance["launcher"]`` says which ran), ``process`` when the
  workload asks for fresh processes, its engine declares it can crash the interpreter
  (``Engine.may_crash``), or ``--llmperf-memory-limit`` caps a CPU host (only a child can run
  under a real cap), else ``inline``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..backends.base import Backend
from ..devicelock import DEFAULT_LOCK_DIR, DEFAULT_LOCK_TIMEOUT_S, DeviceLocks
from ..errors import UsageError
from ..execute import ModelCache
from ..models.store import CACHE_DIR_ENV, CACHE_SIZE_ENV, CheckpointStore, default_cache_dir
from ..noise import family_root_env
from ..settings import DEFAULT_CACHE_SIZE, MEMORY_LIMIT_ENV, format_size
from ..spec import WorkloadSpec
from .base import Launcher
from .inline import InlineLauncher

__all__ = ["NAMES", "LaunchSettings", "Launcher", "Launchers", "default_cache_dir"]

NAMES = ("auto", "inline", "process", "torchrun", "deepspeed")
#: The launchers that start one rank per device.
RANK_LAUNCHERS = ("torchrun", "deepspeed")


@dataclass(frozen=True)
class LaunchSettings:
    #: Seconds a workload may take in a child process or rank group before it is killed.
    timeout: float = 3600.0
    #: Where seeded checkpoints for ranks are written (once, atomically).
    cache_dir: Path = field(default_factory=default_cache_dir)
    #: Size cap of that cache in bytes (None: unlimited); children evict under the same cap.
    cache_size: Optional[int] = DEFAULT_CACHE_SIZE
    python: str = sys.executable
    #: --llmperf-memory-limit: workers and ranks run under it (see Backend.limit_memory).
    memory_limit: Optional[int] = None
    #: --llmperf-lock-dir and --llmperf-lock-timeout: the node-wide device locks (devicelock).
    lock_dir: Path = DEFAULT_LOCK_DIR
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S

    def child_env(self) -> dict[str, str]:
        """The environment of a worker or rank: this one, plus where the checkpoint cache is,
        its cap, and the memory cap."""
        env = {
            **os.environ,
            CACHE_DIR_ENV: str(self.cache_dir),
            CACHE_SIZE_ENV: format_size(self.cache_size),
            # The child's load is ours: it counts the family this process counts.
            **family_root_env(),
        }
        env.pop(MEMORY_LIMIT_ENV, None)
        if self.memory_limit is not None:
            env[MEMORY_LIMIT_ENV] = str(self.memory_limit)
        return env

    def store(self) -> CheckpointStore:
        """The checkpoint cache these settings describe."""
        return CheckpointStore(self.cache_dir, self.cache_size)


class Launchers:
    """The launchers of one session, each made on first use and closed at the session's end."""

    def __init__(
        self, settings: Optional[LaunchSettings] = None, cache: Optional[ModelCache] = None
    ):
        self.settings = settings or LaunchSettings()
        self.cache = cache if cache is not None else ModelCache(store=self.settings.store())
        self._made: dict[str, Launcher] = {}
        #: Held around each workload on an accelerator (runner.LLMPerf); the plugin sets its
        #: ``say`` to pytest's terminal.
        self.locks = DeviceLocks(self.settings.lock_dir, self.settings.lock_timeout)

    def choose(
        self, spec: WorkloadSpec, requested: str, backend: Optional[Backend] = None
    ) -> Launcher:
        # Under a memory cap a host's memory is capped for real only in a child process.
        capped = (
            self.settings.memory_limit is not None and backend is not None and backend.shared_memory
        )
        name = _choose_name(spec, requested, capped_host=capped)
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def _make(self, name: str) -> Launcher:
        if name == "inline":
            return InlineLauncher(self.cache)
        if name == "process":
            from .process import ProcessLauncher

            # One model resident at a time: a child holding one replaces the inline cache's.
            self.cache.drop()
            return ProcessLauncher(self.settings)
        self.cache.drop()
        if name == "deepspeed":
            from .deepspeed import DeepSpeedLauncher

            return DeepSpeedLauncher(self.settings)
        from .torchrun import TorchrunLauncher

        return TorchrunLauncher(self.settings)

    def close(self) -> None:
        for launcher in self._made.values():
            launcher.close()
        self._made.clear()


def _choose_name(spec: WorkloadSpec, requested: str, capped_host: bool = False) -> str:
    if requested not in NAMES:
        raise UsageError(f"launcher={requested!r}: expected one of {', '.join(NAMES)}")
    if requested in RANK_LAUNCHERS:
        # A rank group of one device is still a group (DeepSpeed's launcher with one rank).
        return requested
    if spec.devices > 1 and not _one_process(spec.engine):
        if requested == "inline":
            raise UsageError(
                f"launcher='inline' runs one device; devices={spec.devices} needs "
                "launcher='torchrun' or 'deepspeed' (or 'auto', or 'process')"
            )
        # Several devices always run as a rank group: its ranks are child processes too.
        return _rank_launcher(spec.engine)
    if requested == "auto":
        child = spec.fresh != "no" or capped_host or _may_crash(spec.engine)
        return "process" if child else "inline"
    if spec.fresh != "no" and requested == "inline":
        raise UsageError(
            f"this workload asks for a fresh process per {spec.fresh} (fresh={spec.fresh!r}); "
            "the inline launcher cannot give one: use 'process' or 'auto'"
        )
    return requested


def _may_crash(engine: str) -> bool:
    """Engines whose library can take the interpreter down run in a child process by default."""
    from .. import engines

    return engines.get_engine(engine).may_crash


def _rank_launcher(engine: str) -> str:
    """The engine's rank-group launcher (``Engine.launcher``); DeepSpeed's only where DeepSpeed
    is installed (package metadata, no import), else torchrun, whose ranks DeepSpeed joins too."""
    from .. import engines
    from ..engines.deepspeed_inference import install_reason

    wanted = engines.get_engine(engine).launcher
    if wanted == "deepspeed" and install_reason("deepspeed") is not None:
        return "torchrun"
    return wanted if wanted in RANK_LAUNCHERS else "torchrun"


def _one_process(engine: str) -> bool:
    """Engines that drive all their devices from one process (optimum-neuron: the tensor
    parallelism is inside the compiled graph) run ``devices > 1`` without a rank group."""
    from .. import engines

    return engines.get_engine(engine).one_process
