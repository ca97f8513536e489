"""NVIDIA GPUs through torch.cuda (A10G, L4, A100, H100, H200, …), and AMD Instinct GPUs under
a ROCm build of torch, which serves them through the same ``torch.cuda`` module.

Built against the documented APIs — ``torch.cuda`` / ``torch.version.cuda`` /
``torch.version.hip`` and NVML through ``pynvml`` from nvidia-ml-py — and verified through
fakes that record calls (tests/test_backend_cuda_fake.py), not on real hardware.

What a baseline must tell apart: another GPU (the device key: its name, and for a MIG slice its
profile: a ``1g.10gb`` slice of an A100 is a different device from the whole A100), another
software stack (CUDA or HIP runtime, driver), and the same GPU run under other settings (power
limit, application clocks, ECC mode). The settings go into :meth:`CudaBackend.versions`, which
provenance records and a baseline's version diff compares, so a slower run on a capped GPU
reads "power limit 700 W → 400 W" instead of a bare regression. NVML is optional: where
nvidia-ml-py is absent, or a part does not support a query (application clocks on a consumer
GPU, anything on a MIG handle), that field is left out; nothing here raises for it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from .base import Probe, TorchDeviceBackend, device_nodes, normalize_device_name

if TYPE_CHECKING:
    from ..energy import EnergyMeter
    from ..roofline import Bandwidth

#: A MIG slice's profile as CUDA and NVML name the device ("NVIDIA A100-SXM4-80GB MIG 1g.10gb",
#: "… MIG 1c.3g.20gb" for a compute instance, "… MIG 1g.10gb+me" with media engines).
MIG_PROFILE = re.compile(r"\bMIG[\s-]+((?:\d+c\.)?\d+g\.\d+gb(?:\+me)?)", re.IGNORECASE)

#: A MIG slice owns k of a GPU's eight memory slices, and the bandwidth that comes with them
#: (NVIDIA Multi-Instance GPU user guide, "Terminology": memory slice).
MIG_MEMORY_SLICES = 8
MIG_GUIDE = "https://docs.nvidia.com/datacenter/tesla/mig-user-guide/"


def mig_profile(name: str) -> Optional[str]:
    """The MIG profile in a device name (``1g.10gb``), None for a whole GPU."""
    found = MIG_PROFILE.search(name)
    return found.group(1).lower() if found else None


def _join(values: list[str]) -> str:
    """One device's value, or each device's where the devices of a node differ."""
    if len(set(values)) == 1:
        return values[0]
    return ", ".join(f"{index}: {value}" for index, value in enumerate(values))


class _Nvml:
    """pynvml initialized for one query, shut down after (NVML counts init/shutdown pairs, so
    another user of NVML in this process keeps its own session). ``lib`` is None where
    nvidia-ml-py is not installed or NVML cannot start (no driver, a container without it)."""

    def __init__(self) -> None:
        self.lib: Any = None

    def __enter__(self) -> _Nvml:
        try:
            import pynvml
        except ImportError:
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return self
        self.lib = pynvml
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lib is not None:
            with contextlib.suppress(self.lib.NVMLError):
                self.lib.nvmlShutdown()

    def call(self, function: str, *args: Any) -> Any:
        """``pynvml.<function>(*args)``; None where this part, driver or binding lacks it."""
        if self.lib is None:
            return None
        try:
            return getattr(self.lib, function)(*args)
        except (self.lib.NVMLError, AttributeError):
            return None


class CudaBackend(TorchDeviceBackend):
    name: ClassVar[str] = "cuda"
    namespace: ClassVar[str] = "cuda"
    torch_device: ClassVar[str] = "cuda"
    distributed_backend: ClassVar[str] = "nccl"
    env_vars: ClassVar[tuple[str, ...]] = (
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "NCCL_P2P_DISABLE",
        "PYTORCH_CUDA_ALLOC_CONF",
        "PYTORCH_HIP_ALLOC_CONF",
        "CUDA_LAUNCH_BLOCKING",
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "OMP_NUM_THREADS",
    )

    def __init__(self) -> None:
        #: The devices this process has put memory on, synchronized and measured together
        #: (None: not known yet); see :meth:`_used_devices`.
        self._used: Optional[list[int]] = None
        self._nvml_cache: Optional[list[dict[str, str]]] = None

    def _probe_impl(self) -> Probe:
        # nvidia*: NVIDIA; dxg: WSL2; kfd: the ROCm compute driver of AMD GPUs.
        if not device_nodes(r"nvidia\d+", r"nvidiactl", r"dxg", r"kfd"):
            return Probe(False, "no NVIDIA or AMD GPU device nodes (/dev/nvidia*, /dev/kfd)")
        import torch

        if not torch.cuda.is_available():
            runtime = "ROCm" if torch.version.hip else "CUDA"
            return Probe(False, f"torch {torch.__version__} reports {runtime} unavailable")
        return Probe(True, "", torch.cuda.device_count())

    # -- identity -------------------------------------------------------------------------
    @staticmethod
    def is_rocm() -> bool:
        """A ROCm build of torch: AMD GPUs behind the ``torch.cuda`` names."""
        import torch

        return bool(getattr(torch.version, "hip", None))

    def _current(self) -> int:
        import torch

        return int(torch.cuda.current_device())

    def _torch_name(self, index: int) -> str:
        import torch

        name = str(torch.cuda.get_device_name(index)).strip()
        if self.is_rocm() and (not name or name.lower().startswith("gfx")):
            # Older ROCm reports no marketing name, only the ISA ("gfx90a:sramecc+:xnack-").
            arch = str(getattr(torch.cuda.get_device_properties(index), "gcnArchName", ""))
            name = f"AMD {arch.split(':')[0] or name or 'GPU'}"
        return name

    def device_name(self) -> str:
        """The current device's name as torch reports it, with the MIG profile when the device
        is a MIG slice whose name does not carry it already (NVML names it)."""
        index = self._current()
        name = self._torch_name(index)
        if not self.is_rocm() and mig_profile(name) is None:
            facts = self._nvml_facts()
            profile = facts[index].get("mig") if index < len(facts) else None
            if profile:
                name = f"{name} MIG {profile}"
        return name

    def device_key(self) -> str:
        # ROCm builds keep the "cuda" prefix: it is the backend torch and the user name them by.
        return f"{self.name}-{normalize_device_name(self.device_name())}"

    def device_info(self) -> dict[str, Any]:
        import torch

        info = super().device_info()
        index = self._current()
        props = torch.cuda.get_device_properties(index)
        info["index"] = index
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
        info["memory_bytes"] = int(props.total_memory)
        if self.is_rocm():
            info["runtime"] = f"hip {torch.version.hip}"
            arch = str(getattr(props, "gcnArchName", ""))
            if arch:
                info["arch"] = arch
        else:
            info["runtime"] = f"cuda {torch.version.cuda}"
        profile = mig_profile(self.device_name())
        if profile:
            info["mig"] = profile
        names = [self._torch_name(i) for i in range(self.device_count())]
        if len(set(names)) > 1:  # a node with mixed GPUs: the key names the current one
            info["names"] = names
        return info

    def versions(self) -> dict[str, str]:
        """Runtime, library and driver versions, and the device settings that change speed
        (power limit, application clocks, ECC): recorded in provenance and compared by the
        baseline's version diff (``baselines.version_changes``)."""
        import torch

        out: dict[str, str] = {}
        if self.is_rocm():
            out["hip"] = str(torch.version.hip)
            rocm = getattr(torch.version, "rocm", None)
            if rocm:
                out["rocm"] = str(rocm)
            if torch.backends.cudnn.is_available():  # MIOpen answers as cudnn under ROCm
                out["miopen"] = str(torch.backends.cudnn.version())
            driver = _amdgpu_driver()
            if driver:
                out["driver"] = driver
            return out
        out["cuda"] = str(torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
        facts = self._nvml_facts()
        for field in ("driver", "cuda driver"):
            if facts and field in facts[0]:
                out[field] = facts[0][field]
        for field in (
            "power limit",
            "application clock SM",
            "application clock memory",
            "ECC",
        ):
            values = [f[field] for f in facts if field in f]
            if values:
                out[field] = _join(values)
        return out

    # -- who else is on the device (deviceusers.py, devicelock.py) ---------------------------
    visible_devices_env: ClassVar[str] = "CUDA_VISIBLE_DEVICES"

    def node_device_count(self) -> Optional[int]:
        # /dev/nvidiaN, one per GPU the container was given (numbered as on the host, counted
        # from 0 by CUDA): countable before CUDA starts, so xdist workers can be pinned.
        return len(device_nodes(r"nvidia\d+")) or None

    def device_users(
        self, indices: Sequence[int], *, since_s: Optional[float] = None
    ) -> Optional[list[str]]:
        from ..deviceusers import nvml_device_users

        with _Nvml() as nvml:
            if nvml.lib is None:
                return None
            handles = [self._handle(nvml, index) for index in indices]
            return nvml_device_users(nvml.lib, handles, since_s)

    # -- NVML -------------------------------------------------------------------------------
    def _visible(self) -> list[str]:
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [] if value is None else [v.strip() for v in value.split(",") if v.strip()]

    def _handle(self, nvml: _Nvml, index: int) -> Any:
        """torch device ``index``'s NVML handle. NVML numbers every GPU of the node and ignores
        CUDA_VISIBLE_DEVICES, so the device is found by its UUID (torch's, or the one
        CUDA_VISIBLE_DEVICES names), and only by number where neither is known."""
        import torch

        visible = self._visible()
        if index < len(visible) and visible[index].startswith(("GPU-", "MIG-")):
            found = nvml.call("nvmlDeviceGetHandleByUUID", visible[index])
            if found is not None:
                return found
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        if uuid:
            tries = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
            for text in tries:
                found = nvml.call("nvmlDeviceGetHandleByUUID", text)
                if found is not None:
                    return found
        number = index
        if visible:
            if index >= len(visible) or not visible[index].isdigit():
                return None
            number = int(visible[index])
        return nvml.call("nvmlDeviceGetHandleByIndex", number)

    def _nvml_facts(self) -> list[dict[str, str]]:
        """Per visible device: driver, MIG profile, power limit, application clocks, ECC, as
        NVML reports them; each field only where the query answered. Asked once per process
        (a power cap set mid-run shows in the next run's provenance)."""
        if self._nvml_cache is not None:
            return self._nvml_cache
        facts: list[dict[str, str]] = []
        with _Nvml() as nvml:
            if nvml.lib is None:
                self._nvml_cache = facts
                return facts
            node: dict[str, str] = {}
            driver = nvml.call("nvmlSystemGetDriverVersion")
            if driver:
                node["driver"] = str(driver)
            cuda = nvml.call("nvmlSystemGetCudaDriverVersion")
            if isinstance(cuda, int) and cuda > 0:  # 12040 is CUDA 12.4
                node["cuda driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
            for index in range(self.device_count()):
                facts.append(node | self._device_facts(nvml, self._handle(nvml, index)))
        self._nvml_cache = facts
        return facts

    def _device_facts(self, nvml: _Nvml, handle: Any) -> dict[str, str]:
        lib: Any = nvml.lib
        out: dict[str, str] = {}
        if handle is None:
            return out
        if nvml.call("nvmlDeviceIsMigDeviceHandle", handle):
            profile = mig_profile(str(nvml.call("nvmlDeviceGetName", handle) or ""))
            out["mig"] = profile or "unknown-profile"
            # Power, clocks and ECC belong to the whole GPU; a MIG handle does not answer them.
            parent = nvml.call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
            if parent is None:
                return out
            handle = parent
        else:
            mode = nvml.call("nvmlDeviceGetMigMode", handle)
            if mode and mode[0] == lib.NVML_DEVICE_MIG_ENABLE:
                # MIG is on but torch was not pointed at a slice: not the whole GPU either.
                out["mig"] = "unknown-profile"
        limit = nvml.call("nvmlDeviceGetEnforcedPowerLimit", handle)
        if limit is None:
            limit = nvml.call("nvmlDeviceGetPowerManagementLimit", handle)
        if limit:
            out["power limit"] = f"{limit / 1000:g} W"  # NVML reports milliwatts
        for field, clock in (("SM", lib.NVML_CLOCK_SM), ("memory", lib.NVML_CLOCK_MEM)):
            mhz = nvml.call("nvmlDeviceGetApplicationsClock", handle, clock)
            if mhz:
                out[f"application clock {field}"] = f"{mhz} MHz"
        ecc = nvml.call("nvmlDeviceGetEccMode", handle)
        if ecc:
            current, pending = (v == lib.NVML_FEATURE_ENABLED for v in ecc[:2])
            text = "on" if current else "off"
            if pending != current:
                text += f" ({'on' if pending else 'off'} after the next reset)"
            out["ECC"] = text
        return out

    # -- synchronization and memory -----------------------------------------------------------
    def _used_devices(self) -> list[int]:
        """The current device and every other device this process holds memory on: a model
        that accelerate's ``device_map`` spreads over several GPUs runs in one process, and a
        round is done only when its last device is. Devices without our memory are never
        touched (synchronizing one would create a CUDA context there: memory, and a process
        on a GPU someone else measures)."""
        if self._used is None:
            import torch

            current = self._current()
            self._used = [
                index
                for index in range(torch.cuda.device_count())
                if index == current or torch.cuda.memory_reserved(index) > 0
            ]
        return self._used

    def bind_device(self, local_rank: int) -> None:
        super().bind_device(local_rank)
        self._used = None

    def synchronize(self) -> None:
        import torch

        used = self._used_devices()
        if len(used) == 1:
            torch.cuda.synchronize()
            return
        for index in used:
            torch.cuda.synchronize(index)

    def reset_peak_memory(self) -> None:
        """Start the peak over on every device in use (found again here: the rounds run after
        the model is placed)."""
        import torch

        self._used = None
        for index in self._used_devices():
            torch.cuda.reset_peak_memory_stats(index)

    def peak_memory_bytes(self) -> int | None:
        """The highest allocator peak (``max_memory_allocated``: tensors, not the allocator's
        cache) among the devices in use: the device that came closest to running out."""
        import torch

        return max(int(torch.cuda.max_memory_allocated(i)) for i in self._used_devices())

    def available_memory_bytes(self) -> int | None:
        """What the driver has free on the current device plus what torch's caching allocator
        holds unused (after an oom the allocator keeps its blocks: they are ours to reuse)."""
        import torch

        free, _total = torch.cuda.mem_get_info()
        cached = int(torch.cuda.memory_reserved()) - int(torch.cuda.memory_allocated())
        return int(free) + max(0, cached)

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

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        import torch

        return (torch.OutOfMemoryError,)  # torch.cuda.OutOfMemoryError is the same class

    def free_memory(self) -> None:
        """Collect what the failed or finished workload left (gc), then hand torch's cached
        blocks back to the driver, so the next test's memory check sees them free."""
        import torch

        super().free_memory()
        torch.cuda.empty_cache()
        self._used = None

    def memory_bandwidth(self) -> Bandwidth | None:
        """The published peak of the GPU (``roofline.PEAKS``); for a MIG slice the share of it
        its memory slices get: a ``1g.10gb`` slice of an 80 GB A100 owns 1 of 8 memory slices
        and an eighth of the bandwidth. None where the parent's memory is not in the name."""
        from ..roofline import Bandwidth, published_peak

        name = self.device_name()
        whole = published_peak(name)
        profile = mig_profile(name)
        if whole is None or profile is None:
            return whole
        parent = re.search(r"(\d+)\s*GB", MIG_PROFILE.split(name)[0], re.IGNORECASE)
        sliced = re.search(r"\.(\d+)gb", profile)
        if parent is None or sliced is None:
            return None
        share = round(MIG_MEMORY_SLICES * int(sliced.group(1)) / int(parent.group(1)))
        share = min(MIG_MEMORY_SLICES, max(1, share))
        return Bandwidth(
            whole.bytes_per_s * share / MIG_MEMORY_SLICES,
            whole.method,
            f"{whole.source}; MIG {profile}: {share}/{MIG_MEMORY_SLICES} of the memory "
            f"slices and of the bandwidth ({MIG_GUIDE})",
            name,
        )

    # -- energy -------------------------------------------------------------------------------
    #: The energy meter, made on first use and kept for the process.
    _energy: Optional[EnergyMeter] = None

    def energy_meter(self) -> Optional[EnergyMeter]:
        """NVML's total-energy counter over the GPUs a round runs on (``energy.NvmlMeter``):
        the devices this process holds memory on and, in a rank group, the local ranks'
        devices too, since rank 0's record speaks for the group. A ROCm build has none yet."""
        if self._energy is None:
            from ..energy import AbsentMeter, NvmlMeter

            if self.is_rocm():
                self._energy = AbsentMeter(
                    "amd-smi", "AMD GPUs' energy accumulator (amd-smi) is not read yet"
                )
            else:

                def handle(lib: Any, index: int) -> Any:
                    session = _Nvml()
                    session.lib = lib
                    return self._handle(session, index)

                self._energy = NvmlMeter(self._energy_devices, handle)
        return self._energy

    def _energy_devices(self) -> list[int]:
        import torch

        ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        group = range(min(ranks, torch.cuda.device_count())) if ranks > 1 else ()
        return sorted({*self._used_devices(), *group})


def _amdgpu_driver() -> Optional[str]:
    """The amdgpu kernel driver's version where the DKMS module says it (ROCm's driver)."""
    try:
        with open("/sys/module/amdgpu/version") as f:
            return f.read().strip() or None
    except OSError:
        return None
