"""Habana Gaudi through habana_frameworks.torch (SynapseAI)."""

from __future__ import annotations

from typing import ClassVar

from .base import Probe, TorchDeviceBackend, device_nodes, installed_versions


class HpuBackend(TorchDeviceBackend):
    name: ClassVar[str] = "hpu"
    namespace: ClassVar[str] = "hpu"
    distributed_backend: ClassVar[str] = "hccl"
    torch_device: ClassVar[str] = "hpu"
    env_vars: ClassVar[tuple[str, ...]] = (
        "PT_HPU_LAZY_MODE",
        "PT_HPU_ENABLE_LAZY_COLLECTIVES",
        "PT_HPU_MAX_COMPOUND_OP_SIZE",
        "HABANA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
    )

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"accel\d*", r"hl\d+", r"accel_controlD\d+"):
            return Probe(False, "no Habana device nodes (/dev/accel*, /dev/hl*)")
        import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device)
        import torch

        if not torch.hpu.is_available():
            return Probe(False, "habana_frameworks imported but torch.hpu.is_available() is False")
        return Probe(True, "", torch.hpu.device_count())

    def versions(self) -> dict[str, str]:
        return installed_versions("habana-torch-plugin", "habana_gpu_migration")

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        import torch

        # SynapseAI raises RuntimeError("... Device out of memory ..."); execute.is_oom matches
        # the words in the message.
        return (torch.OutOfMemoryError,)
