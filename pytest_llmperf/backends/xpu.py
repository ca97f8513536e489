"""Intel GPUs through torch.xpu."""

from __future__ import annotations

from typing import ClassVar

from .base import Probe, TorchDeviceBackend, device_nodes


class XpuBackend(TorchDeviceBackend):
    name: ClassVar[str] = "xpu"
    namespace: ClassVar[str] = "xpu"
    torch_device: ClassVar[str] = "xpu"

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"dri"):
            return Probe(False, "no GPU render nodes (/dev/dri)")
        import torch

        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            return Probe(False, f"torch {torch.__version__} reports XPU unavailable")
        return Probe(True, "", torch.xpu.device_count())
