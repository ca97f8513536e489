"""The memory-bound speed limit of a decode step, and how close a measurement came to it.

A decode step of a transformer reads every weight it uses and the whole KV cache once, and
does little arithmetic per byte; on one device its time cannot drop below *bytes read ÷ memory
bandwidth*. ``roofline_fraction`` is that floor divided by the measured ``tpot_s``: 1.0 means
every decode step read its bytes at the device's peak bandwidth.

Two halves, both plain code (no torch at import):

- **bandwidth** — a published peak per accelerator (:data:`PEAKS`, one source per row, matched
  on the normalized device name the backend reports), or on a CPU host a measured copy
  bandwidth (:func:`copy_bandwidth`). Unknown hardware has none, and no roofline.
- **bytes per step** — :func:`decode_bytes`: the weights a step reads (the resident weights
  without the input embedding table, which a step only looks rows up in, and without the
  experts a mixture-of-experts layer does not route to) plus the KV cache the measured steps
  attend over, per device when a workload is split over several.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .backends.base import normalize_device_name

if TYPE_CHECKING:
    from .models import ModelSpec

PUBLISHED = "published peak"
MEASURED = "measured copy"
UNKNOWN = "unknown"

#: How a multi-device workload divides a decode step (``Engine.parallelism``): ``tensor`` —
#: every device holds and reads its share of each weight and the K/V of its share of the heads,
#: for the whole batch (transformers' and DeepSpeed's tensor parallelism); ``data`` — every rank
#: gathers all weights and generates its own batch (ZeRO inference).
PARALLELISMS = ("tensor", "data")


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth of one device, and where the figure comes from."""

    bytes_per_s: float
    #: :data:`PUBLISHED` or :data:`MEASURED`.
    method: str
    #: The datasheet, or how the copy was measured.
    source: str
    #: The device name it was matched on (published) or measured on.
    device: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_per_s": self.bytes_per_s,
            "method": self.method,
            "source": self.source,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data: Any) -> Optional[Bandwidth]:
        """The bandwidth a provenance dict carries; None for an unknown one (or junk)."""
        if not isinstance(data, dict) or not isinstance(data.get("bytes_per_s"), (int, float)):
            return None
        if data["bytes_per_s"] <= 0:
            return None
        return cls(
            float(data["bytes_per_s"]),
            str(data.get("method") or PUBLISHED),
            str(data.get("source") or ""),
            str(data.get("device") or ""),
        )


def unknown(device: str) -> dict[str, Any]:
    """What provenance says for hardware without a figure: once per run, not per record."""
    return {
        "bytes_per_s": None,
        "method": UNKNOWN,
        "source": f"no published peak for {device!r} in pytest_llmperf.roofline.PEAKS: "
        "roofline_fraction not computed",
        "device": device,
    }


# -- published peaks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    #: Searched in the normalized device name (``backends.normalize_device_name``).
    pattern: str
    name: str
    bytes_per_s: float
    source: str


def _tok(text: str) -> str:
    """``text`` as whole dash-separated tokens of a normalized name: ``a10`` is not ``a100``,
    and ``gaudi`` is not ``gaudi-2`` (a lone digit after it is a generation)."""
    return rf"(?:^|-)(?:{text})(?=$|-(?!\d(?:$|-)))"


_NVIDIA_A100 = (
    "NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/"
    "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
_NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU, https://www.nvidia.com/en-us/data-center/h100/"
_GAUDI2 = "Intel Gaudi 2 white paper (habana.ai): 96 GB HBM2E, 2.45 TB/s"

#: Peak memory bandwidth of one device as the vendor publishes it (decimal units: 1 TB/s =
#: 1e12 B/s), first match wins, so the more specific form factor comes first. "One device" is
#: what the backend counts as one: a ROCm GPU is one MI250 GCD (two per module), a Neuron device
#: one Inferentia2 or Trainium chip (two NeuronCores-v2). The names are matched as torch reports
#: them ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
#: "AMD Instinct MI300X", "AMD Instinct MI250X / MI250"), normalized. A MIG slice matches its
#: GPU's row and gets its share of it (``CudaBackend.memory_bandwidth``).
PEAKS: tuple[Peak, ...] = (
    Peak("h100.*-nvl", "NVIDIA H100 NVL", 3.9e12, _NVIDIA_H100 + ": H100 NVL 3.9 TB/s"),
    Peak("h100.*-pcie", "NVIDIA H100 PCIe", 2.0e12, _NVIDIA_H100 + ": H100 PCIe 2 TB/s"),
    # The SXM5 part reports itself as "NVIDIA H100 80GB HBM3".
    Peak("h100.*-(sxm|hbm3)", "NVIDIA H100 SXM", 3.35e12, _NVIDIA_H100 + ": H100 SXM 3.35 TB/s"),
    Peak(
        _tok("h200"),
        "NVIDIA H200",
        4.8e12,
        "NVIDIA H200 Tensor Core GPU, https://www.nvidia.com/en-us/data-center/h200/: "
        "H200 SXM and H200 NVL 4.8 TB/s",
    ),
    Peak("a100-sxm\\d?-80gb", "NVIDIA A100 80GB SXM", 2.039e12, _NVIDIA_A100 + ": 2,039 GB/s"),
    Peak(
        "a100-(80gb-pcie|pcie-80gb)",
        "NVIDIA A100 80GB PCIe",
        1.935e12,
        _NVIDIA_A100 + ": 1,935 GB/s",
    ),
    Peak(
        "a100-((sxm\\d?|pcie)-)?40gb",
        "NVIDIA A100 40GB",
        1.555e12,
        _NVIDIA_A100 + ": 40GB PCIe and SXM 1,555 GB/s",
    ),
    Peak(
        _tok("l40s?"),
        "NVIDIA L40/L40S",
        864e9,
        "NVIDIA L40S GPU, https://www.nvidia.com/en-us/data-center/l40s/: 48 GB GDDR6, "
        "864 GB/s (L40 the same memory)",
    ),
    Peak(
        _tok("a10g?"),
        "NVIDIA A10/A10G",
        600e9,
        "NVIDIA A10 Tensor Core GPU, https://www.nvidia.com/en-us/data-center/products/a10-gpu/: "
        "24 GB GDDR6, 600 GB/s (A10G is AWS's variant, same memory: "
        "https://aws.amazon.com/ec2/instance-types/g5/)",
    ),
    Peak(
        _tok("l4"),
        "NVIDIA L4",
        300e9,
        "NVIDIA L4 Tensor Core GPU, https://www.nvidia.com/en-us/data-center/l4/: "
        "24 GB GDDR6, 300 GB/s",
    ),
    Peak(
        "mi325x",
        "AMD Instinct MI325X",
        6.0e12,
        "AMD Instinct MI325X, https://www.amd.com/en/products/accelerators/instinct/mi300/"
        "mi325x.html: 256 GB HBM3E, 6 TB/s",
    ),
    Peak(
        "mi300x",
        "AMD Instinct MI300X",
        5.3e12,
        "AMD Instinct MI300X, https://www.amd.com/en/products/accelerators/instinct/mi300/"
        "mi300x.html: 192 GB HBM3, 5.3 TB/s",
    ),
    Peak(
        "mi250",
        "AMD Instinct MI250/MI250X (one GCD)",
        1.6384e12,
        "AMD ROCm docs, MI250 microarchitecture, https://rocm.docs.amd.com/en/latest/"
        "conceptual/gpu-arch/mi250.html: HBM2e 1.6 TB/s per GCD (3.2768 TB/s per module of "
        "two GCDs; ROCm shows each GCD as one GPU)",
    ),
    Peak(
        "mi210",
        "AMD Instinct MI210",
        1.6384e12,
        "AMD Instinct MI210, https://www.amd.com/en/products/accelerators/instinct/mi200/"
        "mi210.html: 64 GB HBM2e, 1.6 TB/s (one GCD)",
    ),
    Peak(
        _tok("gaudi-?3|hl-3\\d\\d"),
        "Intel Gaudi 3",
        3.7e12,
        "Intel Gaudi 3 AI accelerator white paper: 128 GB HBM2E, 3.7 TB/s",
    ),
    Peak(_tok("gaudi-?2|hl-225"), "Intel Gaudi 2", 2.45e12, _GAUDI2),
    Peak(
        _tok("gaudi|hl-205"),
        "Intel Gaudi",
        1.0e12,
        "Habana Gaudi white paper (2019): 32 GB HBM2, 1 TB/s",
    ),
    Peak(
        _tok("inf2|inferentia2"),
        "AWS Inferentia2",
        820e9,
        "AWS Neuron docs, Inferentia2 architecture: 32 GB HBM per device, 820 GB/sec",
    ),
    Peak(
        _tok("trn1|trainium1?"),
        "AWS Trainium",
        820e9,
        "AWS Neuron docs, Trainium architecture: 32 GB per device, 820 GB/sec",
    ),
)


def published_peak(device_name: str) -> Optional[Bandwidth]:
    """The published peak of the device a backend reports (None: not in :data:`PEAKS`)."""
    key = normalize_device_name(device_name)
    for peak in PEAKS:
        if re.search(peak.pattern, key):
            source = f"{peak.name}: {peak.source}"
            return Bandwidth(peak.bytes_per_s, PUBLISHED, source, device_name)
    return None


# -- the CPU host: a measured copy ----------------------------------------------------------------

#: Copies of the probe: the first touches the pages (not timed), then up to this many timed ones.
PROBE_COPIES = 5
#: Timed copies stop once this much time has gone (after two): the probe runs once per pytest
#: process, before the first test that measures, and must cost well under a second.
PROBE_BUDGET_S = 0.3
PROBE_MIN_BYTES = 64 * 2**20
PROBE_MAX_BYTES = 512 * 2**20


def last_level_cache_bytes() -> Optional[int]:
    """Total size of the host's last-level caches (each shared cache counted once); None
    where sysfs does not say (not Linux)."""
    import glob

    caches: dict[tuple[str, str], int] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/shared_cpu_list") as f:
                shared = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        number = int(re.sub(r"\D", "", size) or 0) * units.get(size[-1:].upper(), 1)
        caches[(level, shared)] = number
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


def probe_bytes() -> int:
    """The probe's buffer: 4x the last-level caches, so (source and destination together 8x
    them) a copy cannot run from cache; within [64 MiB, 512 MiB] and an eighth of free memory."""
    llc = last_level_cache_bytes() or 32 * 2**20
    size = min(max(4 * llc, PROBE_MIN_BYTES), PROBE_MAX_BYTES)
    try:
        import psutil

        size = min(size, max(PROBE_MIN_BYTES // 4, psutil.virtual_memory().available // 8))
    except Exception:  # psutil missing or unreadable: keep the cache-derived size
        pass
    return int(size)


def copy_bandwidth(nbytes: Optional[int] = None, device: str = "") -> Bandwidth:
    """The host's memory bandwidth measured as torch copies one buffer into another.

    Counted as STREAM counts a copy: bytes read plus bytes written, 2 x size per copy. The best
    copy is the figure, as STREAM reports its best trial: the roofline is a speed limit, so its
    estimate is the highest rate the machine demonstrably reached; a median would fold in the
    copies another process slowed down, lower the limit and inflate roofline_fraction.
    torch's copy runs on all its threads, as the model's kernels do.
    """
    import torch

    size = nbytes or probe_bytes()
    src = torch.ones(size // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # maps dst's pages: first-touch faults are not bandwidth
    best, copies = 0.0, 0
    start = time.perf_counter()
    while copies < PROBE_COPIES:
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        copies += 1
        if t1 > t0:
            best = max(best, 2 * src.numel() * 4 / (t1 - t0))
        if copies >= 2 and t1 - start > PROBE_BUDGET_S:
            break
    del src, dst
    source = (
        f"torch copy of {size / 2**20:.0f} MiB on {torch.get_num_threads()} threads, best of "
        f"{copies} (bytes read + written)"
    )
    return Bandwidth(best, MEASURED, source, device)


# -- bytes per decode step ------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one device reads from memory in one decode step, averaged over the steps
    ``tpot_s`` measures."""

    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def storage_bytes(dtype: str) -> int:
    """Bytes per value of what quantizers leave alone (embeddings, the KV cache): 4 in fp32,
    else 2 (bitsandbytes keeps them in 16 bit, as ``generation_runtime_bytes`` counts them)."""
    return 4 if dtype == "fp32" else 2


def linear_bytes_per_param(dtype: str) -> float:
    """Bytes per weight of a quantizable Linear layer (bitsandbytes int4 adds one fp32 absmax
    per block of 64, as ``ModelSpec.weight_bytes`` counts it)."""
    return {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 64}[dtype]


def active_experts(experts: int, per_token: int, batch_size: int) -> float:
    """Expected experts of one MoE layer that a step's ``batch_size`` tokens route to, if each
    token picks ``per_token`` of ``experts`` uniformly (a trained router is less even, so
    fewer are read and the fraction comes out a little high)."""
    return experts * (1 - (1 - per_token / experts) ** batch_size)


def unread_weight_bytes(model: ModelSpec, dtype: str, batch_size: int) -> float:
    """Resident weight bytes a decode step does not read.

    - the input embedding table, when the LM head does not share it: a step looks up one row
      per sequence (GPT-2's learned position table likewise). Tied, the head reads it whole.
    - a mixture of experts (the catalog's ``mixtral`` family): the experts no token of the
      step routes to (:func:`active_experts`). Other MoE architectures from disk are counted
      whole (every expert read), which makes their fraction too high.
    """
    shape = model.shape()
    table = storage_bytes(dtype)
    unread = 0.0
    if not shape.tie_word_embeddings:
        unread += shape.vocab_size * shape.hidden_size * table
    if model.family == "gpt2":
        unread += (shape.max_positions or 0) * shape.hidden_size * table
    if model.family == "mixtral":
        cfg = model.config_dict()
        experts = int(cfg.get("num_local_experts", 8))
        per_token = int(cfg.get("num_experts_per_tok", 2))
        expert_params = shape.num_layers * experts * 3 * shape.hidden_size * shape.intermediate_size
        idle = 1 - active_experts(experts, per_token, batch_size) / experts
        unread += expert_params * idle * linear_bytes_per_param(dtype)
    return unread


def kv_cache_bytes(
    *,
    num_layers: int,
    kv_heads: float,
    head_dim: int,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    value_bytes: int,
) -> float:
    """K and V of every earlier position, read once by a decode step's attention, averaged
    over the steps tpot measures: the step making new token j (2 ≤ j ≤ new_tokens) attends
    over prompt + j − 1 positions, prompt + 1 … prompt + new_tokens − 1, so prompt +
    new_tokens/2 on average."""
    mean_context = prompt_tokens + new_tokens / 2
    return 2 * num_layers * kv_heads * head_dim * mean_context * batch_size * value_bytes


def decode_bytes(
    model: ModelSpec,
    *,
    dtype: str,
    resident_weight_bytes: float,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    devices: int = 1,
    parallelism: str = "tensor",
) -> DecodeBytes:
    """Bytes one device reads per decode step of a greedy generation.

    ``resident_weight_bytes`` is what the engine placed on the devices, all of them together
    (``LoadedModel.weight_bytes``; quantized engines report their packed size). With several
    devices (:data:`PARALLELISMS`): tensor parallelism gives each device 1/devices of the
    weights it reads and of the KV heads (at least one: a head is not split), data parallelism
    has every rank read all weights (gathered) and its own batch's KV cache.
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism={parallelism!r}: expected one of {', '.join(PARALLELISMS)}")
    shape = model.shape()
    weights = max(0.0, resident_weight_bytes - unread_weight_bytes(model, dtype, batch_size))
    kv_heads: float = shape.num_kv_heads
    if devices > 1 and parallelism == "tensor":
        weights /= devices
        kv_heads = math.ceil(shape.num_kv_heads / devices)
    kv = kv_cache_bytes(
        num_layers=shape.num_layers,
        kv_heads=kv_heads,
        head_dim=shape.head_dim,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        value_bytes=storage_bytes(dtype),
    )
    return DecodeBytes(weights, kv)


def fraction(step_bytes: float, bandwidth_bytes_per_s: float, tpot_s: float) -> float:
    """(bytes per step ÷ bandwidth) ÷ tpot: the share of the memory-bound limit reached."""
    return step_bytes / bandwidth_bytes_per_s / tpot_s
