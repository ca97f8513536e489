"""The cuda (and ROCm), xpu and mps backends through fake vendor modules that record calls.

No GPU here: ``torch.cuda`` / ``torch.xpu`` / ``torch.mps`` are swapped for fakes and a fake
``pynvml`` goes into ``sys.modules``. What the tests pin is what a user sees: the device key
(MIG profile in it, a safe path component whatever the driver says), the versions and device
settings provenance records (power limit in W, application clocks in MHz, ECC), the peak
memory over the devices a process uses, an out-of-memory error recorded as ``oom`` with the
memory freed for the next test, and the skip reasons of backends not present on this machine.
None of it has run on real hardware.
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import Any, ClassVar, Optional

import pytest
import torch
from fakes import WordTokenizer

from pytest_llmperf import backends, engines
from pytest_llmperf.backends import Probe
from pytest_llmperf.backends.cuda import CudaBackend, mig_profile
from pytest_llmperf.backends.mps import MpsBackend
from pytest_llmperf.backends.xpu import XpuBackend
from pytest_llmperf.baselines import perf_versions, safe_component, version_changes
from pytest_llmperf.engines.base import Engine, LoadedModel
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.spec import RecordContext, WorkloadSpec

GiB = 2**30


class FakeProps:
    def __init__(self, name: str, total: int, uuid: str, arch: str = "") -> None:
        self.name, self.total_memory, self.uuid, self.gcnArchName = name, total, uuid, arch


class FakeCuda:
    """``torch.cuda`` as the backend uses it: every call is appended to ``calls``."""

    def __init__(
        self,
        names: tuple[str, ...] = ("NVIDIA H100 80GB HBM3",),
        uuids: tuple[str, ...] = (),
        capability: tuple[int, int] = (9, 0),
        arch: str = "",
    ) -> None:
        self.capability, self.arch = capability, arch
        self.current = 0
        self.calls: list[tuple[Any, ...]] = []
        self.free = 70 * GiB
        self.names = list(names)
        if uuids:
            self.uuids = list(uuids)
        #: Called by empty_cache (the OOM test checks what is still alive then).
        self.on_empty_cache: Any = None

    @property
    def names(self) -> list[str]:
        return self._names

    @names.setter
    def names(self, names: list[str]) -> None:
        """One device per name, each with empty memory and a default UUID."""
        self._names = list(names)
        self.uuids = [f"uuid-{i}" for i in range(len(names))]
        self.reserved = [0] * len(names)
        self.allocated = [0] * len(names)
        self.peaks = [0] * len(names)

    def _index(self, device: Optional[int]) -> int:
        return self.current if device is None else device

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.names)

    def current_device(self) -> int:
        return self.current

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))
        self.current = index

    def get_device_name(self, device: Optional[int] = None) -> str:
        return self.names[self._index(device)]

    def get_device_capability(self, device: Optional[int] = None) -> tuple[int, int]:
        return self.capability

    def get_device_properties(self, device: Optional[int] = None) -> FakeProps:
        i = self._index(device)
        return FakeProps(self.names[i], 80 * GiB, self.uuids[i], self.arch)

    def synchronize(self, device: Optional[int] = None) -> None:
        self.calls.append(("synchronize", device))

    def reset_peak_memory_stats(self, device: Optional[int] = None) -> None:
        self.calls.append(("reset_peak_memory_stats", device))
        i = self._index(device)
        self.peaks[i] = self.allocated[i]

    def max_memory_allocated(self, device: Optional[int] = None) -> int:
        self.calls.append(("max_memory_allocated", device))
        return self.peaks[self._index(device)]

    def memory_reserved(self, device: Optional[int] = None) -> int:
        return self.reserved[self._index(device)]

    def memory_allocated(self, device: Optional[int] = None) -> int:
        return self.allocated[self._index(device)]

    def mem_get_info(self, device: Optional[int] = None) -> tuple[int, int]:
        return self.free, 80 * GiB

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache",))
        if self.on_empty_cache is not None:
            self.on_empty_cache()


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML absent unless a test adds it
    return fake


def backend_on(fake: FakeCuda) -> CudaBackend:
    backend = CudaBackend()
    backend._probe = Probe(True, "", fake.device_count())
    return backend


# -- a fake pynvml --------------------------------------------------------------------------


class FakeNvml(types.ModuleType):
    """nvidia-ml-py's ``pynvml`` module: handles are the devices' UUID strings; a field missing
    from ``devices[uuid]`` raises NVMLError(NOT_SUPPORTED), as a part without it does."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_FEATURE_DISABLED = 0
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    def __init__(self, devices: dict[str, dict[str, Any]], order: list[str]) -> None:
        super().__init__("pynvml")
        self.devices, self.order = devices, order
        self.calls: list[tuple[Any, ...]] = []

    def _field(self, handle: str, field: str) -> Any:
        if field not in self.devices[handle]:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.devices[handle][field]

    def nvmlInit(self) -> None:
        self.calls.append(("nvmlInit",))

    def nvmlShutdown(self) -> None:
        self.calls.append(("nvmlShutdown",))

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.calls.append(("nvmlDeviceGetHandleByUUID", uuid))
        if uuid not in self.devices:
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.calls.append(("nvmlDeviceGetHandleByIndex", index))
        return self.order[index]

    def nvmlDeviceGetName(self, handle: str) -> str:
        return str(self._field(handle, "name"))

    def nvmlDeviceIsMigDeviceHandle(self, handle: str) -> int:
        return int(bool(self.devices[handle].get("parent")))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: str) -> str:
        return str(self._field(handle, "parent"))

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:
        return [self._field(handle, "mig_mode"), self._field(handle, "mig_mode")]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        self.calls.append(("nvmlDeviceGetEnforcedPowerLimit", handle))
        return int(self._field(handle, "power_mw"))

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        return int(self._field(handle, "power_mw"))

    def nvmlDeviceGetApplicationsClock(self, handle: str, clock: int) -> int:
        self.calls.append(("nvmlDeviceGetApplicationsClock", handle, clock))
        return int(self._field(handle, {1: "sm_mhz", 2: "mem_mhz"}[clock]))

    def nvmlDeviceGetEccMode(self, handle: str) -> list[int]:
        return list(self._field(handle, "ecc"))


H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "mig_mode": 0,
    "power_mw": 700000,
    "sm_mhz": 1980,
    "mem_mhz": 2619,
    "ecc": (1, 1),
}


def install_nvml(monkeypatch: pytest.MonkeyPatch, devices: dict[str, dict[str, Any]]) -> FakeNvml:
    nvml = FakeNvml(devices, list(devices))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


# -- fingerprint ----------------------------------------------------------------------------


def test_an_h100_is_keyed_by_its_name_and_describes_capability_runtime_and_count(cuda):
    cuda.names = ["NVIDIA H100 80GB HBM3"] * 2
    cuda.uuids = ["u0", "u1"]
    backend = backend_on(cuda)
    assert backend.device_key() == "cuda-nvidia-h100-80gb-hbm3"
    info = backend.device_info()
    assert info["capability"] == "9.0"
    assert info["runtime"] == "cuda 12.4"
    assert info["count"] == 2
    assert info["memory_bytes"] == 80 * GiB
    assert "names" not in info and "mig" not in info
    bandwidth = backend.memory_bandwidth()
    assert bandwidth is not None and bandwidth.bytes_per_s == 3.35e12
    assert "nvidia.com" in bandwidth.source


def test_nvml_settings_and_driver_go_into_versions_in_watts_and_megahertz(cuda, monkeypatch):
    cuda.uuids = ["abcd"]
    nvml = install_nvml(monkeypatch, {"GPU-abcd": dict(H100)})
    versions = backend_on(cuda).versions()
    assert versions["cuda"] == "12.4"
    assert versions["driver"] == "550.54.15"
    assert versions["cuda driver"] == "12.4"
    assert versions["power limit"] == "700 W"
    assert versions["application clock SM"] == "1980 MHz"
    assert versions["application clock memory"] == "2619 MHz"
    assert versions["ECC"] == "on"
    # The handle was found by torch's UUID (NVML ignores CUDA_VISIBLE_DEVICES), and NVML was
    # shut down after the query.
    assert ("nvmlDeviceGetHandleByUUID", "GPU-abcd") in nvml.calls
    assert nvml.calls[0] == ("nvmlInit",) and nvml.calls[-1] == ("nvmlShutdown",)


def test_a_power_cap_reads_as_a_changed_setting_in_the_baseline_diff(cuda, monkeypatch):
    cuda.uuids = ["abcd"]
    install_nvml(monkeypatch, {"GPU-abcd": dict(H100)})
    before = {"versions": backend_on(cuda).versions()}
    install_nvml(monkeypatch, {"GPU-abcd": dict(H100, power_mw=400000)})
    after = {"versions": backend_on(cuda).versions()}
    assert version_changes(perf_versions(before), perf_versions(after)) == [
        "power limit 700 W → 400 W"
    ]


def test_unsupported_nvml_fields_are_left_out_without_an_error(cuda, monkeypatch):
    cuda.names = ["NVIDIA GeForce RTX 4090"]
    cuda.uuids = ["g"]
    consumer = {"name": "NVIDIA GeForce RTX 4090", "mig_mode": 0, "power_mw": 450000}
    install_nvml(monkeypatch, {"GPU-g": consumer})  # no app clocks, no ECC on this part
    versions = backend_on(cuda).versions()
    assert versions["power limit"] == "450 W"
    assert not any(k.startswith("application clock") or k == "ECC" for k in versions)


def test_without_nvidia_ml_py_the_nvml_fields_are_simply_absent(cuda):
    backend = backend_on(cuda)
    versions = backend.versions()
    assert versions == {"cuda": "12.4"}  # cudnn absent on this CPU torch; no driver, no note
    assert backend.device_key() == "cuda-nvidia-h100-80gb-hbm3"


def test_a_failing_nvml_init_is_like_no_nvml(cuda, monkeypatch):
    nvml = install_nvml(monkeypatch, {"GPU-uuid-0": dict(H100)})

    def broken() -> None:
        raise nvml.NVMLError(9)  # driver not loaded

    monkeypatch.setattr(nvml, "nvmlInit", broken)
    assert backend_on(cuda).versions() == {"cuda": "12.4"}


def test_two_devices_with_different_power_limits_are_both_recorded(cuda, monkeypatch):
    cuda.names = ["NVIDIA H100 80GB HBM3"] * 2
    cuda.uuids = ["a", "b"]
    install_nvml(monkeypatch, {"GPU-a": dict(H100), "GPU-b": dict(H100, power_mw=500000)})
    assert backend_on(cuda).versions()["power limit"] == "0: 700 W, 1: 500 W"


def test_cuda_visible_devices_by_number_maps_torch_index_to_the_nvml_index(cuda, monkeypatch):
    cuda.uuids = [""]  # a torch that reports no UUID
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    nvml = install_nvml(monkeypatch, {"GPU-x": dict(H100), "GPU-y": dict(H100, power_mw=300000)})
    assert backend_on(cuda).versions()["power limit"] == "300 W"
    assert ("nvmlDeviceGetHandleByIndex", 1) in nvml.calls


# -- MIG --------------------------------------------------------------------------------------


def test_a_mig_slice_is_another_device_with_its_profile_in_the_key(cuda, monkeypatch):
    mig = "MIG-5c1d2f43-1111-2222-3333-444455556666"
    cuda.names = ["NVIDIA A100-SXM4-80GB"]  # a torch whose name leaves the profile out
    cuda.uuids = ["5c1d2f43-1111-2222-3333-444455556666"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig)
    a100 = dict(H100, name="NVIDIA A100-SXM4-80GB", mig_mode=1, power_mw=400000)
    nvml = install_nvml(
        monkeypatch,
        {
            "GPU-parent": a100,
            mig: {"name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "parent": "GPU-parent"},
        },
    )
    backend = backend_on(cuda)
    key = backend.device_key()
    assert key == "cuda-nvidia-a100-sxm4-80gb-mig-1g.10gb"
    assert safe_component(key) == key
    assert backend.device_info()["mig"] == "1g.10gb"
    # The settings are the parent GPU's: a MIG handle answers none of them.
    assert backend.versions()["power limit"] == "400 W"
    assert ("nvmlDeviceGetEnforcedPowerLimit", "GPU-parent") in nvml.calls
    # One of eight memory slices: an eighth of the A100's bandwidth.
    bandwidth = backend.memory_bandwidth()
    assert bandwidth is not None and bandwidth.bytes_per_s == 2.039e12 / 8
    assert "1/8" in bandwidth.source


def test_a_mig_profile_in_torchs_own_name_needs_no_nvml(cuda):
    cuda.names = ["NVIDIA A100-SXM4-40GB MIG 3g.20gb"]
    backend = backend_on(cuda)
    assert backend.device_key() == "cuda-nvidia-a100-sxm4-40gb-mig-3g.20gb"
    bandwidth = backend.memory_bandwidth()
    assert bandwidth is not None and bandwidth.bytes_per_s == 1.555e12 * 4 / 8


def test_mig_enabled_without_a_slice_selected_is_not_keyed_as_the_whole_gpu(cuda, monkeypatch):
    cuda.names = ["NVIDIA A100-SXM4-80GB"]
    install_nvml(monkeypatch, {"GPU-uuid-0": dict(H100, mig_mode=1)})
    assert backend_on(cuda).device_key() == "cuda-nvidia-a100-sxm4-80gb-mig-unknown-profile"


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "1g.5gb"),
        ("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", "1c.3g.40gb"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
        ("NVIDIA H100 80GB HBM3", None),
    ],
)
def test_mig_profiles_are_read_from_device_names(name, profile):
    assert mig_profile(name) == profile


# -- ROCm -------------------------------------------------------------------------------------


def test_a_rocm_build_keeps_the_cuda_prefix_but_reports_hip(cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133-dd7f95766")
    monkeypatch.setattr(torch.version, "rocm", "6.2.4", raising=False)
    cuda.names = ["AMD Instinct MI300X"]
    cuda.arch = "gfx942:sramecc+:xnack-"
    backend = backend_on(cuda)
    assert backend.device_key() == "cuda-amd-instinct-mi300x"
    versions = backend.versions()
    assert versions["hip"] == "6.2.41133-dd7f95766" and versions["rocm"] == "6.2.4"
    assert "cuda" not in versions
    info = backend.device_info()
    assert info["runtime"] == "hip 6.2.41133-dd7f95766"
    assert info["arch"] == "gfx942:sramecc+:xnack-"
    bandwidth = backend.memory_bandwidth()
    assert bandwidth is not None and bandwidth.bytes_per_s == 5.3e12


def test_a_rocm_gpu_without_a_marketing_name_is_named_by_its_isa(cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "5.4.22803")
    cuda.names = [""]
    cuda.arch = "gfx90a:sramecc+:xnack-"
    assert backend_on(cuda).device_key() == "cuda-amd-gfx90a"


# -- odd names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["NVIDIA GeForce RTX 4090/../..", "../../etc/passwd", "", "   ", "NVIDIA\x00GPU*?<>|:\\"],
)
def test_an_odd_device_name_still_gives_a_safe_path_component(cuda, name):
    cuda.names = [name]
    key = backend_on(cuda).device_key()
    assert safe_component(key) == key
    assert "/" not in key and "\\" not in key and ".." not in key
    assert key.startswith("cuda-")


# -- sync and memory with one and several devices ---------------------------------------------


def test_one_device_syncs_and_reads_the_peak_of_the_current_device(cuda):
    backend = backend_on(cuda)
    cuda.allocated[0] = cuda.reserved[0] = 2 * GiB
    backend.reset_peak_memory()
    cuda.peaks[0] = 5 * GiB
    backend.synchronize()
    assert backend.peak_memory_bytes() == 5 * GiB
    assert cuda.calls == [
        ("reset_peak_memory_stats", 0),
        ("synchronize", None),
        ("max_memory_allocated", 0),
    ]


def test_a_model_spread_over_two_devices_syncs_both_and_reports_the_fuller_one(cuda):
    cuda.names = ["NVIDIA A10G"] * 4
    cuda.reserved = [6 * GiB, 0, 9 * GiB, 0]  # accelerate placed layers on devices 0 and 2
    backend = backend_on(cuda)
    backend.reset_peak_memory()
    cuda.peaks = [7 * GiB, 0, 11 * GiB, 0]
    backend.synchronize()
    assert backend.peak_memory_bytes() == 11 * GiB
    assert ("synchronize", 0) in cuda.calls and ("synchronize", 2) in cuda.calls
    # Devices this process never used are not touched (no CUDA context created there).
    assert not any(call[1:] in ((1,), (3,)) for call in cuda.calls)


def test_a_rank_bound_to_its_device_measures_that_device(cuda):
    cuda.names = ["NVIDIA H100 80GB HBM3"] * 2
    cuda.reserved = [0, 3 * GiB]
    backend = backend_on(cuda)
    backend.bind_device(1)
    backend.reset_peak_memory()
    backend.synchronize()
    backend.peak_memory_bytes()
    assert cuda.calls == [
        ("set_device", 1),
        ("reset_peak_memory_stats", 1),
        ("synchronize", None),
        ("max_memory_allocated", 1),
    ]


def test_torch_cached_blocks_count_as_available_memory(cuda):
    cuda.free, cuda.reserved[0], cuda.allocated[0] = 10 * GiB, 6 * GiB, 2 * GiB
    assert backend_on(cuda).available_memory_bytes() == 14 * GiB


# -- out of memory ----------------------------------------------------------------------------


class Activations:
    """Stands for the tensors a forward pass holds when the allocator gives up."""


class CudaOomEngine(Engine):
    """Loads instantly, then runs out of device memory inside generate while its frame holds
    activations (``alive`` says whether they still exist)."""

    name: ClassVar[str] = "fake-cuda-oom"
    alive: ClassVar[Any] = None

    def load(self, model: Any, spec: Any, backend: Any, store: Any = None) -> LoadedModel:
        return LoadedModel(object(), WordTokenizer(), False, "fake", 1024, 0.0, spec.dtype)

    def generate(self, loaded: LoadedModel, prompt: Any, new_tokens: int, on_token: Any) -> Any:
        activations = Activations()
        type(self).alive = weakref.ref(activations)
        if prompt.input_ids.shape[0] >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        for _ in range(new_tokens):
            on_token()
        new = torch.full((prompt.input_ids.shape[0], new_tokens), 7, dtype=torch.long)
        return torch.cat([prompt.input_ids, new], dim=1)


def test_an_out_of_memory_error_is_an_oom_record_and_frees_what_the_call_held(cuda):
    engines.register(CudaOomEngine())

    class HostInputs(CudaBackend):
        torch_device = "cpu"  # the prompt tensors stay on the host: this torch has no CUDA

    backend = HostInputs()
    backend._probe = Probe(True, "", 1)
    CudaOomEngine.alive = None
    held_at_empty_cache: list[bool] = []

    def empty_cache() -> None:
        if CudaOomEngine.alive is not None:  # after the failed call (a load drops first)
            held_at_empty_cache.append(CudaOomEngine.alive() is not None)

    cuda.on_empty_cache = empty_cache
    spec = WorkloadSpec(
        kind="generate", model="tiny-bloom", engine="fake-cuda-oom", batch_size=8, rounds=2
    )
    context = RecordContext(key="test_oom", suite="test_s", device_key="cuda-fake")
    cache = ModelCache()
    record = execute(spec, context, backend, cache)
    assert record.outcome == "oom"
    assert "CUDA out of memory. Tried to allocate 20.00 GiB" in record.note
    assert ("empty_cache",) in cuda.calls
    # The activations were gone before torch's cache went back to the driver: a traceback
    # kept alive through the cleanup would have held them, and the next test's memory check
    # would have found the device still full.
    assert held_at_empty_cache and held_at_empty_cache[-1] is False
    assert cache.loaded is None  # the model was dropped too: the next test loads afresh
    # ... and runs.
    smaller = WorkloadSpec(
        kind="generate", model="tiny-bloom", engine="fake-cuda-oom", batch_size=1, rounds=2
    )
    cuda.allocated[0] = GiB  # the weights: the peak starts there
    record = execute(smaller, context, backend, cache)
    assert record.outcome == "ok", record.note
    assert record.value("peak_memory_bytes") == GiB


# -- xpu and mps ------------------------------------------------------------------------------


def test_xpu_and_mps_skip_here_with_a_reason():
    for name in ("xpu", "mps"):
        probe = type(backends.get_backend(name))().probe()
        assert not probe.available
        assert probe.reason
    if sys.platform != "darwin":
        assert MpsBackend().probe().reason == f"MPS needs macOS (this is {sys.platform})"


class FakeXpu:
    def __init__(self, memory_api: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        if memory_api:
            self.reset_peak_memory_stats = lambda: self.calls.append(("reset_peak_memory_stats",))
            self.max_memory_allocated = lambda: (
                self.calls.append(("max_memory_allocated",)) or (3 * GiB)
            )
            self.mem_get_info = lambda: (40 * GiB, 64 * GiB)

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def get_device_name(self, index: int = 0) -> str:
        return "Intel(R) Data Center GPU Max 1550"

    def get_device_properties(self, index: int = 0) -> Any:
        return types.SimpleNamespace(
            driver_version="1.3.27642", version="12.60.7", platform_name="Intel(R) Level-Zero"
        )


def test_xpu_syncs_reads_the_peak_and_reports_the_driver(monkeypatch):
    fake = FakeXpu()
    monkeypatch.setattr(torch, "xpu", fake, raising=False)
    monkeypatch.setattr(torch.version, "xpu", "20250101", raising=False)
    backend = XpuBackend()
    backend._probe = Probe(True, "", 1)
    backend.reset_peak_memory()
    backend.synchronize()
    assert backend.peak_memory_bytes() == 3 * GiB
    assert fake.calls == [
        ("reset_peak_memory_stats",),
        ("synchronize",),
        ("max_memory_allocated",),
    ]
    assert backend.device_key() == "xpu-intel-data-center-gpu-max-1550"
    assert backend.versions() == {
        "xpu": "20250101",
        "driver": "1.3.27642",
        "sycl runtime": "12.60.7",
    }
    assert backend.available_memory_bytes() == 40 * GiB


def test_an_xpu_torch_without_memory_stats_reports_no_peak_rather_than_a_guess(monkeypatch):
    monkeypatch.setattr(torch, "xpu", FakeXpu(memory_api=False), raising=False)
    backend = XpuBackend()
    backend.reset_peak_memory()
    assert backend.peak_memory_bytes() is None
    assert backend.available_memory_bytes() is None


class FakeMps:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def driver_allocated_memory(self) -> int:
        self.calls.append("driver_allocated_memory")
        return 6 * GiB

    def recommended_max_memory(self) -> int:
        return 21 * GiB

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")


def test_mps_reports_what_metal_holds_as_its_memory_figure(monkeypatch):
    fake = FakeMps()
    monkeypatch.setattr(torch, "mps", fake)
    backend = MpsBackend()
    backend._chip = "Apple M2 Max"
    backend.reset_peak_memory()  # nothing to reset on MPS
    backend.synchronize()
    assert backend.peak_memory_bytes() == 6 * GiB
    assert backend.available_memory_bytes() == 15 * GiB
    backend.free_memory()
    assert fake.calls == [
        "synchronize",
        "driver_allocated_memory",
        "driver_allocated_memory",
        "empty_cache",
    ]
    assert backend.device_key() == "mps-apple-m2-max"
