"""Apple silicon GPUs through torch.mps.

Built against torch's documented ``torch.mps`` module (``synchronize``,
``current_allocated_memory``, ``driver_allocated_memory``, ``recommended_max_memory``,
``empty_cache``) and verified through a fake module that records calls
(tests/test_backend_cuda_fake.py), not on a Mac.

MPS has no peak-memory API (no ``max_memory_allocated``, nothing to reset): see
:meth:`MpsBackend.peak_memory_bytes` for what the number is instead. MPS has no timing events
either (``torch.mps.Event`` stamps a whole command buffer), so tokens are stamped by sync and
clock.
"""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

from .base import Backend, Probe


class MpsBackend(Backend):
    name: ClassVar[str] = "mps"
    torch_device: ClassVar[str] = "mps"
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    #: CPU and GPU share one memory on Apple silicon.
    env_vars: ClassVar[tuple[str, ...]] = (
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO",
        "PYTORCH_MPS_LOW_WATERMARK_RATIO",
        "PYTORCH_ENABLE_MPS_FALLBACK",
        "OMP_NUM_THREADS",
    )

    _chip: str | None = None

    def _probe_impl(self) -> Probe:
        if sys.platform != "darwin":
            return Probe(False, f"MPS needs macOS (this is {sys.platform})")
        import torch

        if not torch.backends.mps.is_built():
            return Probe(False, f"torch {torch.__version__} was built without MPS")
        if not torch.backends.mps.is_available():
            return Probe(False, "torch.backends.mps.is_available() is False (macOS < 12.3?)")
        return Probe(True, "", 1)

    def device_name(self) -> str:
        """The chip ("Apple M2 Max"): an M1 and an M3 Max are not one device. The OS knows it
        (``sysctl machdep.cpu.brand_string``); the machine type where it does not say."""
        if self._chip is None:
            import platform

            chip = ""
            try:
                out = subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                chip = out.stdout.strip() if out.returncode == 0 else ""
            except (OSError, subprocess.SubprocessError):
                pass
            self._chip = chip or f"apple-{platform.machine()}"
        return self._chip

    def versions(self) -> dict[str, str]:
        import platform

        release = platform.mac_ver()[0]
        return {"macos": release} if release else {}

    def synchronize(self) -> None:
        import torch

        torch.mps.synchronize()

    def peak_memory_bytes(self) -> int | None:
        """Not a peak: MPS has no peak counter. The number is ``driver_allocated_memory()``
        when the rounds end: everything Metal holds for this process, MPSAllocator's cached
        pools included. The cache keeps the blocks the rounds' largest allocations needed, so
        it is at least the rounds' peak of tensors (``current_allocated_memory()`` would count
        only what is still allocated at the end, missing the activations), but it also keeps
        what earlier tests of this process left cached: compare it between runs of the same
        test order."""
        import torch

        return int(torch.mps.driver_allocated_memory())

    def available_memory_bytes(self) -> int | None:
        """What Metal recommends a process stays under (its working-set limit), minus what
        this process holds; the memory is shared with the CPU, so this is an upper bound."""
        import torch

        limit = int(torch.mps.recommended_max_memory())
        return max(0, limit - int(torch.mps.driver_allocated_memory()))

    def memory_in_use_bytes(self) -> int | None:
        import torch

        return int(torch.mps.driver_allocated_memory())

    def free_memory(self) -> None:
        import torch

        super().free_memory()
        torch.mps.empty_cache()
