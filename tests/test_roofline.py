"""roofline_fraction: the bytes a decode step must read, the bandwidth it is read at, and how
the two reach a record (published peaks, a CPU host's measured copy, provenance carried to
children), checked against numbers worked out by hand from the shipped configs."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from fakes import DECODE_S, FakeBackend, FakeEngine
from helpers import FAKE, GENERATE, read_results, record_of

from pytest_llmperf import engines, models, provenance, roofline
from pytest_llmperf.backends import cpu
from pytest_llmperf.engines.base import LoadedModel, Prompt
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.launchers import LaunchSettings
from pytest_llmperf.launchers.process import ProcessLauncher
from pytest_llmperf.measure import Timing
from pytest_llmperf.results import Record
from pytest_llmperf.scenarios.generate import fill_roofline
from pytest_llmperf.spec import RecordContext, WorkloadSpec

# -- bytes per decode step, by hand --------------------------------------------------------------
#
# tiny-llama (configs/tiny-llama.json): hidden 64, 2 layers, 4 heads of 16, 2 KV heads (GQA),
# intermediate 176, vocabulary 1024, embeddings not tied.
#   parameters: embed + head 2 x 1024 x 64 = 131,072; per layer attention 64x64 + 2x64x32 +
#   64x64 = 12,288 and MLP 3x64x176 = 33,792, so 2 x 46,080 = 92,160; norms 2x2x64 + 64 = 320
#   -> 223,552 parameters, 447,104 bytes in bf16.
#   A step reads all but the input table (1024 x 64 x 2 B = 131,072 B): 316,032 B.
#   KV cache, prompt 7 + 100 new tokens: the measured steps attend over 8 ... 106 positions,
#   7 + 100/2 = 57 on average: 2 (K,V) x 2 layers x 2 heads x 16 x 57 x 1 row x 2 B = 14,592 B.
TINY_LLAMA_BF16 = 447_104
TINY_LLAMA_STEP_WEIGHTS = 316_032
TINY_LLAMA_STEP_KV = 14_592


def step(model: str, dtype: str = "bf16", **kwargs):
    spec = models.get(model)
    kwargs.setdefault("resident_weight_bytes", spec.weight_bytes(dtype))
    kwargs.setdefault("batch_size", 1)
    kwargs.setdefault("prompt_tokens", 7)
    kwargs.setdefault("new_tokens", 100)
    return roofline.decode_bytes(spec, dtype=dtype, **kwargs)


def test_a_decode_step_reads_the_weights_but_the_input_table_and_the_kv_cache_so_far():
    assert models.get("tiny-llama").weight_bytes("bf16") == TINY_LLAMA_BF16
    got = step("tiny-llama")
    assert got.weights == TINY_LLAMA_STEP_WEIGHTS
    assert got.kv_cache == TINY_LLAMA_STEP_KV
    assert got.total == 330_624


def test_a_tied_head_reads_the_whole_table_and_gpt2_never_reads_its_position_table():
    # tiny-bloom ties its head: nothing resident is left unread. Parameters: 1024x64 table;
    # per layer QKV 3x64x64, dense 64x64, MLP 2x64x256 = 49,152 (x2); biases 576 (x2); norms
    # 768 -> 165,760, 331,520 B in bf16. KV: 4 heads (no GQA) of 16: 2x2x4x16x57x2 = 29,184 B.
    bloom = step("tiny-bloom")
    assert (bloom.weights, bloom.kv_cache) == (331_520, 29_184)
    # tiny-gpt2 ties too, but its 1024 learned positions x 64 are looked up, not read whole.
    gpt2 = step("tiny-gpt2")
    assert gpt2.weights == models.get("tiny-gpt2").weight_bytes("bf16") - 1024 * 64 * 2


@pytest.mark.parametrize("model, kv_heads", [("llama-3.1-8b", 8), ("mistral-7b", 8)])
def test_grouped_query_attention_reads_only_the_kv_heads(model, kv_heads):
    # 32 layers of 128-wide heads: 2 x 32 x 8 x 128 x 2 B = 128 KiB per token and row (GQA),
    # a quarter of llama-2-7b's 32 KV heads.
    kv = step(model, batch_size=4, prompt_tokens=1000, new_tokens=200).kv_cache
    assert kv == 131_072 * (1000 + 100) * 4 == 576_716_800
    assert models.get(model).shape().num_kv_heads == kv_heads
    mha = step("llama-2-7b", batch_size=4, prompt_tokens=1000, new_tokens=200).kv_cache
    assert mha == 4 * kv


def test_quantized_weights_are_read_packed_and_the_kv_cache_stays_16_bit():
    # int8: the Linear layers 1 B per weight (92,160 B), embeddings and norms 16 bit
    # (131,392 x 2 B); the step skips the input table (131,072 B) and reads the KV in fp16.
    got = step("tiny-llama", "int8")
    assert got.weights == 92_160 + 131_392 * 2 - 131_072
    assert got.kv_cache == TINY_LLAMA_STEP_KV
    assert step("tiny-llama", "fp32").kv_cache == 2 * TINY_LLAMA_STEP_KV


def test_several_devices_split_weights_and_kv_heads_or_each_rank_reads_all():
    two = step("tiny-llama", devices=2)
    assert (two.weights, two.kv_cache) == (TINY_LLAMA_STEP_WEIGHTS / 2, TINY_LLAMA_STEP_KV / 2)
    # 2 KV heads over 4 devices: a head is not split, each device keeps one.
    four = step("tiny-llama", devices=4)
    assert (four.weights, four.kv_cache) == (TINY_LLAMA_STEP_WEIGHTS / 4, TINY_LLAMA_STEP_KV / 2)
    # ZeRO: every rank gathers all weights and runs its own batch.
    data = step("tiny-llama", devices=2, parallelism="data")
    assert (data.weights, data.kv_cache) == (TINY_LLAMA_STEP_WEIGHTS, TINY_LLAMA_STEP_KV)


def test_a_mixture_of_experts_step_reads_the_experts_its_tokens_route_to():
    # mixtral-8x7b: 46,702,792,704 parameters, of which experts 32 x 8 x 3 x 4096 x 14336 =
    # 45,097,156,608. One token routes to 2 of 8: 6/8 of the experts (33,822,867,456) and the
    # input table (32000 x 4096 = 131,072,000) are not read: 12,748,853,248 parameters, Mistral's
    # "12.9B active" without the table lookup.
    assert models.get("mixtral-8x7b").param_count() == 46_702_792_704
    assert step("mixtral-8x7b").weights == 12_748_853_248 * 2
    # 8 rows: each expert idle with (3/4)^8 = 0.1001129150390625, so ~7.2 of 8 are read.
    eight = step("mixtral-8x7b", batch_size=8).weights
    idle = 45_097_156_608 * 0.75**8
    assert eight == pytest.approx((46_702_792_704 - idle - 131_072_000) * 2, rel=1e-12)
    assert roofline.active_experts(8, 2, 1) == 2


def test_the_fraction_is_the_floor_over_the_measured_step():
    # 1 GB per step at 2 TB/s takes at least 0.5 ms: a 1 ms step reached half the limit.
    assert roofline.fraction(1e9, 2e12, 1e-3) == 0.5


def test_an_unknown_parallelism_is_refused():
    with pytest.raises(ValueError, match="parallelism='pipeline': expected one of tensor, data"):
        step("tiny-llama", devices=2, parallelism="pipeline")


# -- published peaks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reported, gb_per_s",
    [
        ("NVIDIA A10G", 600),
        ("NVIDIA L4", 300),
        ("NVIDIA A100-SXM4-40GB", 1555),
        ("NVIDIA A100-PCIE-40GB", 1555),
        ("NVIDIA A100-SXM4-80GB", 2039),
        ("NVIDIA A100 80GB PCIe", 1935),
        ("NVIDIA H100 80GB HBM3", 3350),  # how the SXM5 part names itself
        ("NVIDIA H100 PCIe", 2000),
        ("NVIDIA H100 NVL", 3900),
        ("NVIDIA H200", 4800),
        ("AMD Instinct MI250X / MI250", 1638.4),  # one GCD, as ROCm counts devices
        ("AMD Instinct MI300X", 5300),
        ("AMD Instinct MI325X", 6000),
        ("AMD Instinct MI210", 1638.4),
        ("NVIDIA L40S", 864),
        ("NVIDIA L40", 864),
        ("NVIDIA H200 NVL", 4800),
        ("GAUDI", 1000),
        ("GAUDI2", 2450),
        ("GAUDI3", 3700),
        ("inf2", 820),  # what the Neuron backend reports
        ("trn1", 820),
    ],
)
def test_a_known_accelerator_gets_its_published_peak(reported, gb_per_s):
    found = roofline.published_peak(reported)
    assert found is not None
    assert found.bytes_per_s == pytest.approx(gb_per_s * 1e9)
    assert found.method == "published peak" and found.device == reported


@pytest.mark.parametrize(
    "reported",
    ["NVIDIA A100", "NVIDIA RTX A6000", "NVIDIA GeForce RTX 4090", "Trainium2", "Fake Chip"],
)
def test_an_unknown_or_ambiguous_device_has_no_peak(reported):
    # "NVIDIA A100" alone could be 1,555 or 2,039 GB/s: better no roofline than a wrong one.
    assert roofline.published_peak(reported) is None


def test_every_row_of_the_table_names_its_source():
    assert all(peak.source and peak.bytes_per_s > 0 for peak in roofline.PEAKS)
    gpus = [p for p in roofline.PEAKS if p.name.startswith(("NVIDIA", "AMD"))]
    assert gpus and all("https://" in peak.source for peak in gpus)


# -- the CPU host: measured once, carried to children -------------------------------------------


def test_the_copy_probe_measures_a_bandwidth_and_says_how():
    found = roofline.copy_bandwidth(8 * 2**20, device="test host")
    assert found.bytes_per_s > 0 and found.method == "measured copy"
    assert found.source.startswith("torch copy of 8 MiB") and "best of" in found.source


def test_the_host_is_probed_once_per_process_and_provenance_records_how(monkeypatch, tmp_path):
    calls = []

    def probe(nbytes=None, device=""):
        calls.append(device)
        return roofline.Bandwidth(12.5e9, roofline.MEASURED, "fake copy", device)

    monkeypatch.setattr(roofline, "copy_bandwidth", probe)
    monkeypatch.setattr(cpu, "_measured", None)
    host = cpu.CpuBackend()
    first = provenance.collect(host, tmp_path)["memory_bandwidth"]
    second = provenance.collect(cpu.CpuBackend(), tmp_path)["memory_bandwidth"]
    assert len(calls) == 1
    assert (
        first
        == second
        == {
            "bytes_per_s": 12.5e9,
            "method": "measured copy",
            "source": "fake copy",
            "device": host.device_name(),
        }
    )


def test_provenance_says_once_when_a_device_has_no_known_bandwidth(tmp_path):
    found = provenance.collect(FakeBackend(), tmp_path)["memory_bandwidth"]
    assert found["bytes_per_s"] is None and found["method"] == "unknown"
    assert "no published peak for 'Fake Chip'" in found["source"]


SPEC = WorkloadSpec(
    kind="generate",
    model="tiny-llama",
    engine="fake-engine",
    dtype="bf16",
    new_tokens=100,
    rounds=5,
)


def context_with(bandwidth: float) -> RecordContext:
    given = roofline.Bandwidth(bandwidth, roofline.PUBLISHED, "the parent's figure")
    return RecordContext(
        key="test_gen",
        suite="test_s",
        device_key="fake-chip",
        provenance={"memory_bandwidth": given.to_json()},
    )


# 330,624 B per step (tiny-llama above) read in one fake decode step of 1/128 s reaches
# half the limit at 2 x 128 x 330,624 B/s.
HALF = 2 * 128 * 330_624


@pytest.fixture
def fake(monkeypatch) -> FakeBackend:
    monkeypatch.delenv("FAKE_BANDWIDTH", raising=False)
    engines.register(FakeEngine())
    return FakeBackend()


def test_a_record_takes_the_bandwidth_its_run_recorded_not_the_backends_own(fake):
    record = execute(SPEC, context_with(HALF), fake, ModelCache())
    assert record.metrics["roofline_fraction"].samples == [0.5] * 5
    assert fake.bandwidth_asked == 0


@pytest.fixture
def children(project, monkeypatch):
    """Worker children import the fake chip from the pytester project's conftest."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(project.path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "conftest")
    return project


def test_a_worker_child_uses_the_figure_sent_with_the_request(children, fake):
    """The child's own fake chip knows no bandwidth (FAKE_BANDWIDTH unset): the roofline can
    only come from the parent's provenance, sent with the request."""
    launcher = ProcessLauncher(LaunchSettings(timeout=120))
    try:
        record = launcher.run(SPEC, context_with(HALF), fake)
    finally:
        launcher.close()
    assert record.outcome == "ok", record.note
    assert record.value("roofline_fraction") == 0.5


def test_without_provenance_the_backend_is_asked(fake, monkeypatch):
    monkeypatch.setenv("FAKE_BANDWIDTH", str(HALF))
    plain = RecordContext(key="test_gen", suite="test_s", device_key="fake-chip")
    record = execute(SPEC, plain, fake, ModelCache())
    assert record.value("roofline_fraction") == 0.5 and fake.bandwidth_asked == 1


def fill(fake: FakeBackend, *, resident: int, devices: int = 1, context=None) -> Record:
    spec = replace(SPEC, devices=devices)
    record = (context or context_with(HALF)).new_record(spec, "fake")
    loaded = LoadedModel(None, None, False, "seed", resident, 0.5, "bf16", devices)
    timing = Timing(warmup_s=0.0, e2e=[1.0], tpot=[DECODE_S])
    fill_roofline(record, timing, Prompt(None, None, 7), loaded, spec, fake)
    return record


def test_an_offloaded_model_gets_no_roofline_and_a_note_why(fake):
    record = fill(fake, resident=TINY_LLAMA_BF16 // 2)
    assert "roofline_fraction" not in record.metrics
    assert record.note == (
        "roofline_fraction not computed: 50% of the weights are on the device, the rest "
        "offloaded, so decode steps are not bound by the device's memory bandwidth"
    )


def test_ranks_on_one_hosts_memory_share_its_bandwidth(fake, monkeypatch):
    # Two tensor-parallel ranks each read half the step (165,312 B) in 1/128 s.
    assert fill(fake, resident=TINY_LLAMA_BF16, devices=2).value("roofline_fraction") == 0.25
    monkeypatch.setattr(FakeBackend, "shared_memory", True)
    # ... but on CPU cores both halves come through one memory: each gets half of it.
    assert fill(fake, resident=TINY_LLAMA_BF16, devices=2).value("roofline_fraction") == 0.5


# -- what a user sees -----------------------------------------------------------------------------


def test_the_table_shows_the_roofline_beside_tpot_and_the_summary_judges_it(project, monkeypatch):
    # tiny-bloom, seed prompt of 7 tokens: 360,704 B per step (see the tied-head test).
    monkeypatch.setenv("FAKE_BANDWIDTH", str(2 * 128 * 360_704))
    project.makepyfile(test_gen=GENERATE)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    result = project.runpytest(FAKE, "--llmperf-report=r")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [
            r"test\s+backend\s+outcome\s+median\s+tpot\s+tokens/s\s+roofline\s+peak mem\s+verdict$",
            rf"test_gen\s+fake\s+ok\s+\S+ ms\s+{DECODE_S * 1000:.2f} ms\s+\S+\s+0\.50\s+.*pass$",
        ]
    )
    record = record_of(read_results(project.path / "r"), "test_gen")
    assert record["metrics"]["roofline_fraction"]["median"] == 0.5
    assert record["provenance"]["memory_bandwidth"]["source"] == "fake datasheet"
    summary = (project.path / "r" / "summary.md").read_text()
    assert "| `test_gen` | roofline_fraction | 0.5 | 0.5 | ×1.000 | pass |" in summary
