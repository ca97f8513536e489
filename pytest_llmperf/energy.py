"""Energy counters: the joules a round cost, where the hardware counts them.

A counter, not sampled power: every meter here reads a cumulative count the hardware keeps
(NVML's total energy on NVIDIA Volta and newer, HLML's on Gaudi, RAPL's package counters on a
host CPU), once after the sync that opens a round and once after the sync that closes it
(``measure.run_rounds``). Integrating a power reading sampled now and then would be a guess
about the moments between samples, so hardware that only reports power (Neuron) has no meter:
``energy_j`` is then absent, never zero, and ``why_absent`` says why.

What a delta must survive: a counter that wraps (RAPL's ``energy_uj`` returns to 0 after
``max_energy_range_uj``: undone when the range is known and the round was too short to wrap
twice), one that restarts (a driver reload resets NVML's and HLML's: a decrease there is not a
wrap) and one that is read too soon after its last update. A delta that is negative, or more
than twice the domains' peak power over the round, is None: the round gets no energy and the
record a note, so no absurd value reaches a baseline.

Built against nvidia-ml-py's ``pynvml`` (``nvmlDeviceGetTotalEnergyConsumption``: mJ since
the driver loaded), habana-pyhlml's ``pyhlml`` (``hlmlDeviceGetTotalEnergyConsumption``: mJ
since the driver loaded) and the Linux powercap sysfs ABI; verified through fakes
(tests/test_energy_meters.py), not on hardware.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

#: A delta above this many watts per domain over the round is absurd whatever the part (no
#: single GPU, Gaudi or CPU package draws 5 kW), used where a domain's peak power is unknown.
ABSURD_W = 5000.0
#: A delta may be at most this multiple of the domains' peak power × the round's time: the
#: counters update in steps, so a short round can see a step's worth more than its share.
PEAK_MARGIN = 2.0

POWERCAP_ROOT = "/sys/class/powercap"
#: Top-level RAPL zones (``intel-rapl:0``), not their subzones (``intel-rapl:0:0``, which the
#: package's count contains) nor the MMIO copy of the package zone (``intel-rapl-mmio:0``).
_RAPL_ZONE = re.compile(r"intel-rapl:\d+")


class Reading(float):
    """A cumulative count in joules (a plain float to callers) that keeps what :meth:`delta`
    needs: each domain's own raw count (a sum of counters that wrap apart cannot be unwrapped)
    and when it was read."""

    parts: tuple[tuple[str, float], ...]
    at_s: float

    def __new__(cls, parts: Sequence[tuple[str, float]], at_s: float) -> Reading:
        obj = super().__new__(cls, sum(value for _key, value in parts))
        obj.parts = tuple(parts)
        obj.at_s = at_s
        return obj


class EnergyMeter:
    """One hardware energy counter, summed over the domains (devices, packages) a workload
    uses. Subclasses read the raw counts (:meth:`_read_parts`); this class turns two reads
    into a trustworthy delta or None.

    ``why_absent`` non-empty means no counter is readable here (permissions, an unsupported
    part): :meth:`read` returns None at once, at no cost to the rounds, and the record says
    why once."""

    name: str = ""
    #: The slack of the peak-power bound: a counter that updates every ~0.1 s can show a whole
    #: step in a shorter round. Seconds.
    resolution_s: float = 0.1

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.why_absent = ""
        self._clock = clock
        #: Whether a record has already said why there is no energy (once per process).
        self.told = False

    # -- what subclasses provide ----------------------------------------------------------
    def _read_parts(self) -> Optional[list[tuple[str, float]]]:
        """Each domain's cumulative count in joules, keyed by a stable domain name; None when
        a read failed this time."""
        raise NotImplementedError

    def range_j(self, key: str) -> Optional[float]:
        """Where domain ``key``'s counter wraps to 0, in joules; None: it does not (64 bits),
        so a decrease is a reset."""
        return None

    def peak_w(self, key: str) -> Optional[float]:
        """The most domain ``key`` can draw, in watts (its power limit's ceiling); None:
        unknown, and :data:`ABSURD_W` bounds it."""
        return None

    # -- the protocol ------------------------------------------------------------------------
    def read(self) -> Optional[float]:
        """Cumulative joules now (a :class:`Reading`), None when unreadable."""
        if self.why_absent:
            return None
        parts = self._read_parts()
        return None if parts is None else Reading(parts, self._clock())

    def delta(self, start: Optional[float], end: Optional[float]) -> Optional[float]:
        """Joules between two reads; None for a reset, a wrap that cannot be undone (range
        unknown, or a round long enough to wrap twice), a count that did not move, or more
        than the domains could draw."""
        if start is None or end is None:
            return None
        if not (isinstance(start, Reading) and isinstance(end, Reading)):
            joules = float(end) - float(start)
            return joules if joules > 0 else None
        if [k for k, _ in start.parts] != [k for k, _ in end.parts]:
            return None  # the workload's devices changed between the reads
        elapsed = max(0.0, end.at_s - start.at_s)
        joules = 0.0
        ceiling = 0.0
        for (key, before), (_key, after) in zip(start.parts, end.parts):
            step = after - before
            span = self.range_j(key)
            peak = self.peak_w(key)
            if step < 0:
                if span is None:
                    return None  # a counter that does not wrap went back: reset
                step += span
            if span is not None and peak is not None and PEAK_MARGIN * peak * elapsed >= span:
                return None  # long enough to have wrapped more than once unseen
            if span is not None and peak is None and step > span / 2:
                return None  # a wrap can't be told from a half-range jump without a peak
            joules += step
            ceiling += PEAK_MARGIN * peak if peak is not None else ABSURD_W
        if joules <= 0 or joules > ceiling * max(elapsed, self.resolution_s):
            return None
        return joules


class AbsentMeter(EnergyMeter):
    """A counter kind this hardware might have but does not offer here: reads nothing, and
    says why (``energy_meter`` returns it so the record can)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__()
        self.name = name
        self.why_absent = why

    def _read_parts(self) -> Optional[list[tuple[str, float]]]:
        return None


# -- RAPL (host CPU) -------------------------------------------------------------------------


def _read_number(path: Path) -> Optional[float]:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


class RaplMeter(EnergyMeter):
    """The CPU packages' RAPL counters through powercap sysfs (Intel, and AMD since Linux
    5.8 under the same names): ``intel-rapl:N/energy_uj``, summed over the package zones.

    Package zones only: the cores and uncore are subzones inside the package's count, and
    ``psys`` (the whole platform, packages included) or DRAM (a subzone on servers, counted
    apart from the package) would either double count or measure more than the CPU. The count
    is the package's, not this process's: anything else running on it is in the joules, as
    it is in the time (``busy_load``). Since Linux 5.10 ``energy_uj`` is root's alone
    (CVE-2020-8694): unreadable, the meter is absent with that reason."""

    name = "rapl"
    resolution_s = 0.001

    def __init__(self, root: str = POWERCAP_ROOT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._zones: dict[str, Path] = {}
        self._ranges: dict[str, float] = {}
        self._peaks: dict[str, float] = {}
        base = Path(root)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            self.why_absent = (
                f"no {root} (no RAPL driver, or a VM or container that hides it): "
                "no CPU energy counter"
            )
            return
        for entry in names:
            zone = base / entry
            if not _RAPL_ZONE.fullmatch(entry):
                continue
            try:
                label = (zone / "name").read_text().strip()
            except OSError:
                continue
            if not label.startswith("package"):
                continue
            self._zones[label] = zone / "energy_uj"
            span = _read_number(zone / "max_energy_range_uj")
            if span:
                self._ranges[label] = span / 1e6
            peak = self._zone_peak_w(zone)
            if peak:
                self._peaks[label] = peak
        if not self._zones:
            self.why_absent = f"no RAPL package zone under {root} (intel-rapl:N named package-N)"
            return
        first = next(iter(self._zones.values()))
        try:
            first.read_text()
        except PermissionError:
            self.why_absent = (
                f"{first} is readable by root only (Linux 5.10+, CVE-2020-8694): "
                "run as root or make the energy_uj files readable to read CPU energy"
            )
        except OSError as exc:
            self.why_absent = f"{first}: {exc.strerror or exc}"

    @staticmethod
    def _zone_peak_w(zone: Path) -> Optional[float]:
        """The highest power limit the zone allows (PL1/PL2 ceilings: ``constraint_N_max_
        power_uw``, else the limits set), in watts; what a package can draw for a while."""
        values = [
            _read_number(path)
            for pattern in ("constraint_*_max_power_uw", "constraint_*_power_limit_uw")
            for path in sorted(zone.glob(pattern))
        ]
        found = [v for v in values if v]
        return max(found) / 1e6 if found else None

    def domains(self) -> list[str]:
        return list(self._zones)

    def _read_parts(self) -> Optional[list[tuple[str, float]]]:
        parts = []
        for label, path in self._zones.items():
            value = _read_number(path)
            if value is None:
                return None
            parts.append((label, value / 1e6))
        return parts

    def range_j(self, key: str) -> Optional[float]:
        return self._ranges.get(key)

    def peak_w(self, key: str) -> Optional[float]:
        return self._peaks.get(key)


# -- NVML (NVIDIA GPUs) ----------------------------------------------------------------------


class NvmlMeter(EnergyMeter):
    """``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded; Volta and
    newer), summed over the GPUs the workload uses: ``devices()`` gives their visible CUDA
    indices and ``handle(pynvml, index)`` the NVML handle of one (NVML numbers every GPU of the
    node, whatever CUDA_VISIBLE_DEVICES hides). Where a GPU has no counter
    (``NVMLError_NotSupported``: an older part, a MIG slice, whose GPU's counter counts every
    slice) the meter is absent with that reason."""

    name = "nvml"

    def __init__(
        self,
        devices: Callable[[], Sequence[int]],
        handle: Callable[[Any, int], Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._devices = devices
        self._resolve = handle
        self._handles: dict[int, Any] = {}
        self._peaks: dict[str, Optional[float]] = {}
        self.lib: Any = None
        try:
            import pynvml
        except ImportError:
            self.why_absent = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()  # reference-counted: stays up for this meter's reads
        except pynvml.NVMLError as exc:
            self.why_absent = f"NVML did not start: {exc}"
            return
        self.lib = pynvml

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._resolve(self.lib, index)
        return self._handles[index]

    def _read_parts(self) -> Optional[list[tuple[str, float]]]:
        lib = self.lib
        parts = []
        for index in self._devices():
            handle = self._handle(index)
            if handle is None:
                return None
            try:
                if lib.nvmlDeviceIsMigDeviceHandle(handle):
                    self.why_absent = (
                        f"cuda:{index} is a MIG slice: NVML's energy counter is the whole "
                        "GPU's, every slice included"
                    )
                    return None
            except (lib.NVMLError, AttributeError):
                pass
            try:
                millijoules = lib.nvmlDeviceGetTotalEnergyConsumption(handle)
            except lib.NVMLError_NotSupported:
                self.why_absent = (
                    f"NVML has no total-energy counter on cuda:{index} (NotSupported: "
                    "Volta or newer and a driver that exposes it are needed)"
                )
                return None
            except lib.NVMLError as exc:
                if isinstance(exc, getattr(lib, "NVMLError_NoPermission", ())):
                    self.why_absent = f"NVML refused the energy counter of cuda:{index}: {exc}"
                return None
            parts.append((f"cuda:{index}", float(millijoules) / 1000))
            self._remember_peak(f"cuda:{index}", handle)
        return parts

    def _remember_peak(self, key: str, handle: Any) -> None:
        """The highest power limit the GPU accepts (``PowerManagementLimitConstraints``'
        maximum, mW), else the limit in force: the bound of a sane delta. Asked once."""
        if key in self._peaks:
            return
        lib = self.lib
        milliwatts: Optional[float]
        try:
            milliwatts = float(lib.nvmlDeviceGetPowerManagementLimitConstraints(handle)[1])
        except (lib.NVMLError, AttributeError, TypeError, IndexError):
            milliwatts = None
        if not milliwatts:
            try:
                milliwatts = float(lib.nvmlDeviceGetEnforcedPowerLimit(handle))
            except (lib.NVMLError, AttributeError, TypeError):
                milliwatts = None
        self._peaks[key] = milliwatts / 1000 if milliwatts else None

    def peak_w(self, key: str) -> Optional[float]:
        return self._peaks.get(key)


# -- HLML (Gaudi) ----------------------------------------------------------------------------


def habana_modules(
    environ: Optional[dict[str, str]] = None, node_modules: Optional[int] = None
) -> tuple[Optional[list[int]], str]:
    """The Gaudi module ids this process group uses, or None and why not.

    A process acquires a module the runtime picks within ``HABANA_VISIBLE_MODULES``; which one
    is not reported back. It is certain only where the list has exactly as many modules as the
    group has ranks on this node (a pytest-xdist worker pinned to one, a DeepSpeed launch
    over the listed ones), or, with no list, where the node's modules are all in use."""
    env = os.environ if environ is None else environ
    ranks = int(env.get("LOCAL_WORLD_SIZE") or 1)
    listed = env.get("HABANA_VISIBLE_MODULES", "").strip()
    if listed:
        try:
            ids = [int(v) for v in listed.split(",") if v.strip()]
        except ValueError:
            return None, f"HABANA_VISIBLE_MODULES={listed!r} is not a list of module ids"
        if len(ids) == ranks:
            return ids, ""
        return None, (
            f"HABANA_VISIBLE_MODULES lists {len(ids)} modules for {ranks} process(es): which "
            "module's energy counter is ours is not known"
        )
    if node_modules is not None and node_modules == ranks:
        return list(range(node_modules)), ""
    return None, (
        "HABANA_VISIBLE_MODULES is not set: which Gaudi module this process holds is not "
        "known (pin it, as pytest-xdist workers are, to read its energy counter)"
    )


class HlmlMeter(EnergyMeter):
    """``hlmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded) through
    habana-pyhlml, the library hl-smi itself uses, summed over the modules the workload holds
    (:func:`habana_modules`). hl-smi's CSV queries offer power draw, not energy, so the
    library is the counter's only source."""

    name = "hlml"

    def __init__(
        self, modules: Optional[Callable[[int], tuple[Optional[list[int]], str]]] = None, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.lib: Any = None
        self._handles: dict[int, Any] = {}
        self._peaks: dict[str, Optional[float]] = {}
        try:
            import pyhlml
        except ImportError:
            self.why_absent = "habana-pyhlml is not installed (the HLML energy counter's binding)"
            return
        try:
            pyhlml.hlmlInit()
            count = int(pyhlml.hlmlDeviceGetCount())
            by_module = {}
            for index in range(count):
                handle = pyhlml.hlmlDeviceGetHandleByIndex(index)
                by_module[int(pyhlml.hlmlDeviceGetModuleID(handle))] = handle
        except pyhlml.HLMLError as exc:
            self.why_absent = f"HLML did not start: {exc}"
            return
        ids, why = (modules or (lambda n: habana_modules(node_modules=n)))(count)
        if ids is None:
            self.why_absent = why
            return
        missing = [m for m in ids if m not in by_module]
        if missing:
            self.why_absent = f"HLML knows no module {missing[0]} (HABANA_VISIBLE_MODULES)"
            return
        self.lib = pyhlml
        self._handles = {m: by_module[m] for m in ids}

    def _read_parts(self) -> Optional[list[tuple[str, float]]]:
        lib = self.lib
        parts = []
        for module, handle in self._handles.items():
            key = f"module:{module}"
            try:
                millijoules = lib.hlmlDeviceGetTotalEnergyConsumption(handle)
            except lib.HLMLError as exc:
                # pyhlml's per-code subclasses live in pyhlml.hlml_error (HLMLError_NotSupported)
                if type(exc).__name__ == "HLMLError_NotSupported":
                    self.why_absent = f"HLML has no energy counter on Gaudi module {module}"
                return None
            parts.append((key, float(millijoules) / 1000))
            if key not in self._peaks:
                try:
                    self._peaks[key] = lib.hlmlDeviceGetPowerManagementDefaultLimit(handle) / 1000
                except lib.HLMLError:
                    self._peaks[key] = None
        return parts

    def peak_w(self, key: str) -> Optional[float]:
        return self._peaks.get(key) or None


#: Why an Inferentia/Trainium record has no energy: what the Neuron SDK offers is not a counter.
NEURON_ABSENT = (
    "the Neuron SDK has no energy counter: neuron-monitor reports no power or energy, and the "
    "driver's sysfs stats/power/utilization is a per-minute average as a percentage of max "
    "power, too coarse for a round and not joules"
)


def fill_energy(
    record: Any, energy_j: Sequence[Optional[float]], meter: Optional[EnergyMeter], tokens: Any
) -> list[str]:
    """Put ``energy_j`` (J per round) and ``joules_per_token`` on ``record`` from the rounds'
    deltas, and return the notes to add. Absent, never zero, without a counter; absent with a
    note when a round's delta was refused (one bad round would skew the median unseen, and a
    metric with fewer samples than rounds would hide it); why a counter is unreadable is
    said once per process (``EnergyMeter.told``) and kept in provenance on every record."""
    from .results import MetricValue

    if meter is None:
        return []
    record.provenance["energy_meter"] = meter.name
    if meter.why_absent:
        record.provenance["energy_absent"] = meter.why_absent
        if meter.told:
            return []
        meter.told = True
        return [f"no energy_j ({meter.name}): {meter.why_absent}"]
    if not energy_j:
        return []
    bad = [str(index + 1) for index, joules in enumerate(energy_j) if joules is None]
    if bad:
        return [
            f"energy counter ({meter.name}) unreadable, reset, wrapped past undoing or not "
            f"moved in round {', '.join(bad)} of {len(energy_j)}: energy_j and "
            "joules_per_token not reported"
        ]
    samples = [float(j) for j in energy_j if j is not None]
    record.metrics["energy_j"] = MetricValue.from_samples("energy_j", samples)
    if tokens:
        record.metrics["joules_per_token"] = MetricValue.from_samples(
            "joules_per_token", [j / tokens for j in samples]
        )
    return []
