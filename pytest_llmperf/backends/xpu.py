"""Intel GPUs through torch.xpu."""

from __future__ import annotations

from typing import ClassVar

from .base import Backend, Probe, device_nodes


class XpuBackend(Backend):
    name: ClassVar[str] = "xpu"
    torch_device: ClassVar[str] = "xpu"

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"dri"):
            return Probe(False, "no GPU render nodes (/dev/dri)")
        import torch

        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            return Probe(False, f"torch {torch.__version__} reports XPU unavailable")
        return Probe(True, "", torch.xpu.device_count())

    def device_name(self) -> str:
        import torch

        return torch.xpu.get_device_name(0)

    def synchronize(self) -> None:
        import torch

        torch.xpu.synchronize()

    def reset_peak_memory(self) -> None:
        import torch

        torch.xpu.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int | None:
        import torch

        return int(torch.xpu.max_memory_allocated())
