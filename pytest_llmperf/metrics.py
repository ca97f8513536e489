"""The metric vocabulary: names, units and which direction is better.

Every number the plugin prints, stores or gates is named here, so the README, the baseline
files and the verdict agree on units and direction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lower_is_better: bool
    description: str

    @property
    def direction(self) -> str:
        return "lower" if self.lower_is_better else "higher"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("e2e_latency_s", "s", True, "one generate call, device sync to device sync"),
        Metric("ttft_s", "s", True, "start of the call to the first new token (prefill)"),
        Metric("tpot_s", "s", True, "mean time per new token after the first"),
        Metric(
            "ms_per_token",
            "ms",
            True,
            "e2e / (batch_size × new_tokens) × 1000 (a dataset pass: over prompts × new_tokens)",
        ),
        Metric(
            "tokens_per_s",
            "tokens/s",
            False,
            "batch_size × new_tokens / e2e (a dataset pass: prompts × new_tokens / its time)",
        ),
        Metric("load_time_s", "s", True, "building or loading the model until it is ready"),
        Metric(
            "import_s",
            "s",
            True,
            "importing the engine's libraries before a load (llmperf.load), apart from it",
        ),
        Metric(
            "page_cached_fraction",
            "1",
            True,
            "share of the checkpoint's pages in the OS page cache as the load starts (0 cold)",
        ),
        Metric(
            "compile_s",
            "s",
            True,
            "ahead-of-time compile before the load (optimum-neuron export), when not cached",
        ),
        Metric("warmup_s", "s", True, "wall time of all warm-up calls (compile included)"),
        Metric(
            "peak_memory_bytes",
            "B",
            True,
            "device peak during the rounds; on CPU the RSS increase over the rounds' start",
        ),
        Metric(
            "roofline_fraction",
            "1",
            False,
            "(bytes a decode step reads per device: weights + KV cache ÷ memory bandwidth) ÷ "
            "tpot; 1.0 = every step at peak bandwidth",
        ),
        Metric("time_s", "s", True, "one call of a function timed with llmperf.measure"),
        Metric(
            "latency_p50_s",
            "s",
            True,
            "median of the rounds of llmperf.forward (one forward pass each), sync to sync",
        ),
        Metric(
            "latency_p95_s",
            "s",
            True,
            "95th percentile of llmperf.forward's rounds (linear interpolation, reference 004)",
        ),
        Metric("latency_p99_s", "s", True, "99th percentile of llmperf.forward's rounds"),
        Metric(
            "dataset_time_s",
            "s",
            True,
            "one pass over every prompt of llmperf.generate_dataset, sync to sync",
        ),
        Metric(
            "batch_latency_s",
            "s",
            True,
            "one full batch's generate call within a dataset pass (llmperf.generate_dataset)",
        ),
        Metric(
            "energy_j",
            "J",
            True,
            "one round's energy from the hardware's counter (NVML, HLML, RAPL packages), "
            "sync to sync; absent where there is none",
        ),
        Metric(
            "joules_per_token",
            "J/token",
            True,
            "energy_j / (batch_size × new_tokens) (a dataset pass: over prompts × new_tokens)",
        ),
    )
}

# Gated unless a test names its own list with llmperf(gate=[...]). The outcome (OOM) is
# always gated; output digests only under --llmperf-check-outputs.
DEFAULT_GATED = ("e2e_latency_s", "time_s", "dataset_time_s", "peak_memory_bytes")
#: What a record of llmperf.load is gated on unless its test names a list: its load time too,
#: since loading is what it measures (a generate record's single load stays ungated).
LOAD_GATED = (*DEFAULT_GATED, "load_time_s")
#: What a record of llmperf.forward is gated on unless its test names a list: the p95 latency
#: reference 004 reports (a single value per run: the verdict compares it with the stored runs'
#: p95s, the tolerance deciding while there is only one) and the memory.
FORWARD_GATED = ("latency_p95_s", "peak_memory_bytes")


#: A workload's headline timing, in order of preference: generate's e2e latency, else the p95
#: latency of llmperf.forward, else the time per call of llmperf.measure, else a dataset pass
#: of llmperf.generate_dataset, else the load time of llmperf.load. Tables, confirmation and
#: `baselines show` lead with it.
MAIN_METRICS = ("e2e_latency_s", "latency_p95_s", "time_s", "dataset_time_s", "load_time_s")
#: A headline that is one value computed from the rounds (a percentile), and the metric that
#: holds those rounds' samples (what --benchmark-json's statistics are made of).
ROUNDS_OF = {"latency_p95_s": "latency_p50_s"}


def main_metric(names: Iterable[str]) -> str:
    """The headline metric among ``names`` (``time_s`` when none is there).

    ``load_time_s`` leads only a load record (it alone has ``import_s``): a generate record
    that ran out of memory keeps the load time of its one load, which is not its headline.
    """
    present = set(names)
    if "import_s" not in present:
        present.discard("load_time_s")
    return next((n for n in MAIN_METRICS if n in present), "time_s")


def metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None
