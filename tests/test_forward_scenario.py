"""llmperf.forward: one forward pass per round of an encoder (reference 004: p95 latency of
BERT, RoBERTa, DistilBERT, ALBERT and ViT over sequence lengths 8 … 512), its percentiles,
its record, the usage errors it owes before anything loads, the encoders in the catalog, and
the suite that keeps them apart from the generation suites.

The record tests run on the fake chip, whose clock moves only by what the fake engine does; the
catalog tests count parameters on the meta device; one test runs tiny-bert for real in a child
process on this CPU.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes import COMPILE_S, FORWARD_S, FakeBackend, FakeEngine
from helpers import FAKE, baseline_file

from pytest_llmperf import backends, engines, models
from pytest_llmperf.errors import UsageError
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.launchers import Launchers, LaunchSettings
from pytest_llmperf.metrics import FORWARD_GATED, main_metric
from pytest_llmperf.models.catalog import ModelSpec, infer_task
from pytest_llmperf.models.registry import task_hint
from pytest_llmperf.runner import FORWARD_ROUNDS, FORWARD_WARMUP, LLMPerf
from pytest_llmperf.runner import TestContext as Context
from pytest_llmperf.scenarios.forward import percentile
from pytest_llmperf.spec import RecordContext, WorkloadSpec

CONTEXT = RecordContext(key="test_fwd", suite="test_s", device_key="fake-chip")
SUITES = Path(__file__).resolve().parent.parent / "suites"
ENCODERS = ("tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-albert", "tiny-vit")
FULL_ENCODERS = ("bert-base", "bert-large", "roberta-base", "distilbert-base", "albert-base")


class SteppedEngine(FakeEngine):
    """Forward passes whose durations cycle through STEPS (in 1/256 s), warm-up calls included:
    1 … 20 in a shuffled order."""

    name: ClassVar[str] = "fake-stepped"
    STEPS: ClassVar[tuple[int, ...]] = tuple((7 * i) % 20 + 1 for i in range(20))

    def forward(self, loaded: Any, inputs: dict[str, Any]) -> Any:
        state = loaded.model
        state.backend.advance(self.STEPS[state.calls % len(self.STEPS)] / 256, "forward")
        state.calls += 1
        return inputs


@pytest.fixture
def fake() -> FakeBackend:
    backends.register(FakeBackend, replace=True)
    engines.register(FakeEngine())
    engines.register(SteppedEngine())
    return backends.get_backend("fake")


def handle(backend: Any) -> LLMPerf:
    context = Context(
        "test_fwd", "test_s", "n", rounds=10, warmup=2, device_key="fake-chip", provenance={}
    )
    return LLMPerf(backend, context, cache=ModelCache())


def forward_spec(model: str = "tiny-bert", **fields: Any) -> WorkloadSpec:
    values: dict[str, Any] = {
        "kind": "forward",
        "model": model,
        "engine": "fake-engine",
        "rounds": 20,
        "warmup": 2,
        **fields,
    }
    return WorkloadSpec(**values)


# -- percentiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q, expected",
    [(0, 1.0), (50, 5.5), (95, 9.55), (99, 9.91), (100, 10.0), (25, 3.25)],
)
def test_percentiles_interpolate_linearly_between_the_closest_ranks(q, expected):
    # Rank (n - 1) * q / 100 of 1 … 10: p95 lies 55 % of the way from the 9th to the 10th.
    assert percentile([7, 3, 10, 1, 5, 2, 9, 4, 8, 6], q) == pytest.approx(expected)


def test_percentiles_agree_with_the_inclusive_quantiles_of_the_standard_library():
    samples = [((i * 37) % 101) / 7 for i in range(100)]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    assert percentile(samples, 95) == pytest.approx(cuts[94])
    assert percentile(samples, 99) == pytest.approx(cuts[98])
    assert percentile(samples, 50) == pytest.approx(statistics.median(samples))
    assert percentile([0.25], 99) == 0.25


@pytest.mark.parametrize("samples, q", [([], 50), ([1.0], 101), ([1.0], -1)])
def test_a_percentile_of_nothing_or_out_of_range_is_an_error(samples, q):
    with pytest.raises(ValueError):
        percentile(samples, q)


# -- the record ----------------------------------------------------------------------------------


def test_a_forward_record_has_latency_percentiles_and_no_token_metrics(fake):
    record = execute(forward_spec(batch_size=2, sequence_length=64), CONTEXT, fake, ModelCache())
    assert record.outcome == "ok", record.note
    assert set(record.metrics) == {
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "warmup_s",
        "peak_memory_bytes",
        "load_time_s",
    }
    assert record.metrics["latency_p50_s"].samples == [FORWARD_S] * 20
    assert record.value("latency_p95_s") == record.value("latency_p99_s") == FORWARD_S
    # The first call compiles: it is a warm-up call, never a round.
    assert record.value("warmup_s") == COMPILE_S + 2 * FORWARD_S
    assert record.main_metric == "latency_p95_s" == main_metric(record.metrics)
    assert record.median == FORWARD_S
    workload = record.workload
    assert workload["sequence_length"] == 64 and workload["input_shape"] == [2, 64]
    assert workload["batch_size"] == 2 and "new_tokens" not in workload


def test_p95_and_p99_come_from_the_rounds_and_p50_keeps_them_as_samples(fake):
    spec = forward_spec(engine="fake-stepped", rounds=20, warmup=0)
    record = execute(spec, CONTEXT, fake, ModelCache())
    rounds = [step / 256 for step in SteppedEngine.STEPS]
    assert record.metrics["latency_p50_s"].samples == rounds
    assert record.value("latency_p50_s") == 10.5 / 256
    # Ranks 18.05 and 18.81 of the sorted rounds 1/256 … 20/256: between the 19th and 20th.
    assert record.value("latency_p95_s") == pytest.approx(19.05 / 256)
    assert record.value("latency_p99_s") == pytest.approx(19.81 / 256)
    assert record.metrics["latency_p95_s"].samples == []


def test_an_image_encoder_gets_pixels_of_its_image_size_and_says_so(fake):
    record = execute(forward_spec("tiny-vit"), CONTEXT, fake, ModelCache())
    assert record.outcome == "ok", record.note
    assert record.workload["image_size"] == 224
    assert record.workload["input_shape"] == [1, 3, 224, 224]
    assert "sequence_length" not in record.workload


def test_text_inputs_are_seeded_ids_within_the_vocabulary_never_the_pad_id():
    from pytest_llmperf.scenarios.forward import ForwardScenario

    scenario, cpu = ForwardScenario(), backends.get_backend("cpu")
    model = models.get("tiny-roberta")
    loaded: Any = type("Loaded", (), {"model": object()})()
    spec = forward_spec("tiny-roberta", sequence_length=512)
    first = scenario.prepare(spec, model, loaded, cpu).tensors
    again = scenario.prepare(spec, model, loaded, cpu).tensors
    ids = first["input_ids"]
    assert ids.shape == (1, 512) and bool((ids == again["input_ids"]).all())
    assert int(ids.min()) >= 2 and int(ids.max()) < 1024  # RoBERTa pads with 1
    assert bool((first["attention_mask"] == 1).all())


def test_the_runner_defaults_to_100_rounds_gates_p95_and_memory_and_remeasures(fake):
    llmperf = handle(fake)
    record = llmperf.forward("tiny-bert", sequence_length=32, engine="fake-engine")
    assert len(record.metrics["latency_p50_s"].samples) == FORWARD_ROUNDS == 100
    assert record.value("warmup_s") == COMPILE_S + FORWARD_WARMUP * FORWARD_S
    assert llmperf.overrides[record.key]["gate"] == FORWARD_GATED
    again = llmperf.remeasure[record.key]()
    assert again.value("latency_p95_s") == record.value("latency_p95_s")


def test_a_causal_lm_runs_its_forward_pass_as_a_prefill(fake):
    record = handle(fake).forward("tiny-llama", 1, 16, engine="fake-engine", rounds=20)
    assert record.outcome == "ok" and record.workload["input_shape"] == [1, 16]


FORWARD_TEST = """
    def test_fwd(llmperf):
        llmperf.forward("tiny-bert", sequence_length=16, engine="fake-engine", rounds=20)
"""


def test_a_slower_p95_fails_the_gate_after_confirmation_and_leads_the_table(project, monkeypatch):
    project.makepyfile(test_forward_gate=FORWARD_TEST)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=1)
    stored = baseline_file(project.path, "test_forward_gate")["entries"]["test_fwd"]["runs"][-1]
    assert stored["metrics"]["latency_p95_s"]["samples"] == []
    assert len(stored["metrics"]["latency_p50_s"]["samples"]) == 20
    assert "e2e_latency_s" not in stored["metrics"]

    monkeypatch.setenv("FAKE_SLOWDOWN", "1.5")
    slow = project.runpytest(FAKE)
    slow.assert_outcomes(failed=1)
    slow.stdout.fnmatch_lines(["*latency_p95_s*", "*regression confirmed by 3 measurements*"])
    slow.stdout.fnmatch_lines(["*test_fwd*5.86 ms p95*"])  # 1.5 × 1/256 s, headed as p95

    monkeypatch.delenv("FAKE_SLOWDOWN")
    project.runpytest(FAKE).assert_outcomes(passed=1)


# -- usage errors, one line, before anything loads ----------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda h: h.generate(model="tiny-bert", engine="fake-engine"),
            r"^tiny-bert is an encoder \(bert\): llmperf.generate needs a causal LM; "
            "time it with llmperf.forward$",
        ),
        (
            lambda h: h.load("tiny-bert", engine="accelerate"),
            r"load\(engine='accelerate'\): tiny-bert is an encoder \(bert\) and engine "
            "'accelerate' builds causal LMs only",
        ),
        (lambda h: h.generate(model="tiny-vit", engine="fake-engine"), "is an image encoder"),
        (
            lambda h: h.forward("tiny-bert", sequence_length=513, engine="fake-engine"),
            r"forward\(sequence_length=513\): tiny-bert takes at most 512 tokens",
        ),
        (
            lambda h: h.forward("tiny-roberta", sequence_length=513, engine="fake-engine"),
            "tiny-roberta takes at most 512 tokens",
        ),
        (
            lambda h: h.forward("tiny-vit", sequence_length=128, engine="fake-engine"),
            r"forward\(sequence_length=128\): tiny-vit is an image encoder .*224×224.* leave",
        ),
        (lambda h: h.forward("tiny-bert", batch_size=0), "batch_size=0: expected a positive"),
        (lambda h: h.forward("tiny-bert", sequence_length=-8), "sequence_length=-8: expected"),
        (lambda h: h.forward("tiny-bert", rounds=19), r"forward\(rounds=19\): expected .*≥ 20"),
        (
            lambda h: h.forward("tiny-bert", engine="accelerate"),
            r"forward\(engine='accelerate'\): the engine has no forward\(\)",
        ),
    ],
    ids=[
        "encoder-to-generate",
        "encoder-to-another-engine",
        "image-to-generate",
        "too-long",
        "roberta-offset",
        "vit-sequence",
        "batch",
        "sequence",
        "rounds",
        "engine",
    ],
)
def test_a_bad_forward_is_a_one_line_usage_error_before_anything_loads(fake, call, message):
    with pytest.raises(UsageError, match=message) as excinfo:
        call(handle(fake))
    assert "\n" not in str(excinfo.value)
    assert "load" not in fake.events


# -- the catalog ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", [*ENCODERS, *FULL_ENCODERS, "vit-base"])
def test_an_encoder_has_the_parameters_transformers_builds(model_id):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    spec = models.get(model_id)
    with init_empty_weights():
        built = AutoModel.from_config(AutoConfig.for_model(**spec.config_dict()))
    assert spec.param_count() == sum(p.numel() for p in built.parameters())


def test_the_real_shapes_have_their_published_sizes():
    assert models.get("bert-base").param_count() == 109_482_240
    assert models.get("vit-base").param_count() == 86_389_248
    assert models.get("bert-large").param_count() == 335_141_888
    assert models.get("vit-base").task == "image-encoder"
    assert models.get("roberta-base").max_tokens() == 512  # 514 positions, offset by pad + 1


def test_a_models_task_crosses_process_boundaries_and_defaults_to_a_causal_lm():
    spec = ModelSpec("x", "vit", "", "/c.json", None, source="config", task="image-encoder")
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == dataclasses.replace(spec, suite=False) and again.task == "image-encoder"
    old = {k: v for k, v in spec.to_json().items() if k != "task"}
    assert ModelSpec.from_json(old).task == "causal-lm"
    with pytest.raises(ValueError, match="task='speech'"):
        ModelSpec.from_json({**spec.to_json(), "task": "speech"})


@pytest.mark.parametrize(
    "config, task",
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "encoder"),
        ({"model_type": "bert", "architectures": ["BertLMHeadModel"]}, "causal-lm"),
        ({"model_type": "roberta"}, "encoder"),
        ({"model_type": "vit", "image_size": 224}, "image-encoder"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "causal-lm"),
        ({"model_type": "bart", "is_encoder_decoder": True}, "causal-lm"),
    ],
)
def test_a_configs_task_comes_from_its_architectures_then_its_model_type(config, task):
    assert infer_task(config) == task


def test_an_encoder_from_disk_is_found_with_its_task(tmp_path):
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(models.get("tiny-vit").config_dict()), encoding="utf-8")
    found = models.lookup(str(path))
    assert found.task == "image-encoder" and found.family == "vit"
    assert task_hint(str(path)) == "image-encoder"
    assert task_hint("tiny-bert") == "encoder" and task_hint("no-such-model") is None


# -- the suite -----------------------------------------------------------------------------------


def test_the_encoder_suite_collects_the_tiny_encoders_at_seven_lengths(project):
    source = (SUITES / "test_encoder_latency.py").read_text(encoding="utf-8")
    project.makepyfile(test_forward_suite_copy=source)
    result = project.runpytest(FAKE, "--collect-only", "-q", "--llmperf-models=tiny")
    ids = sorted(line.split("::")[1] for line in result.stdout.lines if "::" in line)
    lengths = (8, 16, 32, 64, 128, 256, 512)
    text = [
        f"test_text_encoder_latency[{m}-fp32-seq{n}-fake-1]" for m in ENCODERS[:4] for n in lengths
    ]
    assert ids == sorted([*text, "test_image_encoder_latency[tiny-vit-fp32-fake-1]"])


def test_the_generation_suites_never_pick_up_an_encoder(project):
    for name in ("test_generation_latency", "test_load_time"):
        source = (SUITES / f"{name}.py").read_text(encoding="utf-8")
        project.makepyfile(**{f"{name}_copy_fwd": source})
    for chosen in ("tiny", "tiny-bert,tiny-llama,tiny-vit"):
        result = project.runpytest(FAKE, "--collect-only", "-q", f"--llmperf-models={chosen}")
        items = [line for line in result.stdout.lines if "::" in line]
        assert items and all(
            "tiny-llama" in line or "bloom" in line or "gpt2" in line for line in items
        ), chosen
        assert not [line for line in items if "bert" in line or "vit" in line]


# -- a real run in a child process ---------------------------------------------------------------


def test_a_tiny_encoder_runs_for_real_through_the_process_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPERF_CACHE_DIR", str(tmp_path / "cache"))
    launchers = Launchers(LaunchSettings(cache_dir=tmp_path / "cache", timeout=300))
    spec = WorkloadSpec(
        kind="forward", model="tiny-bert", sequence_length=16, rounds=20, warmup=1, dtype="fp32"
    )
    try:
        record = launchers.choose(spec, "process").run(spec, CONTEXT, backends.get_backend("cpu"))
    finally:
        launchers.close()
    assert record.outcome == "ok", record.note
    assert len(record.metrics["latency_p50_s"].samples) == 20
    p50, p95, p99 = (record.value(f"latency_p{q}_s") for q in (50, 95, 99))
    assert 0 < p50 <= p95 <= p99
    assert record.workload["input_shape"] == [1, 16]
    assert (tmp_path / "cache" / "weights").is_dir()  # loaded from the store's seeded checkpoint
