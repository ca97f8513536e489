"""The hpu backend and the optimum-habana engine through fakes of Habana's stack.

No Gaudi and no SynapseAI here: fake ``habana_frameworks`` (``.torch``, ``.torch.core``,
``.torch.hpu``) and ``optimum.habana`` modules go into ``sys.modules`` and record what is called
on them, with the names and signatures of habana-torch-plugin (``torch.hpu.memory_stats`` with
``InUse``/``MaxInUse``/``Limit``, ``wrap_in_hpu_graph`` setting an instance ``forward``) and
optimum-habana 1.21.2 (``adapt_transformers_to_gaudi``, ``generate(lazy_mode=, hpu_graphs=,
ignore_eos=)``, ``checkpoint_utils``). The fake "HPU" runs a real tiny BLOOM on the CPU; its
clock moves with the work, and lazy mode's graph compile costs COMPILE_S the first time a
shape runs, as on a Gaudi.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import execute_fresh

from pytest_llmperf.backends.hpu import HpuBackend, gaudi_generation
from pytest_llmperf.engines import optimum_habana
from pytest_llmperf.engines.optimum_habana import OptimumHabanaEngine, ensure_lazy_mode
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.results import Record
from pytest_llmperf.spec import RecordContext, WorkloadSpec, freeze_options

CONTEXT = RecordContext(key="test_gaudi", suite="test_habana_fake", device_key="hpu-gaudi2")
COMPILE_S = 20.0
STEP_S = 1 / 64
NEW_TOKENS = 6
PLUGIN_OOM = (
    "[Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for size::939524096 (896)MB"
)


class Stack:
    """What the fake Habana stack was asked, and the fake device's clock and memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.now = 0.0
        self.compiled: set[tuple[int, ...]] = set()
        self.name = "GAUDI2"
        self.initialized = True
        self.stats = {"Limit": 94 * 2**30, "InUse": 2 * 2**30, "MaxInUse": 3 * 2**30}
        self.oom = False

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def of(self, name: str) -> list[Any]:
        return [args for n, args in self.calls if n == name]


STACK = Stack()


def _hpu_module() -> types.ModuleType:
    """``habana_frameworks.torch.hpu``: the calls the backend and the engine use."""
    hpu = types.ModuleType("habana_frameworks.torch.hpu")

    def record(name: str, value: Any = None) -> Any:
        STACK.calls.append((name, None))
        return value

    hpu.is_available = lambda: True  # type: ignore[attr-defined]
    hpu.device_count = lambda: 8  # type: ignore[attr-defined]
    hpu.is_initialized = lambda: STACK.initialized  # type: ignore[attr-defined]
    hpu.get_device_name = lambda device=None: record("get_device_name", STACK.name)  # type: ignore[attr-defined]
    hpu.synchronize = lambda: record("synchronize")  # type: ignore[attr-defined]
    hpu.memory_stats = lambda device=None: record("memory_stats", dict(STACK.stats))  # type: ignore[attr-defined]
    hpu.max_memory_allocated = lambda device=None: record(  # type: ignore[attr-defined]
        "max_memory_allocated", STACK.stats["MaxInUse"]
    )
    hpu.reset_peak_memory_stats = lambda device=None: record("reset_peak_memory_stats")  # type: ignore[attr-defined]

    def wrap_in_hpu_graph(module: Any, **kwargs: Any) -> Any:
        """As the plugin's: an instance-level ``forward`` that replays a captured graph."""
        STACK.calls.append(("wrap_in_hpu_graph", kwargs))
        inner = module.forward

        def forward(*args: Any, **kw: Any) -> Any:
            STACK.calls.append(("graph_forward", None))
            return inner(*args, **kw)

        module.forward = forward
        return module

    hpu.wrap_in_hpu_graph = wrap_in_hpu_graph  # type: ignore[attr-defined]
    return hpu


def gaudi_generate(original: Any) -> Any:
    """GaudiGenerationMixin.generate as far as timing goes: a ``mark_step`` per token, one
    ``self(...)`` per token, lazy-mode compile the first time each input shape runs."""

    def generate(self: Any, inputs: Any = None, generation_config: Any = None, **kwargs: Any):
        seen = {k: kwargs.pop(k) for k in ("lazy_mode", "hpu_graphs", "ignore_eos")}
        fields = (
            "static_shapes",
            "bucket_size",
            "bucket_internal",
            "ignore_eos",
            "trim_logits",
            "attn_softmax_bf16",
            "limit_hpu_graphs",
            "reuse_cache",
            "use_flash_attention",
        )
        seen.update({f"config.{f}": getattr(generation_config, f) for f in fields})
        seen.update({k: kwargs[k] for k in ("max_new_tokens", "min_new_tokens")})
        STACK.calls.append(("generate", seen))
        if STACK.oom:
            raise RuntimeError(PLUGIN_OOM)
        step = self.forward

        def device_step(*args: Any, **kw: Any) -> Any:
            STACK.calls.append(("mark_step", None))
            shape = tuple(kw["input_ids"].shape) if "input_ids" in kw else tuple(args[0].shape)
            if shape not in STACK.compiled:
                STACK.compiled.add(shape)
                STACK.now += COMPILE_S
            STACK.now += STEP_S
            return step(*args, **kw)

        self.forward = device_step
        try:
            return original(self, inputs, **kwargs)
        finally:
            self.forward = step

    return generate


@pytest.fixture
def gaudi(monkeypatch: pytest.MonkeyPatch) -> HpuBackend:
    """The fake stack in sys.modules and an hpu backend whose clock is the fake device's."""
    import torch
    import transformers

    global STACK
    STACK = Stack()
    hpu = _hpu_module()
    habana = types.ModuleType("habana_frameworks")
    htorch = types.ModuleType("habana_frameworks.torch")
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: STACK.calls.append(("mark_step", None))  # type: ignore[attr-defined]
    htorch.hpu = hpu  # type: ignore[attr-defined]
    htorch.core = core  # type: ignore[attr-defined]
    habana.torch = htorch  # type: ignore[attr-defined]
    for name, module in (
        ("habana_frameworks", habana),
        ("habana_frameworks.torch", htorch),
        ("habana_frameworks.torch.core", core),
        ("habana_frameworks.torch.hpu", hpu),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch, "hpu", hpu, raising=False)  # what the plugin registers

    mixin = transformers.generation.utils.GenerationMixin

    def adapt_transformers_to_gaudi() -> None:
        STACK.calls.append(("adapt_transformers_to_gaudi", None))
        monkeypatch.setattr(mixin, "generate", gaudi_generate(mixin.generate))

    optimum = types.ModuleType("optimum")
    oh = types.ModuleType("optimum.habana")
    oh_tf = types.ModuleType("optimum.habana.transformers")
    oh_mu = types.ModuleType("optimum.habana.transformers.modeling_utils")
    oh_mu.adapt_transformers_to_gaudi = adapt_transformers_to_gaudi  # type: ignore[attr-defined]
    oh_ck = types.ModuleType("optimum.habana.checkpoint_utils")
    oh_ck.model_is_optimized = lambda config: config.model_type in ("bloom", "llama")  # type: ignore[attr-defined]
    oh_ck.get_ds_injection_policy = lambda config: {"policy": config.model_type}  # type: ignore[attr-defined]
    for name, module in (
        ("optimum", optimum),
        ("optimum.habana", oh),
        ("optimum.habana.transformers", oh_tf),
        ("optimum.habana.transformers.modeling_utils", oh_mu),
        ("optimum.habana.checkpoint_utils", oh_ck),
    ):
        monkeypatch.setitem(sys.modules, name, module)

    from pytest_llmperf.engines import deepspeed_inference

    real_load = deepspeed_inference.load_pretrained

    def load_pretrained(directory: Path, tdtype: Any) -> Any:
        STACK.calls.append(("from_pretrained", str(directory)))
        return real_load(directory, tdtype)

    monkeypatch.setattr(deepspeed_inference, "load_pretrained", load_pretrained)
    monkeypatch.setattr(optimum_habana, "_adapted", False)
    monkeypatch.setattr(optimum_habana, "_requirement_reason", lambda: None)
    monkeypatch.setattr("pytest_llmperf.backends.hpu.device_nodes", lambda *p: ["accel0"])
    monkeypatch.setattr("pytest_llmperf.backends.hpu.hl_smi", lambda *args: None)
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    # DeepSpeed (imported by accelerate inside from_pretrained) picks its accelerator once per
    # process, and would find the fake habana_frameworks: keep it on the CPU it runs on here.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return ClockedHpu()


class ClockedHpu(HpuBackend):
    """The real hpu backend on the fake stack: its "device" is the CPU, its clock the fake's."""

    torch_device = "cpu"

    def clock(self) -> float:
        return STACK.now

    def host_load(self) -> float | None:
        return 0.0


def spec_of(**fields: Any) -> WorkloadSpec:
    options = fields.pop("options", {})
    base: dict[str, Any] = dict(
        kind="generate",
        model="tiny-bloom",
        engine="optimum-habana",
        engine_options=freeze_options(options, "engine_options"),
        dtype="bf16",
        rounds=3,
        warmup=1,
        new_tokens=NEW_TOKENS,
        prompt_tokens=5,
        batch_size=2,
    )
    base.update(fields)
    return WorkloadSpec(**base)


def run(spec: WorkloadSpec, backend: Any, store: CheckpointStore) -> Record:
    return execute_fresh(spec, CONTEXT, backend, store)


# -- the backend ----------------------------------------------------------------------------------


def test_probe_on_this_machine_skips_without_importing_the_stack(monkeypatch):
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)  # an import would raise
    assert HpuBackend().probe().reason == "no Habana device nodes (/dev/accel*, /dev/hl*)"


@pytest.mark.parametrize(
    "name, generation",
    [
        ("GAUDI2", "gaudi2"),
        ("GAUDI3", "gaudi3"),
        ("GAUDI", "gaudi"),
        ("HL-225", "gaudi2"),
        ("HL-205", "gaudi"),
        ("HL-325L", "gaudi3"),
        ("Intel(R) Gaudi(R) 3", "gaudi3"),
        ("Gaudi 2", "gaudi2"),
        ("HL-100", None),
    ],
)
def test_the_plugin_and_hl_smi_spellings_name_one_generation(name, generation):
    assert gaudi_generation(name) == generation


def test_device_key_from_the_plugin_in_a_process_that_holds_the_device(gaudi):
    assert gaudi.probe().available and gaudi.device_count() == 8
    assert gaudi.device_key() == "hpu-gaudi2"
    assert "get_device_name" in STACK.names()


def test_device_key_from_hl_smi_where_the_device_is_not_ours_yet(gaudi, monkeypatch):
    """Asking the plugin would acquire the Gaudi in the pytest process."""
    STACK.initialized = False
    asked: list[tuple[str, ...]] = []

    def hl_smi(*args: str) -> Optional[str]:
        asked.append(args)
        return "HL-325L\nHL-325L\n"

    monkeypatch.setattr("pytest_llmperf.backends.hpu.hl_smi", hl_smi)
    assert gaudi.device_key() == "hpu-gaudi3"
    assert asked == [("-Q", "name", "-f", "csv,noheader")]
    assert "get_device_name" not in STACK.names()


def test_an_odd_device_name_still_gives_a_safe_path_component(gaudi):
    STACK.name = "Weird/../Board #7"
    assert gaudi.device_key() == "hpu-weird-..-board-7"
    assert "/" not in gaudi.device_key()[4:]


def test_synapseai_version_from_the_plugin_dist_and_the_driver_from_hl_smi(gaudi, monkeypatch):
    monkeypatch.setattr(
        "pytest_llmperf.backends.hpu.installed_versions",
        lambda *dists: {"habana-torch-plugin": "1.21.0.555", "habana-pyhlml": "1.21.0.555"},
    )
    header = (
        "+----------------------------------------------------+\n"
        "| HL-SMI Version:                hl-1.21.0-fw-59.1.0.0 |\n"
        "| Driver Version:                     1.21.0-ca59b5a     |\n"
    )
    monkeypatch.setattr("pytest_llmperf.backends.hpu.hl_smi", lambda *args: header)
    versions = gaudi.versions()
    assert versions["synapseai"] == "1.21.0"
    assert versions["habana-torch-plugin"] == "1.21.0.555"
    assert versions["habana-driver"] == "1.21.0"


def test_memory_comes_from_the_plugin_memory_stats(gaudi):
    gaudi.reset_peak_memory()
    assert gaudi.peak_memory_bytes() == 3 * 2**30
    assert gaudi.available_memory_bytes() == 92 * 2**30
    assert gaudi.memory_in_use_bytes() == 2 * 2**30
    assert STACK.names()[:2] == ["reset_peak_memory_stats", "max_memory_allocated"]


def test_bind_device_is_a_no_op_where_torch_hpu_has_no_set_device(gaudi):
    gaudi.bind_device(3)  # the plugin's torch.hpu has no set_device: nothing to call
    assert STACK.calls == []


# -- the engine -----------------------------------------------------------------------------------


def test_adapts_transformers_once_before_building_and_compiles_in_the_warmup(gaudi, tmp_path):
    store = CheckpointStore(tmp_path / "cache")
    record = run(spec_of(), gaudi, store)
    assert record.outcome == "ok", record.note
    names = STACK.names()
    assert names.count("adapt_transformers_to_gaudi") == 1
    assert names.index("adapt_transformers_to_gaudi") < names.index("from_pretrained")
    assert "wrap_in_hpu_graph" not in names
    # Prefill and decode shapes compiled once each, in the warm-up; the rounds are steady.
    assert len(STACK.compiled) == 2
    assert record.metrics["warmup_s"].value >= 2 * COMPILE_S
    e2e = record.metrics["e2e_latency_s"].samples
    assert len(e2e) == 3 and all(t == pytest.approx(NEW_TOKENS * STEP_S) for t in e2e)
    assert record.metrics["load_time_s"].value < COMPILE_S
    # The token hook fired once per forward: TTFT and TPOT come from the rounds.
    assert record.metrics["ttft_s"].samples == pytest.approx([STEP_S] * 3)
    assert record.metrics["tpot_s"].samples == pytest.approx([STEP_S] * 3)
    assert "optimum-habana: lazy mode; no HPU graphs; static shapes" in record.note

    again = run(spec_of(batch_size=1), gaudi, store)
    assert again.outcome == "ok", again.note
    assert STACK.names().count("adapt_transformers_to_gaudi") == 1  # once per process


def test_generation_config_is_the_text_generation_examples(gaudi, tmp_path):
    options = {"hpu_graphs": True, "bucket_size": 4, "bucket_internal": True, "reuse_cache": True}
    record = run(spec_of(options=options), gaudi, CheckpointStore(tmp_path / "cache"))
    assert record.outcome == "ok", record.note
    calls = STACK.of("generate")
    assert len(calls) == 1 + 3  # warm-up and rounds
    assert calls[0] == {
        "lazy_mode": True,
        "hpu_graphs": True,
        "ignore_eos": True,
        "config.static_shapes": True,
        "config.bucket_size": 4,
        "config.bucket_internal": True,
        "config.ignore_eos": True,
        "config.trim_logits": False,
        "config.attn_softmax_bf16": False,
        "config.limit_hpu_graphs": False,
        "config.reuse_cache": True,
        "config.use_flash_attention": False,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
    }


def test_hpu_graphs_wrap_the_model_and_the_hook_still_fires_per_token(gaudi, tmp_path):
    record = run(spec_of(options={"hpu_graphs": True}), gaudi, CheckpointStore(tmp_path / "c"))
    assert record.outcome == "ok", record.note
    names = STACK.names()
    assert names.count("wrap_in_hpu_graph") == 1
    assert names.index("from_pretrained") < names.index("wrap_in_hpu_graph")
    assert names.count("graph_forward") == (1 + 3) * NEW_TOKENS
    assert len(record.metrics["ttft_s"].samples) == 3
    assert "HPU graphs" in record.note


def test_peak_memory_is_reset_after_the_warmup_and_read_after_the_rounds(gaudi, tmp_path):
    record = run(spec_of(), gaudi, CheckpointStore(tmp_path / "cache"))
    assert record.outcome == "ok", record.note
    names = STACK.names()
    generates = [i for i, n in enumerate(names) if n == "generate"]
    reset = names.index("reset_peak_memory_stats")
    assert generates[0] < reset < generates[1]
    assert names.index("max_memory_allocated") > generates[-1]
    assert record.metrics["peak_memory_bytes"].value == 3 * 2**30


def test_a_plugin_allocation_failure_is_an_oom_record(gaudi, tmp_path):
    STACK.oom = True
    record = run(spec_of(), gaudi, CheckpointStore(tmp_path / "cache"))
    assert record.outcome == "oom"


def test_warmup_zero_is_a_usage_error_because_the_compile_would_be_a_round(gaudi):
    with pytest.raises(UsageError, match="warmup=0 with engine 'optimum-habana'"):
        OptimumHabanaEngine().unsupported(gaudi, spec_of(warmup=0))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"graphs": True}, r"engine_options\['graphs'\]: unknown option"),
        ({"hpu_graphs": "yes"}, r"expected bool"),
        ({"bucket_size": 0}, r"-1 \(no bucketing\) or a positive size"),
        ({"bucket_internal": True}, r"needs a bucket_size > 0"),
        ({"limit_hpu_graphs": True}, r"needs hpu_graphs=True"),
        ({"bucket_size": 8, "reuse_cache": True}, r"needs bucket_internal=True"),
    ],
)
def test_bad_engine_options_are_usage_errors(gaudi, options, message):
    engine = OptimumHabanaEngine()
    with pytest.raises(UsageError, match=message):
        engine.check_options(options)
        engine.unsupported(gaudi, spec_of(options=options))


def test_not_on_hpu_is_a_skip_reason(gaudi):
    from pytest_llmperf.backends.cpu import CpuBackend

    reason = OptimumHabanaEngine().unsupported(CpuBackend(), spec_of())
    assert reason == "optimum-habana runs on Gaudi (the hpu backend), not on cpu"


def test_missing_optimum_habana_is_a_skip_naming_the_install():
    # The real metadata: optimum-habana is not installed here.
    reason = optimum_habana._requirement_reason()
    assert reason == "optimum-habana is not installed (pip install optimum-habana)"


def test_a_transformers_outside_the_pin_is_a_skip(monkeypatch):
    def version(dist: str) -> str:
        return {"optimum-habana": "1.21.2", "transformers": "5.23.0"}[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda dist: ["transformers<4.56.0,>=4.55.0", "pytest<8.0.0; extra == 'tests'"],
    )
    reason = optimum_habana._requirement_reason()
    assert reason == (
        "optimum-habana 1.21.2 needs transformers<4.56.0,>=4.55.0, transformers 5.23.0 is installed"
    )


def test_eager_mode_is_refused_and_lazy_mode_set_before_the_plugin_import(gaudi, monkeypatch):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    reason = OptimumHabanaEngine().unsupported(gaudi, spec_of())
    assert reason is not None and "PT_HPU_LAZY_MODE=0 selects eager mode" in reason
    with pytest.raises(SkipWorkload, match="unset it or set PT_HPU_LAZY_MODE=1"):
        ensure_lazy_mode()
    monkeypatch.delenv("PT_HPU_LAZY_MODE")
    monkeypatch.delitem(sys.modules, "habana_frameworks.torch")
    ensure_lazy_mode()
    import os

    assert os.environ["PT_HPU_LAZY_MODE"] == "1"


def test_several_devices_go_through_deepspeed_init_inference_as_the_example(gaudi, monkeypatch):
    import torch

    asked: list[tuple[str, Any]] = []

    class Engine:
        module = "the tensor-parallel model"

    class FakeDeepSpeed:
        @staticmethod
        def OnDevice(dtype: Any, device: str) -> Any:  # noqa: N802  (DeepSpeed's name)
            import contextlib

            asked.append(("OnDevice", (dtype, device)))
            return contextlib.nullcontext()

        @staticmethod
        def init_inference(model: Any, **kwargs: Any) -> Any:
            asked.append(("init_inference", kwargs))
            return Engine()

    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bloom"))
    model.eval = lambda: model
    monkeypatch.setattr(
        "pytest_llmperf.engines.deepspeed_inference.load_pretrained", lambda d, t: model
    )
    out = OptimumHabanaEngine._load_distributed(
        FakeDeepSpeed, "/ckpt", torch.bfloat16, spec_of(devices=2), hpu_graphs=True
    )
    assert out == "the tensor-parallel model"
    assert asked == [
        ("OnDevice", (torch.bfloat16, "cpu")),
        (
            "init_inference",
            {
                "dtype": torch.bfloat16,
                "tensor_parallel": {"tp_size": 2},
                "enable_cuda_graph": True,
                "injection_policy": {"policy": "bloom"},
            },
        ),
    ]
    assert OptimumHabanaEngine.launcher == "deepspeed"
