"""In this process: the default for one device. The loaded model is cached for the next test of
the same parametrization, as a suite over dtypes and batch sizes would otherwise reload it."""

from __future__ import annotations

from typing import ClassVar, Optional

from ..backends.base import Backend
from ..execute import ModelCache, execute
from ..progress import ProgressFn
from ..results import Record
from ..spec import RecordContext, WorkloadSpec
from .base import Launcher


class InlineLauncher(Launcher):
    name: ClassVar[str] = "inline"

    def __init__(self, cache: ModelCache | None = None) -> None:
        self.cache = cache if cache is not None else ModelCache()

    def run(
        self,
        spec: WorkloadSpec,
        context: RecordContext,
        backend: Backend,
        *,
        progress: Optional[ProgressFn] = None,
    ) -> Record:
        return execute(spec, context, backend, self.cache, progress)

    def close(self) -> None:
        self.cache.drop()
