"""Apple silicon GPUs through torch.mps."""

from __future__ import annotations

import sys
from typing import ClassVar

from .base import Backend, Probe


class MpsBackend(Backend):
    name: ClassVar[str] = "mps"
    torch_device: ClassVar[str] = "mps"
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")

    def _probe_impl(self) -> Probe:
        if sys.platform != "darwin":
            return Probe(False, f"MPS needs macOS (this is {sys.platform})")
        import torch

        if not torch.backends.mps.is_available():
            return Probe(False, "torch.backends.mps.is_available() is False")
        return Probe(True, "", 1)

    def device_name(self) -> str:
        import platform

        return f"apple-{platform.machine()}"

    def synchronize(self) -> None:
        import torch

        torch.mps.synchronize()

    def peak_memory_bytes(self) -> int | None:
        import torch

        return int(torch.mps.driver_allocated_memory())
