"""AWS Inferentia2 / Trainium (inf2, trn1, trn2) through the Neuron SDK.

What runs here is optimum-neuron's ahead-of-time compiled graphs (engine ``optimum-neuron``),
and what that implies for each question a backend answers:

- **devices** are NeuronCores, the unit optimum-neuron's ``tensor_parallel_size`` counts (its
  ``get_available_cores``): two per Inferentia2 / Trainium chip, four logical cores (LNC=2) per
  Trainium2 chip, limited by ``NEURON_RT_VISIBLE_CORES`` / ``NEURON_RT_NUM_CORES``. So
  ``devices=2`` on an inf2.xlarge is its one chip, and ``num_cores`` of the compile is
  ``devices``.
- **synchronize** waits for nothing: a compiled model's call blocks until the NeuronCores are
  done and returns host tensors, so nothing is queued when the clock is read. There are no
  device events either; per-token stamps are the host clock after each forward, which is
  already after completion.
- **memory**: the Neuron runtime has no allocator statistics that torch can read (the peak
  lives in ``neuron-monitor``'s once-a-second JSON stream, not per round), so the peak is
  None. What a workload may use is the chip's published HBM per NeuronCore: free memory is
  not queryable, and the device is ours while we measure.
- **torch_device** is ``cpu``: optimum-neuron's models take and return host tensors; moving
  inputs to an XLA device first would add a transfer to every timed call.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from .base import Backend, Probe, device_nodes, installed_versions

if TYPE_CHECKING:
    from ..energy import EnergyMeter
    from ..roofline import Bandwidth

#: Where the instance type is read from (no IMDS call: that needs the network and may hang).
PRODUCT_NAME_FILE = "/sys/devices/virtual/dmi/id/product_name"
#: The Neuron driver's version (the aws-neuronx-dkms kernel module).
DRIVER_VERSION_FILE = "/sys/module/neuron/version"
#: Debian/Ubuntu's package database: the runtime library is a system package, not a pip dist.
DPKG_STATUS_FILE = "/var/lib/dpkg/status"

#: Where the SDK comes from; PyPI's ``torch-neuronx`` 1.0 is AWS's placeholder that raises.
NEURON_PIP_REPO = "https://pip.repos.neuron.amazonaws.com"

#: Instance family (``inf2.xlarge`` → ``inf2``) → the chip generation in the device key.
#: trn1n is trn1's chip with more network; trn2u is trn2's UltraServer node.
FAMILIES = {"inf2": "inf2", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2", "trn2u": "trn2"}


class Chip:
    """What is published about one chip generation (per chip, not per NeuronCore)."""

    def __init__(self, cores: int, hbm_bytes: int, bandwidth: float, source: str) -> None:
        self.cores = cores
        self.hbm_bytes = hbm_bytes
        self.bandwidth = bandwidth
        self.source = source


_ARCH = "AWS Neuron documentation, Neuron architecture"
CHIPS = {
    "inf2": Chip(2, 32 * 10**9, 820e9, f"{_ARCH}, Inferentia2: 32 GB HBM, 820 GB/s per chip"),
    "trn1": Chip(2, 32 * 10**9, 820e9, f"{_ARCH}, Trainium: 32 GB HBM, 820 GB/s per chip"),
    # Eight physical cores that the runtime pairs into four logical ones (LNC=2), which is
    # what optimum-neuron compiles for.
    "trn2": Chip(4, 96 * 2**30, 2.9e12, f"{_ARCH}, Trainium2: 96 GiB HBM, 2.9 TB/s per chip"),
}


def read_first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def instance_family(product_name: str) -> Optional[str]:
    """The chip generation of an EC2 instance type (``trn1n.32xlarge`` → ``trn1``); None for
    anything else, which must not be guessed: two chips under one key would mix baselines."""
    return FAMILIES.get(product_name.split(".")[0].strip().lower())


def visible_cores(total: int, environ: Optional[dict[str, str]] = None) -> int:
    """NeuronCores this process may use: ``total`` as limited by the runtime's variables
    (``NEURON_RT_VISIBLE_CORES``: ``"3"``, ``"0-3"``, ``"0,2,4-5"``; ``NEURON_RT_NUM_CORES``)."""
    env = os.environ if environ is None else environ
    count = total
    visible = env.get("NEURON_RT_VISIBLE_CORES", "").strip()
    if visible:
        cores: set[int] = set()
        for part in visible.split(","):
            low, _, high = part.strip().partition("-")
            if low.isdigit() and (not high or high.isdigit()):
                cores.update(range(int(low), int(high or low) + 1))
        count = min(count, len(cores))
    number = env.get("NEURON_RT_NUM_CORES", "").strip()
    if number.isdigit():
        count = min(count, int(number))
    return count


def dpkg_versions(*packages: str, status_file: str = DPKG_STATUS_FILE) -> dict[str, str]:
    """Versions of installed system packages from dpkg's database (no subprocess)."""
    try:
        text = Path(status_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out = {}
    for block in text.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", block, re.MULTILINE))
        name = fields.get("Package")
        if name in packages and "installed" in fields.get("Status", "installed"):
            out[name] = fields.get("Version", "?")
    return out


class NeuronBackend(Backend):
    name: ClassVar[str] = "neuron"
    torch_device: ClassVar[str] = "cpu"
    engines: ClassVar[Optional[tuple[str, ...]]] = ("optimum-neuron",)
    #: optimum-neuron's decoders compile fp32, fp16 and bf16; the encoders auto-cast to them.
    dtypes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")
    visible_devices_env: ClassVar[str] = "NEURON_RT_VISIBLE_CORES"
    env_vars: ClassVar[tuple[str, ...]] = (
        "NEURON_CC_FLAGS",
        "NEURON_RT_NUM_CORES",
        "NEURON_RT_VISIBLE_CORES",
        "NEURON_LOGICAL_NC_CONFIG",
        "NEURON_COMPILE_CACHE_URL",
        "NEURON_PLATFORM_TARGET_OVERRIDE",
        "OMP_NUM_THREADS",
    )

    #: Files read for the instance type and versions; tests point them at fakes.
    product_name_file: str = PRODUCT_NAME_FILE
    driver_version_file: str = DRIVER_VERSION_FILE
    dpkg_status_file: str = DPKG_STATUS_FILE

    def _probe_impl(self) -> Probe:
        nodes = device_nodes(r"neuron\d+")
        if not nodes:
            return Probe(False, "no Neuron device nodes (/dev/neuron*)")
        try:
            import torch_neuronx  # noqa: F401
        except ImportError as exc:
            return Probe(False, self._import_reason(exc))
        return Probe(True, "", visible_cores(len(nodes) * self._chip_cores()))

    @staticmethod
    def _import_reason(exc: ImportError) -> str:
        """The one-line skip reason for a torch_neuronx that does not import: PyPI's 1.0
        placeholder says only "WRONG PACKAGE", which reads as our bug unless explained."""
        install = f"pip install --extra-index-url {NEURON_PIP_REPO} torch-neuronx"
        text = (str(exc).strip().splitlines() or [""])[0]
        if "WRONG PACKAGE" in text or installed_versions("torch-neuronx").get("torch-neuronx") == (
            "1.0"
        ):
            return (
                "torch-neuronx 1.0 from PyPI is AWS's placeholder (it raises 'WRONG PACKAGE'); "
                f"install the Neuron SDK's build: {install}"
            )
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_neuronx":
            return f"torch_neuronx is not installed ({install})"
        return f"torch_neuronx does not import: {type(exc).__name__}: {text}"[:200]

    # -- what the hardware is ------------------------------------------------------------
    def product_name(self) -> str:
        """The EC2 instance type (``inf2.24xlarge``), from DMI: empty where unreadable."""
        return read_first_line(self.product_name_file)

    def device_name(self) -> str:
        """``inf2``, ``trn1`` or ``trn2``; ``unknown`` (and a note in ``device_info``) when
        the instance type is not a Neuron one we know, rather than a guess."""
        return instance_family(self.product_name()) or "unknown"

    def _chip(self) -> Optional[Chip]:
        return CHIPS.get(self.device_name())

    def _chip_cores(self) -> int:
        chip = self._chip()
        if chip is None:
            return 2  # inf2 and trn1 have two; device_info says the count is a guess
        if chip is CHIPS["trn2"] and os.environ.get("NEURON_LOGICAL_NC_CONFIG") == "1":
            return 8  # the runtime exposes the physical cores
        return chip.cores

    def device_info(self) -> dict[str, Any]:
        info = super().device_info()
        product = self.product_name()
        info["instance_type"] = product or None
        info["unit"] = "NeuronCore"
        if self._chip() is None:
            info["note"] = (
                f"instance type {product or '(unreadable: ' + self.product_name_file + ')'} is "
                "not inf2/trn1/trn2: device key neuron-unknown, NeuronCores counted as 2 per "
                "Neuron device"
            )
        return info

    def versions(self) -> dict[str, str]:
        out = installed_versions(
            "neuronx-cc",
            "torch-neuronx",
            "libneuronxla",
            "neuronx-distributed",
            "neuronx-distributed-inference",
            "optimum-neuron",
            "transformers-neuronx",
        )
        out.update(
            dpkg_versions(
                "aws-neuronx-runtime-lib",
                "aws-neuronx-dkms",
                "aws-neuronx-collectives",
                status_file=self.dpkg_status_file,
            )
        )
        driver = read_first_line(self.driver_version_file)
        if driver:
            out["neuron-driver"] = driver
        return out

    # -- timing --------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Nothing to wait for: a compiled Neuron model's call returns after the cores finish
        (its outputs are host tensors), so no work is in flight at a clock read."""

    _energy: Optional[EnergyMeter] = None

    def energy_meter(self) -> Optional[EnergyMeter]:
        """None to read: the Neuron SDK offers power as per-minute percentages, no energy
        counter (``energy.NEURON_ABSENT``), and sampled power is not a counter; a meter that
        says so, so the record tells why it has no energy_j."""
        from ..energy import NEURON_ABSENT, AbsentMeter

        if self._energy is None:
            self._energy = AbsentMeter("neuron-monitor", NEURON_ABSENT)
        return self._energy

    # -- memory --------------------------------------------------------------------------
    def available_memory_bytes(self) -> Optional[int]:
        """The chip's published HBM per NeuronCore (free memory is not queryable without the
        runtime's monitor); None on an instance type we do not know."""
        chip = self._chip()
        return None if chip is None else chip.hbm_bytes // chip.cores

    def memory_bandwidth(self) -> Optional[Bandwidth]:
        """The published bandwidth per NeuronCore (a device here is a core): the chip's figure
        divided by its cores, as a tensor-parallel share of the weights is read from its
        core's share of HBM."""
        from ..roofline import PUBLISHED, Bandwidth

        chip = self._chip()
        if chip is None:
            return None
        source = f"{chip.source}, ÷ {chip.cores} NeuronCores"
        return Bandwidth(chip.bandwidth / chip.cores, PUBLISHED, source, self.device_name())
