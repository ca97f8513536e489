"""NVIDIA GPUs through torch.cuda (A100, H100, …)."""

from __future__ import annotations

from typing import ClassVar

from .base import Probe, TorchDeviceBackend, device_nodes


class CudaBackend(TorchDeviceBackend):
    name: ClassVar[str] = "cuda"
    namespace: ClassVar[str] = "cuda"
    torch_device: ClassVar[str] = "cuda"
    distributed_backend: ClassVar[str] = "nccl"
    env_vars: ClassVar[tuple[str, ...]] = (
        "CUDA_VISIBLE_DEVICES",
        "NCCL_P2P_DISABLE",
        "PYTORCH_CUDA_ALLOC_CONF",
        "CUDA_LAUNCH_BLOCKING",
        "OMP_NUM_THREADS",
    )

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"nvidia\d+", r"nvidiactl", r"dxg"):  # dxg: WSL2
            return Probe(False, "no NVIDIA device nodes (/dev/nvidia*)")
        import torch

        if not torch.cuda.is_available():
            return Probe(False, f"torch {torch.__version__} reports CUDA unavailable")
        return Probe(True, "", torch.cuda.device_count())

    def versions(self) -> dict[str, str]:
        import torch

        out = {"cuda": str(torch.version.cuda)}
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            import pynvml

            pynvml.nvmlInit()
            out["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        return out

    def available_memory_bytes(self) -> int | None:
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)

    def memory_in_use_bytes(self) -> int | None:
        import torch

        return int(torch.cuda.memory_reserved())

    def limit_memory(self, limit: int | None, *, in_worker: bool = False) -> None:
        """torch's caching allocator enforces a per-process fraction of the device: past it,
        allocations raise torch.OutOfMemoryError (recorded as oom) as a full device would."""
        super().limit_memory(limit, in_worker=in_worker)
        import torch

        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            fraction = 1.0 if limit is None else min(1.0, limit / total)
            torch.cuda.set_per_process_memory_fraction(fraction, index)

    def free_memory(self) -> None:
        import torch

        super().free_memory()
        torch.cuda.empty_cache()
