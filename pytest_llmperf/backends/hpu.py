"""Habana Gaudi (Gaudi, Gaudi2, Gaudi3) through habana_frameworks.torch (SynapseAI).

Built against the habana-torch-plugin sources (HabanaAI/gaudi-pytorch-bridge:
``habana_frameworks/torch/hpu/__init__.py`` and ``memory.py``) and optimum-habana 1.21.2's own
calls into them; not run on a Gaudi here. ``import habana_frameworks.torch`` registers
``torch.hpu`` (``synchronize``, ``get_device_name``, ``max_memory_allocated``,
``reset_peak_memory_stats``, ``memory_stats`` with ``InUse``/``MaxInUse``/``Limit`` bytes,
``Event``); the plugin picks lazy or eager mode from ``PT_HPU_LAZY_MODE`` once, at that import.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, ClassVar, Optional

from .base import (
    Probe,
    TorchDeviceBackend,
    device_nodes,
    installed_versions,
    normalize_device_name,
)

if TYPE_CHECKING:
    from ..energy import EnergyMeter

#: Habana's Python distributions (from its pip index / the SynapseAI installer); the plugin's
#: version is SynapseAI's. Habana's DeepSpeed fork installs as ``deepspeed`` (version
#: ``…+hpu.synapse.v1.21.0``), recorded with the other libraries.
HABANA_DISTRIBUTIONS = (
    "habana-torch-plugin",
    "habana-torch-dataloader",
    "habana-pyhlml",
    "habana_gpu_migration",
)
#: hl-smi and the plugin name the parts differently: the plugin's ``GAUDI2``, hl-smi's board
#: SKU (HL-205 is Gaudi, HL-225 Gaudi2, HL-325/HL-338 Gaudi3). The key is the generation.
_GENERATIONS = (
    (r"gaudi-?3|hl-?3\d\d\w*", "gaudi3"),
    (r"gaudi-?2\w*|hl-?22\d\w*", "gaudi2"),
    (r"gaudi-?1?|hl-?20\d\w*", "gaudi"),
)
HL_SMI_TIMEOUT_S = 10.0


def gaudi_generation(name: str) -> str | None:
    """``gaudi``, ``gaudi2`` or ``gaudi3`` for a name the plugin or hl-smi reports ("GAUDI2",
    "Intel Gaudi 3", "HL-225"); None for anything else."""
    key = normalize_device_name(name)
    for pattern, generation in _GENERATIONS:
        if re.search(rf"(?:^|-)(?:{pattern})(?:$|-)", key):
            return generation
    return None


def hl_smi(*args: str) -> str | None:
    """hl-smi's output, or None where it is missing or fails (no driver, a container without
    it). ``ENABLE_CONSOLE=true`` as optimum-habana runs it, so the text goes to stdout."""
    import shutil
    import subprocess

    exe = shutil.which("hl-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=HL_SMI_TIMEOUT_S,
            env={**os.environ, "ENABLE_CONSOLE": "true"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def hl_smi_query(field: str) -> str | None:
    """The first module's ``field`` (``hl-smi -Q name -f csv,noheader``), or None."""
    out = hl_smi("-Q", field, "-f", "csv,noheader")
    lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
    return lines[0] if lines else None


def hl_smi_driver_version() -> str | None:
    """ "1.21.0" from the header line ``Driver Version: 1.21.0-fw-…`` of plain ``hl-smi``
    (optimum-habana's ``get_driver_version`` reads the same line)."""
    match = re.search(r"Driver Version:\s*([0-9][0-9.]*)", hl_smi() or "")
    return match.group(1).rstrip(".") if match else None


class HpuBackend(TorchDeviceBackend):
    name: ClassVar[str] = "hpu"
    namespace: ClassVar[str] = "hpu"
    distributed_backend: ClassVar[str] = "hccl"
    torch_device: ClassVar[str] = "hpu"
    #: Module ids (hl-smi -Q module_id); on a full node they run 0..N-1 like the devices.
    #: No device_users: hl-smi has no documented machine-readable per-process list.
    visible_devices_env: ClassVar[str] = "HABANA_VISIBLE_MODULES"
    env_vars: ClassVar[tuple[str, ...]] = (
        "PT_HPU_LAZY_MODE",
        "PT_HPU_ENABLE_LAZY_COLLECTIVES",
        "PT_HPU_MAX_COMPOUND_OP_SIZE",
        "HABANA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
    )

    def node_device_count(self) -> Optional[int]:
        # /dev/accel/accelN (SynapseAI 1.x), /dev/hlN before: countable before the stack starts.
        try:
            names = os.listdir("/dev/accel")
        except OSError:
            names = []
        count = sum(1 for n in names if re.fullmatch(r"accel\d+", n)) or len(device_nodes(r"hl\d+"))
        return count or None

    def _probe_impl(self) -> Probe:
        if not device_nodes(r"accel\d*", r"hl\d+", r"accel_controlD\d+"):
            return Probe(False, "no Habana device nodes (/dev/accel*, /dev/hl*)")
        import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device)
        import torch

        if not torch.hpu.is_available():
            return Probe(False, "habana_frameworks imported but torch.hpu.is_available() is False")
        return Probe(True, "", torch.hpu.device_count())

    def device_name(self) -> str:
        """``torch.hpu.get_device_name()`` ("GAUDI2") in a process that already holds the
        device; elsewhere hl-smi's product name ("HL-225"), because the plugin's call
        initializes (acquires) the device, and a Gaudi belongs to one process at a time: a
        pytest process that asked for a name would keep the device from its worker or ranks.
        Both spellings give one key (:func:`gaudi_generation`)."""
        hpu = self._ns()
        if not getattr(hpu, "is_initialized", lambda: True)():
            name = hl_smi_query("name")
            if name:
                return name
        return str(hpu.get_device_name())

    def device_key(self) -> str:
        """``hpu-gaudi2``: the generation, however the plugin or hl-smi spells it; a name that
        is none of them keeps its normalized form (still a safe path component)."""
        name = self.device_name()
        return f"{self.name}-{gaudi_generation(name) or normalize_device_name(name)}"

    def bind_device(self, local_rank: int) -> None:
        """Nothing to select: habana's ``torch.hpu`` has no ``set_device`` (each process
        acquires one module, chosen by the runtime within ``HABANA_VISIBLE_MODULES``)."""
        set_device = getattr(self._ns(), "set_device", None)
        if set_device is not None:
            set_device(local_rank)

    def available_memory_bytes(self) -> int | None:
        stats = self._ns().memory_stats()
        return int(stats["Limit"]) - int(stats["InUse"])

    def memory_in_use_bytes(self) -> int | None:
        return int(self._ns().memory_stats()["InUse"])

    def versions(self) -> dict[str, str]:
        """SynapseAI's release from habana-torch-plugin's version ("1.21.0.555": release, build),
        as optimum-habana's ``get_habana_frameworks_version`` reads it, the other habana
        distributions installed, and the driver from hl-smi's header where hl-smi runs."""
        out = installed_versions(*HABANA_DISTRIBUTIONS)
        plugin = out.get("habana-torch-plugin")
        if plugin:
            out["synapseai"] = ".".join(plugin.split("+")[0].split(".")[:3])
        driver = hl_smi_driver_version()
        if driver:
            out["habana-driver"] = driver
        return out

    #: The HLML meter, made on first use and kept for the process.
    _energy: Optional[EnergyMeter] = None

    def energy_meter(self) -> Optional[EnergyMeter]:
        """HLML's total-energy counter of the modules this process group holds
        (``energy.HlmlMeter``; known where HABANA_VISIBLE_MODULES pins them). HLML is the
        management library hl-smi uses: reading it does not acquire a module."""
        if self._energy is None:
            from ..energy import HlmlMeter

            self._energy = HlmlMeter()
        return self._energy

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        import torch

        # SynapseAI raises RuntimeError("[Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation
        # failed for size::…"); execute.is_oom matches those words in the message.
        return (torch.OutOfMemoryError,)
