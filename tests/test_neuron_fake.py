"""The neuron backend and the optimum-neuron engine through fakes of the Neuron SDK.

No Neuron hardware or SDK here: fake ``torch_neuronx`` and ``optimum.neuron`` modules go into
``sys.modules`` and record what is called on them, with the signatures of optimum-neuron
0.4.5 (``get_neuron_config`` / ``export`` / ``save_pretrained`` / ``from_pretrained``, and the
encoders' ``from_pretrained(export=True, batch_size=, sequence_length=, auto_cast_type=)``).
The instance type comes from a fake DMI file, the device nodes from a patched lookup.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import execute_fresh, read_results, record_of

from pytest_llmperf import backends, engines
from pytest_llmperf.backends.neuron import NeuronBackend, dpkg_versions, visible_cores
from pytest_llmperf.engines.optimum_neuron import (
    NeuronCompileError,
    OptimumNeuronEngine,
    compiler_message,
)
from pytest_llmperf.errors import SkipWorkload
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.results import Record
from pytest_llmperf.spec import RecordContext, WorkloadSpec, freeze_options

CONTEXT = RecordContext(key="test_neuron", suite="test_neuron_fake", device_key="neuron-inf2")
COMPILE_S = 32.0
STEP_S = 1 / 128
LOAD_S = 0.5


class Sdk:
    """What the fake SDK was asked, and how it behaves."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.now = 0.0
        self.fail: Optional[BaseException] = None
        self.versions = {"neuronx-cc": "2.21.33363.0", "optimum-neuron": "0.4.5"}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


SDK = Sdk()


class FakeCausalLM:
    """optimum-neuron 0.4.5's NeuronModelForCausalLM, as far as the engine uses it."""

    def __init__(self, neuron_config: Any) -> None:
        self.neuron_config = neuron_config

    @classmethod
    def get_neuron_config(cls, model_name_or_path: str, **shapes: Any) -> Any:
        SDK.calls.append(("get_neuron_config", shapes))
        return types.SimpleNamespace(torch_dtype=None, **shapes)

    @classmethod
    def export(cls, model_id: str, neuron_config: Any, load_weights: bool = False) -> Any:
        SDK.calls.append(("export", {**neuron_config.__dict__, "load_weights": load_weights}))
        if SDK.fail is not None:
            raise SDK.fail
        SDK.now += COMPILE_S
        return cls(neuron_config)

    def save_pretrained(self, directory: str) -> None:
        SDK.calls.append(("save_pretrained", directory))
        shapes = {k: v for k, v in self.neuron_config.__dict__.items() if k != "torch_dtype"}
        Path(directory, "neuron_config.json").write_text(json.dumps(shapes))

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs: Any) -> Any:
        SDK.calls.append(("from_pretrained", {"directory": directory, **kwargs}))
        SDK.now += LOAD_S
        shapes = json.loads(Path(directory, "neuron_config.json").read_text())
        return cls(types.SimpleNamespace(**shapes))

    def forward(self, input_ids: Any, **kwargs: Any) -> Any:
        SDK.now += STEP_S
        return input_ids[:, -1:] + 1

    def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """As NxDGenerationMixin: static shapes checked, one ``self.forward`` per token."""
        import torch

        SDK.calls.append(("generate", kwargs))
        batch, length = input_ids.shape
        assert batch <= self.neuron_config.batch_size
        out = input_ids
        for _ in range(kwargs["max_new_tokens"]):
            out = torch.cat([out, self.forward(out)], dim=-1)
        assert out.shape[1] <= self.neuron_config.sequence_length
        return out


class FakeEncoder:
    """NeuronTracedModel's export-by-from_pretrained and its static input shapes."""

    def __init__(self, shapes: dict[str, Any]) -> None:
        self.shapes = shapes
        names = ("input_ids", "attention_mask")
        self.input_static_shapes = {
            n: (shapes["batch_size"], shapes["sequence_length"]) for n in names
        }

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs: Any) -> Any:
        SDK.calls.append((f"{cls.__name__}.from_pretrained", kwargs))
        if kwargs.get("export"):
            SDK.now += COMPILE_S
            return cls(kwargs)
        SDK.now += LOAD_S
        return cls(json.loads(Path(directory, "shapes.json").read_text()))

    def save_pretrained(self, directory: str) -> None:
        Path(directory, "shapes.json").write_text(json.dumps(self.shapes))

    def __call__(self, **inputs: Any) -> Any:
        SDK.calls.append(("call", sorted(inputs)))
        SDK.now += STEP_S
        return inputs["input_ids"].float()


class FakeFeatureExtraction(FakeEncoder):
    pass


class FakeSequenceClassification(FakeEncoder):
    pass


class FakeMaskedLM(FakeEncoder):
    pass


class ClockedNeuron(NeuronBackend):
    """The real neuron backend on a fake inf2 whose clock moves with the fake SDK's work."""

    def clock(self) -> float:
        return SDK.now

    def host_load(self) -> float | None:
        return 0.0


class PinnedEngine(OptimumNeuronEngine):
    """The real engine with the SDK's versions pinned, optimum-neuron "installed"."""

    @staticmethod
    def _missing_library() -> Optional[str]:
        return None

    def sdk_versions(self) -> dict[str, str]:
        return dict(SDK.versions)


def install(monkeypatch: pytest.MonkeyPatch, product: Path, nodes: tuple[str, ...]) -> None:
    """The fake SDK in sys.modules, a fake DMI product name, fake /dev/neuron* nodes."""
    global SDK
    SDK = Sdk()
    optimum = types.ModuleType("optimum")
    neuron = types.ModuleType("optimum.neuron")
    neuron.NeuronModelForCausalLM = FakeCausalLM  # type: ignore[attr-defined]
    neuron.NeuronModelForFeatureExtraction = FakeFeatureExtraction  # type: ignore[attr-defined]
    neuron.NeuronModelForSequenceClassification = FakeSequenceClassification  # type: ignore[attr-defined]
    neuron.NeuronModelForMaskedLM = FakeMaskedLM  # type: ignore[attr-defined]
    optimum.neuron = neuron  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optimum", optimum)
    monkeypatch.setitem(sys.modules, "optimum.neuron", neuron)
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))
    monkeypatch.setattr("pytest_llmperf.backends.neuron.device_nodes", lambda *p: list(nodes))
    monkeypatch.setattr(ClockedNeuron, "product_name_file", str(product))
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    monkeypatch.delenv("NEURON_RT_NUM_CORES", raising=False)


@pytest.fixture
def inf2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ClockedNeuron:
    product = tmp_path / "product_name"
    product.write_text("inf2.xlarge\n")
    install(monkeypatch, product, ("neuron0",))
    return ClockedNeuron()


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> PinnedEngine:
    return engines.register(PinnedEngine())  # type: ignore[return-value]


def spec_of(kind: str = "generate", model: str = "tiny-llama", **fields: Any) -> WorkloadSpec:
    options = fields.pop("options", {})
    base: dict[str, Any] = dict(
        kind=kind,
        model=model,
        engine="optimum-neuron",
        engine_options=freeze_options(options, "engine_options"),
        dtype="bf16",
        rounds=3,
        warmup=1,
    )
    if kind == "generate":
        base.update(new_tokens=8, prompt_tokens=5, batch_size=2)
    base.update(fields)
    return WorkloadSpec(**base)


def run(spec: WorkloadSpec, backend: Any, store: CheckpointStore) -> Record:
    return execute_fresh(spec, CONTEXT, backend, store)


# -- the backend ----------------------------------------------------------------------------------


def test_pypi_placeholder_torch_neuronx_is_a_skip_that_says_what_to_install(monkeypatch, tmp_path):
    """PyPI's torch-neuronx 1.0 is one line: raise ImportError("WRONG PACKAGE. ...")."""
    monkeypatch.setattr("pytest_llmperf.backends.neuron.device_nodes", lambda *p: ["neuron0"])
    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    stub_dir = tmp_path / "site"
    (stub_dir / "torch_neuronx").mkdir(parents=True)
    (stub_dir / "torch_neuronx" / "__init__.py").write_text(
        'raise ImportError("WRONG PACKAGE. Please install the package from Neuron Repository'
        ' - pip.repos.neuron.amazonaws.com")\n'
    )
    monkeypatch.syspath_prepend(str(stub_dir))
    probe = NeuronBackend().probe()
    assert not probe.available
    assert probe.reason == (
        "torch-neuronx 1.0 from PyPI is AWS's placeholder (it raises 'WRONG PACKAGE'); install "
        "the Neuron SDK's build: pip install --extra-index-url "
        "https://pip.repos.neuron.amazonaws.com torch-neuronx"
    )


def test_no_device_nodes_is_a_skip_without_importing_the_sdk(monkeypatch):
    monkeypatch.setattr("pytest_llmperf.backends.neuron.device_nodes", lambda *p: [])
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # an import would raise
    assert NeuronBackend().probe().reason == "no Neuron device nodes (/dev/neuron*)"


@pytest.mark.parametrize(
    "product, key, cores",
    [
        ("inf2.48xlarge", "neuron-inf2", 24),
        ("trn1n.32xlarge", "neuron-trn1", 24),
        ("trn2.48xlarge", "neuron-trn2", 48),
        ("m7i.large", "neuron-unknown", 24),
    ],
)
def test_device_key_from_the_dmi_product_name_and_devices_are_neuroncores(
    monkeypatch, tmp_path, product, key, cores
):
    path = tmp_path / "product_name"
    path.write_text(product + "\n")
    install(monkeypatch, path, tuple(f"neuron{i}" for i in range(12)))
    backend = ClockedNeuron()
    assert backend.device_key() == key
    assert backend.device_count() == cores
    info = backend.device_info()
    assert info["instance_type"] == product and info["unit"] == "NeuronCore"
    if key == "neuron-unknown":
        assert "m7i.large is not inf2/trn1/trn2: device key neuron-unknown" in info["note"]
        assert backend.memory_bandwidth() is None
    else:
        assert "note" not in info


def test_visible_cores_limits_the_count_as_the_neuron_runtime_does():
    assert visible_cores(24, {"NEURON_RT_VISIBLE_CORES": "0-3"}) == 4
    assert visible_cores(24, {"NEURON_RT_VISIBLE_CORES": "1,4-5"}) == 3
    assert visible_cores(24, {"NEURON_RT_NUM_CORES": "2"}) == 2
    assert visible_cores(2, {"NEURON_RT_VISIBLE_CORES": "0-7"}) == 2


def test_sdk_versions_come_from_dists_dpkg_and_the_driver(inf2, tmp_path):
    status = tmp_path / "status"
    status.write_text(
        "Package: aws-neuronx-runtime-lib\nStatus: install ok installed\nVersion: 2.28.23.0\n\n"
        "Package: vim\nStatus: install ok installed\nVersion: 9\n"
    )
    driver = tmp_path / "version"
    driver.write_text("2.24.7.0\n")
    inf2.dpkg_status_file, inf2.driver_version_file = str(status), str(driver)
    versions = inf2.versions()
    assert versions["aws-neuronx-runtime-lib"] == "2.28.23.0"
    assert versions["neuron-driver"] == "2.24.7.0"
    assert "vim" not in versions
    assert dpkg_versions("x", status_file=str(tmp_path / "absent")) == {}


def test_sync_is_free_memory_peak_unknown_and_bandwidth_is_per_neuroncore(inf2):
    inf2.synchronize()
    assert inf2.peak_memory_bytes() is None
    assert inf2.available_memory_bytes() == 16 * 10**9
    bandwidth = inf2.memory_bandwidth()
    assert bandwidth is not None and bandwidth.bytes_per_s == 410e9
    assert "÷ 2 NeuronCores" in bandwidth.source


def test_another_engine_on_neuron_is_a_skip_naming_the_one_that_runs(inf2):
    backends.register(ClockedNeuron, replace=True)
    from pytest_llmperf.execute import resolve

    with pytest.raises(SkipWorkload, match="engine 'transformers' does not run on neuron; "):
        resolve(spec_of(engine="transformers", dtype="fp32"), inf2)


# -- the engine -----------------------------------------------------------------------------------


def test_compiles_with_static_shapes_before_the_rounds_and_reports_compile_apart(
    inf2, engine, tmp_path
):
    record = run(spec_of(devices=2), inf2, CheckpointStore(tmp_path / "cache"))
    assert record.outcome == "ok", record.note
    names = SDK.names()
    assert names.index("export") < names.index("from_pretrained") < names.index("generate")
    config = dict(SDK.calls[names.index("export")][1])
    assert config["batch_size"] == 2
    assert config["sequence_length"] == 5 + 8  # prompt + new tokens
    assert config["tensor_parallel_size"] == 2  # num_cores = devices
    assert str(config["torch_dtype"]) == "torch.bfloat16"
    assert record.metrics["compile_s"].value == COMPILE_S
    assert record.metrics["load_time_s"].value == LOAD_S  # from_pretrained only
    assert record.metrics["e2e_latency_s"].value == 8 * STEP_S
    assert record.metrics["ttft_s"].value == STEP_S  # the hook fired after the prefill forward
    generate = SDK.calls[names.index("generate")][1]
    assert generate["max_new_tokens"] == generate["min_new_tokens"] == 8
    assert generate["eos_token_id"] is None
    assert "compiled in 32 s" in record.note and "batch 2 × sequence 13, bf16" in record.note


def test_a_second_load_reuses_the_compiled_folder_and_a_new_compiler_recompiles(
    inf2, engine, tmp_path
):
    store = CheckpointStore(tmp_path / "cache")
    run(spec_of(), inf2, store)
    first = SDK.names().count("export")
    again = run(spec_of(), inf2, store)
    assert SDK.names().count("export") == first == 1
    assert SDK.names().count("get_neuron_config") == 1
    assert "compile_s" not in again.metrics
    assert "compiled artifacts reused" in again.note
    assert again.metrics["load_time_s"].value == LOAD_S
    SDK.versions["neuronx-cc"] = "2.22.0.0"
    bumped = run(spec_of(), inf2, store)
    assert SDK.names().count("export") == 2
    assert bumped.metrics["compile_s"].value == COMPILE_S
    assert len(list((tmp_path / "cache" / "compiled").iterdir())) == 2 + 2  # + their lock files


def test_other_shapes_compile_again_instead_of_reusing_the_cached_model(inf2, engine, tmp_path):
    cache = ModelCache(store=CheckpointStore(tmp_path / "cache"))
    execute(spec_of(batch_size=1), CONTEXT, inf2, cache)
    execute(spec_of(batch_size=4), CONTEXT, inf2, cache)
    cache.drop(inf2)
    batches = [c[1]["batch_size"] for c in SDK.calls if c[0] == "export"]
    assert batches == [1, 4]


def test_a_compile_failure_raises_the_compilers_words_on_one_line_and_leaves_nothing(
    inf2, engine, tmp_path
):
    import subprocess

    SDK.fail = subprocess.CalledProcessError(
        70,
        ["neuronx-cc", "compile"],
        stderr=b"INFO: starting\nERROR 42: Estimated peak HBM usage exceeds 16 GB\nINFO: done\n",
    )
    store = CheckpointStore(tmp_path / "cache")
    with pytest.raises(NeuronCompileError) as caught:
        run(spec_of(), inf2, store)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("Neuron compile of tiny-llama (batch 2 × sequence 13, bf16, ")
    assert "ERROR 42: Estimated peak HBM usage exceeds 16 GB" in text
    assert [p.name for p in (tmp_path / "cache" / "compiled").iterdir() if p.is_dir()] == []
    SDK.fail = None
    assert run(spec_of(), inf2, store).outcome == "ok"  # compiles afresh


def test_compiler_message_without_output_is_the_exception_text():
    assert compiler_message(RuntimeError("neuronx-cc failed\nwith 70")) == (
        "RuntimeError: neuronx-cc failed | with 70"
    )
    assert compiler_message(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize(
    "head, cls",
    [
        (None, "FakeFeatureExtraction"),
        ("sequence-classification", "FakeSequenceClassification"),
        ("masked-lm", "FakeMaskedLM"),
    ],
)
def test_encoders_compile_as_the_matching_neuron_class_with_static_shapes(
    inf2, engine, tmp_path, head, cls
):
    options = {"head": head} if head else {}
    spec = spec_of("forward", model="tiny-bert", sequence_length=16, batch_size=1, options=options)
    record = run(spec, inf2, CheckpointStore(tmp_path / "cache"))
    assert record.outcome == "ok", record.note
    name, kwargs = SDK.calls[0]
    assert name == f"{cls}.from_pretrained"
    assert kwargs == {
        "export": True,
        "batch_size": 1,
        "sequence_length": 16,
        "auto_cast": "all",
        "auto_cast_type": "bf16",
    }
    # token_type_ids were not compiled in: not passed to the traced model
    assert ("call", ["attention_mask", "input_ids"]) in SDK.calls
    assert record.metrics["compile_s"].value == COMPILE_S


def test_skip_reasons_name_what_is_missing(inf2, monkeypatch):
    real = OptimumNeuronEngine()
    cpu = backends.get_backend("cpu")
    assert real.unsupported(cpu, spec_of()) == (
        "optimum-neuron runs on the neuron backend (Inferentia2/Trainium) only, not on cpu"
    )
    monkeypatch.setattr(
        "importlib.metadata.version",
        lambda name: (_ for _ in ()).throw(__import__("importlib").metadata.PackageNotFoundError()),
    )
    assert real.unsupported(inf2, spec_of()) == (
        "optimum-neuron is not installed (pip install optimum-neuron[neuronx] "
        "--extra-index-url https://pip.repos.neuron.amazonaws.com)"
    )


def test_optimum_neurons_transformers_pin_is_a_skip(inf2, monkeypatch):
    versions = {"optimum-neuron": "0.4.5", "transformers": "5.23.0"}
    monkeypatch.setattr("importlib.metadata.version", lambda name: versions[name])
    monkeypatch.setattr(
        "importlib.metadata.requires",
        lambda name: ["transformers~=4.57.1", "neuronx-cc==2.21.33363.0; extra == 'neuronx'"],
    )
    assert OptimumNeuronEngine().unsupported(inf2, spec_of()) == (
        "optimum-neuron 0.4.5 needs transformers~=4.57.1, installed 5.23.0"
    )


def test_left_padded_datasets_and_causal_lm_forward_are_skips(inf2, engine):
    assert "rejects left-padded batches" in str(
        engine.unsupported(inf2, spec_of("generate_dataset", new_tokens=8, prompts=("a",)))
    )
    assert "run generate only" in str(engine.unsupported(inf2, spec_of("forward")))


def test_several_neuroncores_run_in_one_process_not_a_rank_group(engine):
    from pytest_llmperf.launchers import _choose_name

    assert _choose_name(spec_of(devices=2), "auto") == "inline"


# -- through pytest: a compile error is an error record, the next test runs ---------------

CONFTEST = """
import sys
from pathlib import Path

import test_neuron_fake as fake
from pytest_llmperf import backends, engines


def pytest_configure(config):
    product = Path(__file__).with_name("product_name")
    product.write_text("inf2.xlarge\\n")
    patch = pytest_MonkeyPatch()
    config._neuron_patch = patch
    fake.install(patch, product, ("neuron0",))
    backends.register(fake.ClockedNeuron, replace=True)
    engines.register(fake.PinnedEngine())


def pytest_unconfigure(config):
    config._neuron_patch.undo()


import pytest
pytest_MonkeyPatch = pytest.MonkeyPatch
"""

TESTS = """
import subprocess

import test_neuron_fake as fake


def test_fails_to_compile(llmperf):
    fake.SDK.fail = subprocess.CalledProcessError(
        70, ["neuronx-cc"], stderr=b"ERROR 42: Estimated peak HBM usage exceeds 16 GB\\n"
    )
    llmperf.generate(model="tiny-llama", engine="optimum-neuron", dtype="bf16", new_tokens=8,
                     prompt_tokens=5)


def test_next(llmperf):
    fake.SDK.fail = None
    llmperf.generate(model="tiny-llama", engine="optimum-neuron", dtype="bf16", new_tokens=8,
                     prompt_tokens=5)
"""


def test_a_compile_error_is_an_error_record_and_the_next_test_runs(pytester, monkeypatch):
    monkeypatch.setenv("LLMPERF_CACHE_DIR", str(pytester.path / "cache"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_compile=TESTS)
    result = pytester.runpytest(
        "--llmperf-backend=neuron", "--llmperf-report=r", "--llmperf-launcher=inline"
    )
    result.assert_outcomes(failed=1, passed=1)
    rows = read_results(pytester.path / "r")
    failed = record_of(rows, "test_fails_to_compile")
    assert failed["outcome"] == "error"
    assert failed["note"].startswith("NeuronCompileError: Neuron compile of tiny-llama")
    assert "ERROR 42: Estimated peak HBM usage exceeds 16 GB" in failed["note"]
    assert record_of(rows, "test_next")["outcome"] == "ok"
