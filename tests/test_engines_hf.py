"""The engines that load with transformers' own loader: accelerate's big-model placement
(``accelerate``) and bitsandbytes' quantization at load (``bnb-int8``, ``bnb-4bit``).

They run for real here, on tiny models on this CPU, through the same ``execute()`` every
caller uses: weights come from the checkpoint store, token stamps must survive accelerate's
hooks, and a forced disk offload must give the same greedy tokens as no offload. Support
checks (a missing package, an unsupported device) are tested without importing anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes import FakeBackend
from helpers import execute_fresh

from pytest_llmperf import engines, models
from pytest_llmperf.backends import get_backend
from pytest_llmperf.engines import bnb
from pytest_llmperf.engines.accelerate import parse_bytes
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.models import weights
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.results import Record
from pytest_llmperf.spec import RecordContext, WorkloadSpec, freeze_options

CONTEXT = RecordContext(key="test_engine", suite="test_engines_hf", device_key="cpu-test")
NEW_TOKENS = 8
DEFAULT_DTYPE = {"accelerate": "fp32", "bnb-int8": "int8", "bnb-4bit": "int4"}


def workload(engine: str, model: str = "tiny-llama", **options: Any) -> WorkloadSpec:
    return WorkloadSpec(
        kind="generate",
        model=model,
        engine=engine,
        engine_options=freeze_options(options, "engine_options"),
        dtype=DEFAULT_DTYPE.get(engine, "fp32"),
        new_tokens=NEW_TOKENS,
        prompt_tokens=5,
        rounds=3,
        warmup=1,
    )


@pytest.fixture
def cpu():
    return get_backend("cpu")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path)


def run(spec: WorkloadSpec, backend: Any, store: CheckpointStore) -> Record:
    return execute_fresh(spec, CONTEXT, backend, store)


# -- options: usage errors, one line, before any model is built ---------------------------------


@pytest.mark.parametrize(
    "engine, options, message",
    [
        ("accelerate", {"offload": "gpu"}, "engine_options['offload']='gpu': expected 'cpu' or"),
        ("accelerate", {"max_memory": "lots"}, "engine_options['max_memory']='lots': expected"),
        ("accelerate", {"max_memory": {"cpu": "lots"}}, "['max_memory']['cpu']='lots': expected"),
        ("accelerate", {"max_memory": {"gpu0": 1}}, "['max_memory'] key 'gpu0': expected"),
        ("accelerate", {"max_memory": {}}, "engine_options['max_memory']={}: expected a dict"),
        ("accelerate", {"offlaod": "disk"}, "engine_options['offlaod']: unknown option"),
        ("bnb-4bit", {"quant_type": "int3"}, "engine_options['quant_type']='int3': expected one"),
        ("bnb-4bit", {"compute_dtype": "fp8"}, "['compute_dtype']='fp8': expected one of bf16"),
        ("bnb-4bit", {"double_quant": "yes"}, "['double_quant']='yes': expected bool"),
        ("bnb-4bit", {"double_quant": 1}, "engine_options['double_quant']=1: expected bool"),
        ("bnb-int8", {"quant_type": "nf4"}, "unknown option for engine 'bnb-int8' (known: none)"),
    ],
)
def test_a_bad_engine_option_is_a_one_line_usage_error_naming_it(
    engine, options, message, cpu, store, tmp_path
):
    with pytest.raises(UsageError) as raised:
        run(workload(engine, **options), cpu, store)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not any(tmp_path.iterdir()), "nothing is written before the options are checked"


@pytest.mark.parametrize(
    "engine, dtype, message",
    [
        ("accelerate", "int8", "engine 'accelerate' runs fp32, fp16, bf16"),
        ("bnb-int8", "fp16", "engine 'bnb-int8' runs int8"),
        ("bnb-4bit", "int8", "engine 'bnb-4bit' runs int4"),
    ],
)
def test_a_dtype_the_engine_does_not_run_is_a_usage_error(engine, dtype, message, cpu, store):
    spec = WorkloadSpec(kind="generate", model="tiny-llama", engine=engine, dtype=dtype)
    with pytest.raises(UsageError, match=message):
        run(spec, cpu, store)


def test_max_memory_takes_byte_counts_and_sizes_with_units():
    assert parse_bytes(1024) == 1024
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("100B") == 100
    for bad in ("lots", "2 GiBs", "-1GB", "2gb", -1, True, 1.5, None):
        assert parse_bytes(bad) is None, bad


# -- skip reasons: what is missing, named --------------------------------------------------------


class NeuronLike(FakeBackend):
    name: ClassVar[str] = "fake-neuron"
    torch_device: ClassVar[str] = "xla"


class GaudiLike(FakeBackend):
    name: ClassVar[str] = "fake-gaudi"
    torch_device: ClassVar[str] = "hpu"


def pretend_installed(monkeypatch: pytest.MonkeyPatch, found: str | None) -> None:
    """bitsandbytes' installed version as importlib.metadata reports it (None: absent)."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist != "bitsandbytes":
            return real(dist)
        if found is None:
            raise importlib.metadata.PackageNotFoundError(dist)
        return found

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize("engine", ["bnb-int8", "bnb-4bit"])
def test_a_missing_bitsandbytes_is_a_skip_naming_the_package_and_the_extra(
    engine, monkeypatch, cpu, store
):
    pretend_installed(monkeypatch, None)
    with pytest.raises(SkipWorkload) as skipped:
        run(workload(engine), cpu, store)
    assert str(skipped.value) == (
        f"{engine} needs bitsandbytes ≥ 0.43 (pip install 'pytest-llmperf[bnb]'); "
        "it is not installed"
    )


def test_a_bitsandbytes_older_than_its_cpu_support_is_a_skip_with_both_versions(
    monkeypatch, cpu, store
):
    pretend_installed(monkeypatch, "0.45.5")
    with pytest.raises(SkipWorkload) as skipped:
        run(workload("bnb-4bit"), cpu, store)
    assert str(skipped.value) == (
        "bnb-4bit on cpu needs bitsandbytes ≥ 0.47 (pip install -U 'bitsandbytes>=0.47'); "
        "0.45.5 is installed"
    )


def test_a_cpu_without_avx2_is_a_skip(monkeypatch, cpu, store):
    monkeypatch.setattr(bnb, "_cpu_lacks_avx2", lambda: True)
    with pytest.raises(SkipWorkload, match="bnb-int8 on cpu needs AVX2"):
        run(workload("bnb-int8"), cpu, store)


@pytest.mark.parametrize(
    "engine, backend, options, devices, reason",
    [
        ("bnb-int8", NeuronLike, {}, 1, "bnb-int8 does not run on fake-neuron: bitsandbytes has"),
        ("bnb-4bit", NeuronLike, {}, 1, "no kernels for torch device 'xla' (it runs on cpu, "),
        ("bnb-4bit", GaudiLike, {"quant_type": "fp4"}, 1, "quant_type='fp4' does not run on hpu"),
        ("bnb-4bit", GaudiLike, {"quant_type": "nf4"}, 1, None),
        ("bnb-int8", FakeBackend, {}, 2, "engine 'bnb-int8' runs one process on one device"),
        ("accelerate", FakeBackend, {}, 4, "devices=4 runs one rank per device here"),
        ("accelerate", NeuronLike, {}, 1, "accelerate has no device_map placement for fake-neuron"),
    ],
)
def test_a_device_or_device_count_the_engine_cannot_use_is_a_skip_reason(
    engine, backend, options, devices, reason
):
    spec = workload(engine, **options)
    spec = WorkloadSpec.from_json({**spec.to_json(), "devices": devices})
    found = engines.get_engine(engine).unsupported(backend(), spec)
    if reason is None:
        assert found is None
    else:
        assert reason in found


def test_offloading_to_host_memory_on_the_cpu_backend_is_a_skip(cpu, store):
    with pytest.raises(SkipWorkload, match="offload='cpu' on cpu measures nothing"):
        run(workload("accelerate", offload="cpu"), cpu, store)


def test_importing_the_engines_imports_none_of_their_libraries():
    """Collection stays cheap: the libraries load on the first measurement."""
    code = (
        "import sys, pytest_llmperf.engines.accelerate, pytest_llmperf.engines.bnb\n"
        "print(sorted({'accelerate', 'bitsandbytes', 'transformers', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- running for real on this CPU ------------------------------------------------------------------

RUNS = [
    pytest.param("accelerate", {}, id="accelerate"),
    pytest.param("accelerate", {"offload": "disk"}, id="accelerate-disk"),
    pytest.param("bnb-int8", {}, id="bnb-int8"),
    pytest.param("bnb-4bit", {}, id="bnb-4bit-nf4"),
    pytest.param(
        "bnb-4bit",
        {"quant_type": "fp4", "compute_dtype": "fp32", "double_quant": True},
        id="bnb-4bit-fp4-fp32-double",
    ),
]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("engine, options", RUNS)
def test_every_engine_generates_exactly_the_asked_tokens_stamped_one_by_one(
    engine, options, model, cpu, store
):
    record = run(workload(engine, model, **options), cpu, store)
    assert record.outcome == "ok"
    assert len(record.output_head) == NEW_TOKENS
    assert record.value("load_time_s") > 0
    # The token hook fired once per token in every round (else no ttft/tpot at all), and the
    # stamps explain the call: prefill + (n-1) decode steps is the whole generate, give or
    # take generate's bookkeeping after the last token. The best round is compared, so a
    # neighbour's burst on this shared CPU cannot fail the test.
    e2e = record.metrics["e2e_latency_s"].samples
    ttft = record.metrics["ttft_s"].samples
    tpot = record.metrics["tpot_s"].samples
    assert len(e2e) == len(ttft) == len(tpot) == 3
    best = min(abs(e - (f + (NEW_TOKENS - 1) * p)) / e for e, f, p in zip(e2e, ttft, tpot))
    assert best < 0.1
    assert record.note.split(";")[0]  # how the engine ran leads the record's note


def test_disk_offload_runs_through_accelerates_hooks_and_changes_no_token(cpu, store):
    spec = workload("accelerate", "tiny-llama", offload="disk")
    engine = engines.get_engine("accelerate")
    loaded = engine.load(models.get("tiny-llama"), spec, cpu, store)
    try:
        places = set(loaded.model.hf_device_map.values())
        assert places == {"cpu", "disk"}, loaded.model.hf_device_map
        hooks = [getattr(m, "_hf_hook", None) for m in loaded.model.modules()]
        assert any(getattr(h, "offload", False) for h in hooks), "no module offloads weights"
        assert "disk" in loaded.note and loaded.note.startswith("device_map=auto: cpu ")
    finally:
        loaded.close()
    assert not any((store.root / "scratch").iterdir()), "close() removes the offload folder"

    digests = {
        name: run(replace_engine(spec, engine_name, opts), cpu, store).output_digest
        for name, (engine_name, opts) in {
            "transformers": ("transformers", {}),
            "accelerate": ("accelerate", {}),
            "accelerate+disk": ("accelerate", {"offload": "disk"}),
        }.items()
    }
    assert len(set(digests.values())) == 1, digests


def test_a_max_memory_below_the_model_sends_the_rest_to_disk(cpu, store):
    spec = workload("accelerate", "tiny-bloom", max_memory={"cpu": "550KiB"})
    record = run(spec, cpu, store)
    assert record.outcome == "ok" and len(record.output_head) == NEW_TOKENS
    assert record.note.startswith("device_map=auto: cpu ") and " disk " in record.note


def replace_engine(spec: WorkloadSpec, engine: str, options: dict[str, Any]) -> WorkloadSpec:
    return WorkloadSpec.from_json({**spec.to_json(), "engine": engine, "engine_options": options})


@pytest.mark.parametrize(
    "engine, stored_dtype", [("accelerate", "fp32"), ("bnb-int8", "fp16"), ("bnb-4bit", "bf16")]
)
def test_weights_load_from_the_stores_checkpoint_written_once(
    engine, stored_dtype, monkeypatch, cpu, store
):
    builds = []
    real_build = weights.build_model

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        builds.append(args[0].id)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(weights, "build_model", counting_build)
    model = models.get("tiny-bloom")
    spec = workload(engine, "tiny-bloom")
    directory = weights.seeded_dir(store.root, model, stored_dtype, 0)
    for _ in range(2):
        loaded = engines.get_engine(engine).load(model, spec, cpu, store)
        # transformers' own loader read this directory: load_time_s is real file I/O.
        assert Path(loaded.model.config._name_or_path) == directory
        assert loaded.weight_source == "seed:0" and loaded.load_time_s > 0
        if loaded.close is not None:
            loaded.close()
    assert builds == ["tiny-bloom"], "the second load reuses the written checkpoint"


@pytest.mark.parametrize("engine, dtype", [("bnb-int8", "int8"), ("bnb-4bit", "int4")])
def test_quantized_weights_take_what_the_catalog_estimates(engine, dtype, cpu, store):
    model = models.get("tiny-bloom")
    loaded = engines.get_engine(engine).load(model, workload(engine, "tiny-bloom"), cpu, store)
    estimate = model.weight_bytes(dtype)
    # 4-bit absmax scales live in bitsandbytes' quant state, not in parameters: the loaded
    # bytes fall short of the estimate by them (4 bytes per 64 weights).
    assert 0.95 * estimate <= loaded.weight_bytes <= estimate
    assert loaded.weight_bytes < model.weight_bytes("fp16")
    assert "linear layers in " + ("int8" if dtype == "int8" else "nf4") in loaded.note


@pytest.mark.parametrize("engine", ["accelerate", "bnb-int8"])
def test_a_checkpoint_the_cache_cannot_hold_is_a_skip_naming_the_option(engine, cpu, tmp_path):
    """These engines load from disk or not at all: no silent in-memory fallback."""
    small = CheckpointStore(tmp_path, max_bytes=1024)
    with pytest.raises(SkipWorkload) as skipped:
        run(workload(engine, "tiny-bloom"), cpu, small)
    assert str(skipped.value).startswith(f"engine {engine!r} loads from a checkpoint on disk: ")
    assert "--llmperf-cache-size" in str(skipped.value)


def test_offloading_is_not_refused_for_weights_larger_than_the_device():
    """Offloading exists for models bigger than the device: the pre-check must not skip them
    as 'cannot load', while a plain accelerate load of the same model still counts it all."""
    engine = engines.get_engine("accelerate")
    big = models.get("bloomz-7b1")
    offload = WorkloadSpec(
        kind="generate",
        model="bloomz-7b1",
        engine="accelerate",
        engine_options=freeze_options({"offload": "disk"}, "opts"),
        dtype="bf16",
    )
    plain = WorkloadSpec(kind="generate", model="bloomz-7b1", engine="accelerate", dtype="bf16")
    assert engine.device_weight_bytes(big, offload) == 0
    assert engine.device_weight_bytes(big, plain) == big.weight_bytes("bf16")
    assert engine.memory_need(big, offload, 1000) == 1000
