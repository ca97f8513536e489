"""Energy per token: the counters (RAPL sysfs, NVML, HLML) through fakes that record what was
read, and the metrics a user sees in results.json and the gate, on the fake chip."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from fakes import steady_e2e
from helpers import FAKE, GENERATE, read_results, record_of, samples

from pytest_llmperf import energy
from pytest_llmperf.backends.cuda import CudaBackend
from pytest_llmperf.backends.neuron import NeuronBackend
from pytest_llmperf.energy import HlmlMeter, NvmlMeter, RaplMeter, habana_modules

RANGE_UJ = 262_143_328_850  # a typical package's max_energy_range_uj (~262 kJ)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def zone(root: Path, entry: str, name: str, energy_uj: int, **files: int) -> Path:
    path = root / entry
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    for key, value in files.items():
        (path / key).write_text(f"{value}\n")
    return path


@pytest.fixture
def rapl(tmp_path: Path) -> Path:
    """Two packages, a core subzone inside package 0, psys (the platform, packages included)
    and the MMIO copy of package 0: only the two packages count."""
    root = tmp_path / "powercap"
    limits = {"max_energy_range_uj": RANGE_UJ, "constraint_0_max_power_uw": 200_000_000}
    zone(root, "intel-rapl:0", "package-0", 1_000_000, **limits)
    zone(root, "intel-rapl:0:0", "core", 500_000, max_energy_range_uj=RANGE_UJ)
    zone(root, "intel-rapl:1", "package-1", 3_000_000, **limits)
    zone(root, "intel-rapl:2", "psys", 9_000_000, max_energy_range_uj=RANGE_UJ)
    zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000, max_energy_range_uj=RANGE_UJ)
    return root


def set_uj(root: Path, entry: str, value: int) -> None:
    (root / entry / "energy_uj").write_text(f"{value}\n")


def test_rapl_sums_the_packages_only(rapl):
    clock = Clock()
    meter = RaplMeter(str(rapl), clock=clock)
    assert meter.why_absent == "" and meter.name == "rapl"
    assert meter.domains() == ["package-0", "package-1"]
    start = meter.read()
    assert start == 4.0  # 1 J + 3 J: not the core subzone, psys or the MMIO copy
    clock.now = 2.0
    set_uj(rapl, "intel-rapl:0", 51_000_000)  # +50 J
    set_uj(rapl, "intel-rapl:1", 33_000_000)  # +30 J
    set_uj(rapl, "intel-rapl:0:0", 40_000_000)  # inside package 0's count already
    set_uj(rapl, "intel-rapl:2", 900_000_000)  # the whole platform
    assert meter.delta(start, meter.read()) == pytest.approx(80.0)


def test_rapl_undoes_a_wrap_with_the_zone_range(rapl):
    clock = Clock()
    set_uj(rapl, "intel-rapl:0", RANGE_UJ - 10_000_000)  # 10 J before the wrap
    meter = RaplMeter(str(rapl), clock=clock)
    start = meter.read()
    clock.now = 1.0
    set_uj(rapl, "intel-rapl:0", 15_000_000)  # wrapped, then 15 J more
    set_uj(rapl, "intel-rapl:1", 3_000_000 + 20_000_000)
    assert meter.delta(start, meter.read()) == pytest.approx(10 + 15 + 20)


def test_rapl_refuses_a_round_long_enough_to_wrap_twice(rapl):
    clock = Clock()
    meter = RaplMeter(str(rapl), clock=clock)
    start = meter.read()
    # 2 × 200 W × 700 s = 280 kJ ≥ the 262 kJ range: the counter may have gone round unseen
    clock.now = 700.0
    set_uj(rapl, "intel-rapl:0", 2_000_000)
    assert meter.delta(start, meter.read()) is None


def test_rapl_without_a_range_refuses_a_counter_that_went_back_and_an_absurd_jump(tmp_path):
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 50_000_000)  # no max_energy_range_uj, no limits
    clock = Clock()
    meter = RaplMeter(str(root), clock=clock)
    start = meter.read()
    clock.now = 1.0
    set_uj(root, "intel-rapl:0", 40_000_000)
    assert meter.delta(start, meter.read()) is None  # negative: never reported
    set_uj(root, "intel-rapl:0", 50_000_000 + 10**12)  # a million joules in a second
    assert meter.delta(start, meter.read()) is None
    set_uj(root, "intel-rapl:0", 50_000_000)
    assert meter.delta(start, meter.read()) is None  # did not move: no zero energy


def test_rapl_unreadable_as_a_user_is_absent_with_the_reason(rapl, monkeypatch):
    real = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    meter = RaplMeter(str(rapl))
    assert "readable by root only" in meter.why_absent
    assert "intel-rapl:0/energy_uj" in meter.why_absent
    assert meter.read() is None


def test_rapl_without_powercap_says_so(tmp_path):
    meter = RaplMeter(str(tmp_path / "missing"))
    assert "no RAPL driver" in meter.why_absent and meter.read() is None


def test_a_rapl_read_costs_little(rapl):
    """What a round pays twice, outside its timed span: reported, never asserted on speed."""
    import timeit

    meter = RaplMeter(str(rapl))
    per_read = min(timeit.repeat(meter.read, number=200, repeat=3)) / 200
    print(f"RAPL read of 2 packages (tmpfs fake): {per_read * 1e6:.1f} µs")
    assert meter.read() is not None


# -- NVML -------------------------------------------------------------------------------------


class FakeNvml(types.ModuleType):
    """pynvml as nvidia-ml-py ships it, for the calls the meter makes; ``calls`` records them."""

    def __init__(self, millijoules: dict[str, int], unsupported: tuple[str, ...] = ()) -> None:
        super().__init__("pynvml")
        self.millijoules = millijoules
        self.unsupported = unsupported
        self.calls: list[tuple[str, Any]] = []

        class NVMLError(Exception):
            pass

        class NVMLError_NotSupported(NVMLError):  # noqa: N801 (pynvml's name)
            pass

        self.NVMLError = NVMLError
        self.NVMLError_NotSupported = NVMLError_NotSupported

    def nvmlInit(self) -> None:  # noqa: N802
        self.calls.append(("nvmlInit", None))

    def nvmlDeviceIsMigDeviceHandle(self, handle: str) -> int:  # noqa: N802
        return 1 if handle.startswith("mig") else 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:  # noqa: N802
        self.calls.append(("nvmlDeviceGetTotalEnergyConsumption", handle))
        if handle in self.unsupported:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.millijoules[handle]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: str) -> list[int]:  # noqa: N802
        return [100_000, 700_000]  # mW: an H100 SXM accepts up to 700 W


def test_nvml_sums_the_energy_counters_of_the_devices_in_use(monkeypatch):
    nvml = FakeNvml({"gpu0": 1_000_000, "gpu1": 2_000_000})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    clock = Clock()
    meter = NvmlMeter(lambda: [0, 1], lambda lib, index: f"gpu{index}", clock=clock)
    start = meter.read()
    assert start == 3000.0  # mJ since the driver loaded, as joules
    nvml.millijoules = {"gpu0": 1_150_000, "gpu1": 2_250_000}
    clock.now = 1.0
    assert meter.delta(start, meter.read()) == pytest.approx(400.0)
    reads = [h for name, h in nvml.calls if name == "nvmlDeviceGetTotalEnergyConsumption"]
    assert reads == ["gpu0", "gpu1", "gpu0", "gpu1"]
    assert nvml.calls.count(("nvmlInit", None)) == 1  # once per meter, not per read
    # more than 2 × 700 W per GPU over the round: refused
    nvml.millijoules = {"gpu0": 9_000_000, "gpu1": 2_250_000}
    assert meter.delta(start, meter.read()) is None
    # a driver reload restarts the count: a decrease is a reset, never a negative energy
    nvml.millijoules = {"gpu0": 10, "gpu1": 10}
    assert meter.delta(start, meter.read()) is None


def test_nvml_not_supported_is_absent_with_the_reason(monkeypatch):
    nvml = FakeNvml({"gpu0": 5}, unsupported=("gpu0",))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = NvmlMeter(lambda: [0], lambda lib, index: f"gpu{index}")
    assert meter.read() is None
    assert "no total-energy counter on cuda:0" in meter.why_absent
    assert meter.read() is None  # and it is not asked again
    assert len([c for c in nvml.calls if c[0] == "nvmlDeviceGetTotalEnergyConsumption"]) == 1


def test_nvml_on_a_mig_slice_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml({"mig0": 5}))
    meter = NvmlMeter(lambda: [0], lambda lib, index: "mig0")
    assert meter.read() is None and "MIG slice" in meter.why_absent


def test_cuda_backend_reads_nvml_for_the_devices_it_uses(monkeypatch):
    nvml = FakeNvml({"gpu0": 1_000, "gpu3": 7_000})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    backend = CudaBackend()
    backend._used = [0, 3]  # a model spread over two GPUs by accelerate
    monkeypatch.setattr(CudaBackend, "is_rocm", staticmethod(lambda: False))
    monkeypatch.setattr(backend, "_handle", lambda session, index: f"gpu{index}")
    meter = backend.energy_meter()
    assert meter is backend.energy_meter()  # one per backend and process
    assert meter is not None and meter.name == "nvml"
    assert meter.read() == 8.0


# -- HLML (Gaudi) -----------------------------------------------------------------------------


class FakeHlml(types.ModuleType):
    """habana-pyhlml's pyhlml for the calls the meter makes: modules 0..N-1 behind handles."""

    def __init__(self, modules: int, millijoules: dict[int, int]) -> None:
        super().__init__("pyhlml")
        self.modules = modules
        self.millijoules = millijoules
        self.calls: list[tuple[str, Any]] = []

        class HLMLError(Exception):
            pass

        self.HLMLError = HLMLError

    def hlmlInit(self) -> None:  # noqa: N802
        self.calls.append(("hlmlInit", None))

    def hlmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.modules

    def hlmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"h{index}"

    def hlmlDeviceGetModuleID(self, handle: str) -> int:  # noqa: N802
        return int(handle[1:])

    def hlmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:  # noqa: N802
        self.calls.append(("hlmlDeviceGetTotalEnergyConsumption", handle))
        return self.millijoules[int(handle[1:])]

    def hlmlDeviceGetPowerManagementDefaultLimit(self, handle: str) -> int:  # noqa: N802
        return 600_000


def test_hlml_reads_the_module_pinned_by_habana_visible_modules(monkeypatch):
    hlml = FakeHlml(8, {m: 1000 * (m + 1) for m in range(8)})
    monkeypatch.setitem(sys.modules, "pyhlml", hlml)
    monkeypatch.setenv("HABANA_VISIBLE_MODULES", "5")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    meter = HlmlMeter()
    assert meter.why_absent == "" and meter.read() == 6.0
    assert [h for n, h in hlml.calls if n == "hlmlDeviceGetTotalEnergyConsumption"] == ["h5"]


def test_hlml_without_knowing_the_module_is_absent_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyhlml", FakeHlml(8, {}))
    monkeypatch.delenv("HABANA_VISIBLE_MODULES", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    meter = HlmlMeter()
    assert "HABANA_VISIBLE_MODULES is not set" in meter.why_absent
    assert meter.read() is None


def test_habana_modules_of_a_rank_group():
    assert habana_modules({"HABANA_VISIBLE_MODULES": "0,1,2,3", "LOCAL_WORLD_SIZE": "4"}) == (
        [0, 1, 2, 3],
        "",
    )
    ids, why = habana_modules({"HABANA_VISIBLE_MODULES": "0,1", "LOCAL_WORLD_SIZE": "1"})
    assert ids is None and "2 modules for 1 process" in why
    assert habana_modules({}, node_modules=1) == ([0], "")


def test_neuron_has_no_counter_and_says_why():
    meter = NeuronBackend().energy_meter()
    assert meter is not None and meter.read() is None
    assert "no energy counter" in meter.why_absent
    assert meter.why_absent == energy.NEURON_ABSENT


# -- the metrics, on the fake chip ------------------------------------------------------------

TWO_TESTS = """
    def test_gen(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)

    def test_gen2(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)
"""


def test_energy_per_round_and_per_token_from_the_counter(project, monkeypatch):
    monkeypatch.setenv("FAKE_ENERGY_W", "256")
    project.makepyfile(test_energy=GENERATE)
    result = project.runpytest(FAKE, "--llmperf-report=out")
    result.assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    joules = 256 * steady_e2e(100)  # the fake chip draws 256 W for each round's device time
    assert samples(record, "energy_j") == [joules] * record["workload"]["rounds"]
    assert record["metrics"]["energy_j"]["unit"] == "J"
    assert record["metrics"]["joules_per_token"]["median"] == joules / 100
    assert record["metrics"]["joules_per_token"]["direction"] == "lower"
    assert record["provenance"]["energy_meter"] == "fake-counter"
    per_token = f"{joules / 100:.4g}"
    result.stdout.re_match_lines([r"test\s+backend.*J/token\s+peak mem", rf".*\s{per_token}\s"])


def test_no_counter_means_no_metric_not_zero(project):
    project.makepyfile(test_energy=GENERATE)
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    assert "energy_j" not in record["metrics"] and "joules_per_token" not in record["metrics"]
    assert "energy_meter" not in record["provenance"]
    assert "energy" not in record.get("note", "")


def test_a_round_whose_counter_failed_drops_the_metric_with_a_note(project, monkeypatch):
    monkeypatch.setenv("FAKE_ENERGY_W", "256")
    # warm-up reads nothing; round 1 reads 1-2, round 2 reads 3-4: the 4th read fails
    monkeypatch.setenv("FAKE_ENERGY_FAIL", "4")
    project.makepyfile(test_energy=GENERATE)
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "out"), "test_gen")
    assert "energy_j" not in record["metrics"]
    assert "joules_per_token" not in record["metrics"]
    assert (
        "energy counter (fake-counter) unreadable, reset, wrapped past undoing or not moved "
        "in round 2 of"
    ) in record["note"]


def test_an_unreadable_counter_is_noted_once_and_kept_in_provenance(project, monkeypatch):
    monkeypatch.setenv("FAKE_ENERGY_ABSENT", "energy_uj is readable by root only")
    project.makepyfile(test_energy=TWO_TESTS)
    project.runpytest(FAKE, "--llmperf-report=out").assert_outcomes(passed=2)
    rows = read_results(project.path / "out")
    first, second = record_of(rows, "test_gen"), record_of(rows, "test_gen2")
    assert "no energy_j (fake-counter): energy_uj is readable by root only" in first["note"]
    assert "energy" not in second.get("note", "")
    for record in (first, second):
        assert "energy_j" not in record["metrics"]
        assert record["provenance"]["energy_absent"] == "energy_uj is readable by root only"


GATED_ON_ENERGY = """
    import pytest

    @pytest.mark.llmperf(gate=["e2e_latency_s", "energy_j"])
    def test_gen(llmperf):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", new_tokens=100)
"""


def test_energy_is_gated_when_named_and_fails_when_it_rises(project, monkeypatch):
    monkeypatch.setenv("FAKE_ENERGY_W", "256")
    project.makepyfile(test_energy=GATED_ON_ENERGY)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    project.runpytest(FAKE).assert_outcomes(passed=1)
    # same speed, 25 % more power (someone lifted a power cap, a hotter part): energy regresses
    monkeypatch.setenv("FAKE_ENERGY_W", "320")
    result = project.runpytest(FAKE, "--llmperf-confirm=0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*regressed: energy_j * (×1.250, +25.0%)*"])


def test_energy_is_not_gated_by_default(project, monkeypatch):
    monkeypatch.setenv("FAKE_ENERGY_W", "256")
    project.makepyfile(test_energy=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    monkeypatch.setenv("FAKE_ENERGY_W", "320")
    project.runpytest(FAKE, "--llmperf-confirm=0").assert_outcomes(passed=1)
