"""Intel GPUs (Data Center GPU Max, Arc) through torch.xpu.

Built against torch's documented ``torch.xpu`` module (torch 2.13: ``synchronize``,
``reset_peak_memory_stats``, ``max_memory_allocated``, ``mem_get_info``, ``empty_cache``,
``get_device_properties`` with ``driver_version``) and verified through a fake module that
records calls (tests/test_backend_cuda_fake.py), not on an Intel GPU. Older torch builds (and
intel-extension-for-pytorch's) lack some of the memory calls: those answers are then None
(the metric is absent), never a made-up number.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Probe, TorchDeviceBackend, device_nodes


class XpuBackend(TorchDeviceBackend):
    name: ClassVar[str] = "xpu"
    namespace: ClassVar[str] = "xpu"
    torch_device: ClassVar[str] = "xpu"
    distributed_backend: ClassVar[str] = "xccl"
    #: Level Zero's device mask; pinned only where it is set (the node's count needs the
    #: driver: /dev/dri also holds integrated GPUs).
    visible_devices_env: ClassVar[str] = "ZE_AFFINITY_MASK"
    env_vars: ClassVar[tuple[str, ...]] = (
        "ZE_AFFINITY_MASK",
        "ONEAPI_DEVICE_SELECTOR",
        "SYCL_CACHE_PERSISTENT",
        "OMP_NUM_THREADS",
    )

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"dri"):
            return Probe(False, "no GPU render nodes (/dev/dri)")
        import torch

        if not hasattr(torch, "xpu"):
            return Probe(False, f"torch {torch.__version__} has no torch.xpu")
        if not torch.xpu.is_available():
            return Probe(False, f"torch {torch.__version__} reports XPU unavailable")
        return Probe(True, "", torch.xpu.device_count())

    def _call(self, function: str, *args: Any) -> Any:
        """``torch.xpu.<function>(*args)``, None where this torch build lacks it."""
        found = getattr(self._ns(), function, None)
        return None if found is None else found(*args)

    def device_info(self) -> dict[str, Any]:
        info = super().device_info()
        props = self._call("get_device_properties")
        if props is not None:
            for field in ("platform_name", "total_memory", "max_compute_units"):
                value = getattr(props, field, None)
                if value is not None:
                    info[field] = value
        return info

    def versions(self) -> dict[str, str]:
        """The GPU driver and SYCL runtime as the device reports them, and the toolkit torch
        was built with (``torch.version.xpu``)."""
        import torch

        out: dict[str, str] = {}
        built = getattr(torch.version, "xpu", None)
        if built:
            out["xpu"] = str(built)
        props = self._call("get_device_properties")
        for field, key in (("driver_version", "driver"), ("version", "sycl runtime")):
            value = getattr(props, field, None) if props is not None else None
            if value:
                out[key] = str(value)
        return out

    def reset_peak_memory(self) -> None:
        self._call("reset_peak_memory_stats")

    def peak_memory_bytes(self) -> int | None:
        peak = self._call("max_memory_allocated")
        return None if peak is None else int(peak)

    def available_memory_bytes(self) -> int | None:
        found = self._call("mem_get_info")
        return None if found is None else int(found[0])

    def memory_in_use_bytes(self) -> int | None:
        reserved = self._call("memory_reserved")
        return None if reserved is None else int(reserved)

    def free_memory(self) -> None:
        super().free_memory()
        self._call("empty_cache")
