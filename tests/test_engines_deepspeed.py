"""The DeepSpeed engines: deepspeed-inference (init_inference, AutoTP, kernels where they run)
and deepspeed-zero (ZeRO-3 partitioned at load, offloaded to CPU or NVMe).

DeepSpeed keeps process-global state (its accelerator, a process group, transformers' ZeRO-3
switch), so the pytest process never imports it: option and skip decisions are tested here
against fake accelerators and fake ``deepspeed`` packages on ``sys.path``, and the real library
runs in child processes — a ``python -c`` script calling ``execute()`` on the real cpu backend
(``run_real``), and a pytester project whose auto launcher picks the process launcher.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from fakes import FakeBackend, SegfaultEngine
from helpers import read_results, record_of

from pytest_llmperf import engines, models
from pytest_llmperf.backends import get_backend
from pytest_llmperf.backends.base import Backend
from pytest_llmperf.engines import deepspeed_inference as dsi
from pytest_llmperf.engines import deepspeed_zero as dsz
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.execute import resolve
from pytest_llmperf.launchers import Launchers, LaunchSettings, _choose_name
from pytest_llmperf.settings import WORKER_IMPORTS_ENV
from pytest_llmperf.spec import RecordContext, WorkloadSpec, freeze_options

CONTEXT = RecordContext(key="test_ds", suite="test_s", device_key="cpu-test")
DEEPSPEED_INSTALLED = importlib.util.find_spec("deepspeed") is not None


def _torch_extensions_dir() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


#: Where DeepSpeed's JIT-built ops (its shared-memory comm op: ~30 s to build) are cached, read
#: before pytester points HOME at a fresh folder, so a pytester project's children reuse them.
TORCH_EXTENSIONS_DIR = _torch_extensions_dir()


def spec_of(engine: str, **fields: Any) -> WorkloadSpec:
    options = fields.pop("options", None)
    base: dict[str, Any] = {"kind": "generate", "model": "tiny-llama", "engine": engine}
    base.update(fields)
    return WorkloadSpec(**base, engine_options=freeze_options(options, "engine_options"))


# -- fakes of DeepSpeed's accelerator API ------------------------------------------------------


class FakeBuilder:
    def __init__(self, name: str, compatible: bool = True) -> None:
        self.NAME = name
        self.compatible = compatible

    def is_compatible(self, verbose: bool = False) -> bool:
        return self.compatible


class FakeAccelerator:
    """``get_accelerator()``'s answers: device name, dtypes, op builders."""

    def __init__(
        self, name: str = "cpu", dtypes: Optional[list[Any]] = None, **builders: FakeBuilder
    ) -> None:
        import torch

        self.name = name
        self.dtypes = dtypes if dtypes is not None else [torch.float32, torch.bfloat16]
        self.builders = builders

    def device_name(self) -> str:
        return self.name

    def supported_dtypes(self) -> list[Any]:
        return self.dtypes

    def create_op_builder(self, op: str) -> Optional[FakeBuilder]:
        return self.builders.get(op, FakeBuilder("deepspeed_not_implemented"))


#: load() raises its skip before it touches the checkpoint store.
NO_STORE: Any = None
POLICIES = lambda: ["BLOOMLayerPolicy", "HFGPT2LayerPolicy", "LLAMALayerPolicy"]  # noqa: E731


@pytest.fixture
def fake_deepspeed(tmp_path, monkeypatch):
    """A ``deepspeed`` package of our own first on sys.path (the real one, if any, hidden):
    write its ``__init__.py`` with ``fake_deepspeed(source)``."""
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] == "deepspeed"}
    for name in saved:
        del sys.modules[name]
    root = tmp_path / "fake_site"
    (root / "deepspeed").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(root))

    def write(source: str, accelerator: str = "") -> Path:
        (root / "deepspeed" / "__init__.py").write_text(textwrap.dedent(source))
        if accelerator:
            (root / "deepspeed" / "accelerator.py").write_text(textwrap.dedent(accelerator))
        importlib.invalidate_caches()
        return root

    write("")
    yield write
    for name in [k for k in sys.modules if k.split(".")[0] == "deepspeed"]:
        del sys.modules[name]
    sys.modules.update(saved)


# -- registration, and where the engines run ----------------------------------------------------


def test_both_engines_are_implemented_and_declare_they_may_crash():
    for name in ("deepspeed-inference", "deepspeed-zero"):
        engine = engines.get_engine(name)
        assert engine.name == name and engine.may_crash
        assert name in engines.implemented()


@pytest.mark.parametrize("engine", ["deepspeed-inference", "deepspeed-zero"])
def test_the_auto_launcher_runs_a_deepspeed_engine_in_a_child_process(engine):
    assert _choose_name(spec_of(engine), "auto") == "process"
    # Several devices: DeepSpeed's launcher where it is installed, else torchrun's ranks.
    ranks = "deepspeed" if DEEPSPEED_INSTALLED else "torchrun"
    assert _choose_name(spec_of(engine, devices=2), "auto") == ranks
    # Asked for explicitly, inline is honoured: the user takes the risk.
    assert _choose_name(spec_of(engine), "inline") == "inline"


def test_deciding_a_deepspeed_workload_imports_neither_deepspeed_nor_transformers():
    """resolve() runs in the pytest process before any launcher: it must stay clean."""
    script = """
        import sys
        from pytest_llmperf.backends import get_backend
        from pytest_llmperf.execute import resolve
        from pytest_llmperf.spec import WorkloadSpec
        for engine in ("deepspeed-inference", "deepspeed-zero"):
            try:
                resolve(WorkloadSpec(kind="generate", model="tiny-llama", engine=engine),
                        get_backend("cpu"))
            except Exception as exc:  # a skip where deepspeed is missing is fine here
                print(type(exc).__name__, exc)
        print(sorted(m for m in ("deepspeed", "transformers") if m in sys.modules))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_an_engine_that_may_crash_is_isolated_by_default_and_its_segfault_is_an_error_record(
    monkeypatch, tmp_path
):
    """The auto launcher picks a child for a may_crash engine; the child dying of SIGSEGV is an
    ``error`` record with the signal and the stderr tail, and the session goes on."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(WORKER_IMPORTS_ENV, "fakes:register_all")
    monkeypatch.setattr(SegfaultEngine, "may_crash", True)
    engines.register(SegfaultEngine())
    spec = WorkloadSpec(kind="generate", model="tiny-bloom", engine="fake-segfault", new_tokens=4)
    launchers = Launchers(LaunchSettings(cache_dir=tmp_path, timeout=120))
    try:
        launcher = launchers.choose(spec, "auto")
        assert launcher.name == "process"
        record = launcher.run(spec, CONTEXT, FakeBackend())
    finally:
        launchers.close()
    assert record.outcome == "error"
    assert "worker died with SIGSEGV (signal 11); stderr tail:" in record.note
    assert "fake: about to dereference a bad pointer" in record.note


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine, options, message",
    [
        (
            "deepspeed-inference",
            {"offload": "cpu"},
            "engine_options['offload']: unknown option for engine 'deepspeed-inference' "
            "(known: kernel_inject)",
        ),
        (
            "deepspeed-inference",
            {"kernel_inject": "yes"},
            "engine_options['kernel_inject']='yes': expected bool for engine 'deepspeed-inference'",
        ),
        (
            "deepspeed-zero",
            {"kernel_inject": True},
            "engine_options['kernel_inject']: unknown option for engine 'deepspeed-zero' "
            "(known: nvme_path, offload)",
        ),
        (
            "deepspeed-zero",
            {"nvme_path": 3},
            "engine_options['nvme_path']=3: expected str for engine 'deepspeed-zero'",
        ),
        (
            "deepspeed-zero",
            {"offload": "gpu"},
            "engine_options['offload']='gpu': expected one of cpu, nvme, none for engine "
            "'deepspeed-zero'",
        ),
        (
            "deepspeed-zero",
            {"nvme_path": "/no/such/llmperf-nvme"},
            "engine_options['nvme_path']='/no/such/llmperf-nvme': no such directory",
        ),
        (
            "deepspeed-zero",
            {"offload": "nvme"},
            "engine_options['offload']='nvme' needs a directory on the NVMe drive: "
            "--llmperf-nvme-path (the node's) or engine_options['nvme_path']",
        ),
        (
            "deepspeed-zero",
            {"offload": "cpu", "nvme_path": "/tmp"},
            "engine_options['nvme_path'] is for offload='nvme', not offload='cpu'",
        ),
    ],
)
def test_a_bad_engine_option_is_a_one_line_usage_error_naming_it(engine, options, message):
    with pytest.raises(UsageError) as info:
        resolve(spec_of(engine, options=options), get_backend("cpu"))
    text = str(info.value)
    assert text.startswith("llmperf.generate(engine_options=...): ")
    assert message in text and "\n" not in text


def test_the_nodes_nvme_path_serves_offload_nvme_workloads_without_entering_their_key(
    project: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--llmperf-nvme-path is where this node's drive is mounted: a workload asks for
    offload='nvme' (that is in its key), the node says where."""
    monkeypatch.delenv(dsz.NVME_PATH_ENV, raising=False)
    project.makepyfile(test_x="def test_x():\n    pass\n")
    bad = project.runpytest(f"--llmperf-nvme-path={tmp_path / 'nope'}")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--llmperf-nvme-path" in bad.stderr.str() and "no such directory" in bad.stderr.str()
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the plugin exports it for children
    project.runpytest(f"--llmperf-nvme-path={tmp_path}").assert_outcomes(passed=1)
    assert os.environ[dsz.NVME_PATH_ENV] == str(tmp_path)
    engines.get_engine("deepspeed-zero").check_options({"offload": "nvme"})  # no error now
    assert dsz.nvme_path({"offload": "nvme"}) == tmp_path


def test_an_nvme_path_that_cannot_be_written_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=r"engine_options\['nvme_path'\]=.*: directory is not"):
        engines.get_engine("deepspeed-zero").check_options({"nvme_path": str(tmp_path)})


def test_int8_without_kernel_injection_cannot_exist_so_it_is_a_usage_error():
    spec = spec_of("deepspeed-inference", dtype="int8", options={"kernel_inject": False})
    with pytest.raises(UsageError, match=r"kernel_inject'\]=False: deepspeed-inference quantizes"):
        resolve(spec, get_backend("cpu"))


def test_a_dtype_the_engine_does_not_run_is_a_usage_error():
    with pytest.raises(UsageError, match="engine 'deepspeed-zero' runs fp32, fp16, bf16"):
        resolve(spec_of("deepspeed-zero", dtype="int8"), get_backend("cpu"))


# -- skips decided without importing DeepSpeed ---------------------------------------------------

MISSING = "needs deepspeed>=0.14, which is not installed (pip install 'pytest-llmperf[deepspeed]')"


@pytest.mark.parametrize("engine", ["deepspeed-inference", "deepspeed-zero"])
def test_a_missing_deepspeed_is_a_skip_naming_package_version_and_install_hint(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert engines.get_engine(engine).unsupported(get_backend("cpu"), spec_of(engine)) == (
        f"{engine} {MISSING}"
    )
    with pytest.raises(SkipWorkload, match=r"needs deepspeed>=0\.14, which is not installed"):
        dsi.import_deepspeed(engine, get_backend("cpu"))


def test_a_deepspeed_older_than_the_floor_is_a_skip_with_the_version_found(
    fake_deepspeed, monkeypatch
):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "0.12.6" if name == "deepspeed" else real(name)
    )
    assert dsi.install_reason("deepspeed-zero") == (
        "deepspeed-zero needs deepspeed>=0.14, found 0.12.6 "
        "(pip install 'pytest-llmperf[deepspeed]')"
    )


def test_a_deepspeed_that_cannot_be_imported_is_a_skip_with_the_errors_first_line(
    fake_deepspeed,
):
    fake_deepspeed(
        """
        raise ImportError("libcudart.so.12: cannot open shared object file\\nsecond line")
        """
    )
    with pytest.raises(SkipWorkload) as info:
        dsi.import_deepspeed("deepspeed-zero", get_backend("cpu"))
    assert str(info.value) == (
        "deepspeed-zero: deepspeed is installed but cannot be imported: ImportError: "
        "libcudart.so.12: cannot open shared object file"
    )


def test_deepspeed_is_imported_with_the_backends_accelerator_and_a_mismatch_is_a_skip(
    fake_deepspeed, monkeypatch
):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    fake_deepspeed(
        """
        import logging, os, types
        SEEN = os.environ.get("DS_ACCELERATOR")
        utils = types.SimpleNamespace(logger=logging.getLogger("fake-deepspeed"))
        """,
        accelerator="""
        class _Accelerator:
            def device_name(self):
                return "cuda"

        def get_accelerator():
            return _Accelerator()
        """,
    )
    with pytest.raises(SkipWorkload) as info:
        dsi.import_deepspeed("deepspeed-inference", get_backend("cpu"))
    assert str(info.value) == (
        "deepspeed-inference: DeepSpeed already runs its 'cuda' accelerator in this process (it "
        "picks one per process), this workload runs on cpu: use launcher='process' or "
        "DS_ACCELERATOR=cpu"
    )
    # The cpu backend asked DeepSpeed for its cpu accelerator, for the import only.
    assert sys.modules["deepspeed"].SEEN == "cpu"
    assert "DS_ACCELERATOR" not in os.environ


def test_tensor_parallel_on_the_cpu_backend_is_refused_because_it_segfaulted(fake_deepspeed):
    engine = engines.get_engine("deepspeed-inference")
    reason = engine.unsupported(get_backend("cpu"), spec_of("deepspeed-inference", devices=2))
    assert reason == (
        "DeepSpeed AutoTP over 2 ranks on the cpu backend is not supported: it died with SIGSEGV "
        "in DeepSpeed's shared-memory inference_all_reduce (DeepSpeed 0.19.8, gloo)"
    )
    assert engine.unsupported(get_backend("cpu"), spec_of("deepspeed-inference")) is None


def test_int8_on_the_cpu_backend_is_a_skip_saying_why(fake_deepspeed):
    reason = engines.get_engine("deepspeed-inference").unsupported(
        get_backend("cpu"), spec_of("deepspeed-inference", dtype="int8")
    )
    assert reason == (
        "deepspeed-inference int8 is quantized inside DeepSpeed's injected transformer_inference "
        "kernels, which its cpu accelerator does not implement"
    )


def test_zero_on_several_cpu_ranks_is_not_refused(fake_deepspeed):
    """ZeRO-3 with two gloo ranks generated correctly here; only AutoTP's all-reduce crashed."""
    engine = engines.get_engine("deepspeed-zero")
    assert engine.unsupported(get_backend("cpu"), spec_of("deepspeed-zero", devices=2)) is None


def test_a_backend_deepspeed_has_no_accelerator_for_is_a_skip(fake_deepspeed):
    class XlaBackend(Backend):
        name = "neuron"
        torch_device = "xla"

    for engine in ("deepspeed-inference", "deepspeed-zero"):
        assert engines.get_engine(engine).unsupported(XlaBackend(), spec_of(engine)) == (
            f"{engine}: DeepSpeed has no accelerator for the neuron backend"
        )


# -- decisions DeepSpeed's accelerator answers (fakes) ------------------------------------------


def test_a_dtype_the_accelerator_does_not_list_is_a_skip_before_loading(monkeypatch, tmp_path):
    """DeepSpeed's cpu accelerator lists fp16 only where oneDNN has it (not on this host)."""
    accelerator = FakeAccelerator("cpu")
    monkeypatch.setattr(dsz, "import_deepspeed", lambda *a: (SimpleNamespace(), accelerator))
    with pytest.raises(SkipWorkload) as info:
        engines.get_engine("deepspeed-zero").load(
            models.get("tiny-llama"),
            spec_of("deepspeed-zero", dtype="fp16"),
            get_backend("cpu"),
            NO_STORE,
        )
    assert str(info.value) == (
        "deepspeed-zero: DeepSpeed's cpu accelerator runs float32, bfloat16 on this machine, "
        "not fp16"
    )


def test_nvme_offload_without_a_usable_async_io_op_is_a_skip_saying_what_to_install(
    monkeypatch, tmp_path
):
    accelerator = FakeAccelerator("cpu", AsyncIOBuilder=FakeBuilder("async_io", compatible=False))
    deepspeed = SimpleNamespace(git_version_info=SimpleNamespace(installed_ops={"async_io": False}))
    monkeypatch.setattr(dsz, "import_deepspeed", lambda *a: (deepspeed, accelerator))
    spec = spec_of("deepspeed-zero", options={"nvme_path": str(tmp_path)})
    with pytest.raises(SkipWorkload) as info:
        engines.get_engine("deepspeed-zero").load(
            models.get("tiny-llama"),
            spec,
            get_backend("cpu"),
            NO_STORE,
        )
    assert str(info.value) == (
        "deepspeed-zero: NVMe offload needs DeepSpeed's async_io op, which cannot be built here: "
        "libaio (headers and library) not found; install libaio-dev (apt) or libaio-devel (yum)"
    )
    # Built when DeepSpeed was installed, it needs no headers: usable.
    assert dsz.aio_reason(accelerator, prebuilt=True) is None
    assert dsz.aio_reason(FakeAccelerator("mps"), prebuilt=False) == (
        "DeepSpeed's mps accelerator has no async_io op"
    )


def test_kernel_injection_needs_kernels_a_policy_a_dtype_and_a_transformers_it_works_with():
    import torch

    cuda = FakeAccelerator(
        "cuda",
        [torch.float32, torch.float16],
        InferenceBuilder=FakeBuilder("transformer_inference"),
    )

    def reason(accelerator: Any, family: str, dtype: str, version: str = "4.35.2") -> Any:
        return dsi.kernel_inject_reason(accelerator, family, dtype, version, POLICIES)

    assert reason(cuda, "llama", "fp16") is None
    assert reason(cuda, "bloom", "fp16") is None
    assert reason(FakeAccelerator("cpu"), "llama", "fp32") == (
        "DeepSpeed's cpu accelerator has no transformer_inference kernels"
    )
    broken = FakeAccelerator(
        "cuda", InferenceBuilder=FakeBuilder("transformer_inference", compatible=False)
    )
    assert reason(broken, "llama", "fp16") == (
        "DeepSpeed's transformer_inference op cannot be built on this machine"
    )
    assert reason(cuda, "mixtral", "fp16") == (
        "DeepSpeed has no kernel-injection policy for mixtral models"
    )
    assert reason(cuda, "bloom", "bf16") == "DeepSpeed's BLOOM kernels run fp16 only, not bf16"
    assert reason(cuda, "llama", "fp16", "5.23.0") == (
        "transformers 5.23.0 (≥ 4.36) keeps KV caches in Cache objects and DeepSpeed's injected "
        "layers return tuples (DeepSpeed issue #5388)"
    )


def test_kernel_injection_asked_for_where_it_cannot_run_is_a_skip_not_a_silent_autotp_number(
    monkeypatch,
):
    import torch

    accelerator = FakeAccelerator("cuda", [torch.float32, torch.float16])
    monkeypatch.setattr(dsi, "import_deepspeed", lambda *a: (SimpleNamespace(), accelerator))
    engine = engines.get_engine("deepspeed-inference")
    forced = spec_of("deepspeed-inference", dtype="fp16", options={"kernel_inject": True})
    with pytest.raises(SkipWorkload) as info:
        engine.load(models.get("tiny-llama"), forced, get_backend("cpu"), NO_STORE)
    assert str(info.value) == (
        "deepspeed-inference: kernel injection (kernel_inject=True) cannot run: DeepSpeed's cuda "
        "accelerator has no transformer_inference kernels"
    )
    # DeepSpeed 0.19.8 lists no int8 on any accelerator: init_inference would refuse it.
    int8 = spec_of("deepspeed-inference", dtype="int8")
    with pytest.raises(
        SkipWorkload, match="accelerator runs float32, float16 on this machine, not int8"
    ):
        engine.load(models.get("tiny-llama"), int8, get_backend("cpu"), NO_STORE)


def test_zero_config_follows_the_seed_posts_script_and_the_chosen_offload(tmp_path):
    bloom = models.get("bloom-176b")
    spec = spec_of("deepspeed-zero", model="bloom-176b", dtype="bf16", batch_size=8)
    cpu = dsz.zero_config(bloom, spec, "cpu", None, pin=False)
    zero = cpu["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert isinstance(zero["stage3_prefetch_bucket_size"], int)
    assert cpu["bf16"] == {"enabled": True} and cpu["fp16"] == {"enabled": False}
    assert cpu["train_micro_batch_size_per_gpu"] == 8
    nvme = dsz.zero_config(bloom, spec, "nvme", tmp_path, pin=True)["zero_optimization"]
    # BLOOM-176B's embedding (250880 x 14336) must fit one swap buffer.
    assert nvme["offload_param"]["buffer_size"] >= 250880 * 14336
    assert nvme["offload_param"]["nvme_path"] == str(tmp_path)
    assert (
        "offload_param" not in dsz.zero_config(bloom, spec, "none", None, True)["zero_optimization"]
    )


def test_zero_counts_offloaded_weights_off_the_device_one_kv_cache_per_rank_and_says_so():
    engine = engines.get_engine("deepspeed-zero")
    model = models.get("tiny-llama")
    two = spec_of("deepspeed-zero", devices=2, batch_size=4)
    # Offloaded (the default), the weights need no device memory; partitioned on the devices
    # they all do.
    assert engine.memory_need(model, two, 1000) == 2000
    on_devices = spec_of("deepspeed-zero", devices=2, options={"offload": "none"})
    assert engine.memory_need(model, on_devices, 1000) == model.weight_bytes("fp32") + 2000
    assert dsz._resident_bytes(100, "cpu", get_backend("cpu")) == 100
    assert dsz._resident_bytes(100, "cpu", get_backend("cuda")) == 0
    assert dsz._resident_bytes(100, "nvme", get_backend("cpu")) == 0
    note = dsz._note(two, "cpu", None)
    assert note.startswith("deepspeed-zero: ZeRO-3, parameters offloaded to cpu; each of the 2 ")
    assert "tokens_per_s and ms_per_token are per rank" in note


# -- the real library, in child processes ---------------------------------------------------------

REAL = """
import json, sys
from pathlib import Path
from pytest_llmperf.backends import get_backend
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.spec import RecordContext, WorkloadSpec

root, engine, new_tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
backend = get_backend("cpu")
cache = ModelCache(store=CheckpointStore(root))
context = RecordContext(key="k", suite="s", device_key="cpu")
# Transformers after DeepSpeed in one process: a leaked ZeRO-3 switch would partition it.
for model in ("tiny-llama", "tiny-bloom"):
    for name in (engine, "transformers"):
        spec = WorkloadSpec(kind="generate", model=model, engine=name, new_tokens=new_tokens,
                            rounds=2, warmup=1)
        record = execute(spec, context, backend, cache)
        print("@@" + json.dumps({"model": model, "engine": name, **record.to_json()}), flush=True)
cache.drop(backend)
"""


def run_real(engine: str, root: Path, new_tokens: int) -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", REAL, str(root), engine, str(new_tokens)],
        capture_output=True,
        text=True,
        timeout=900,  # the first DeepSpeed process on a machine JIT-builds its shm comm op
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line[2:]) for line in out.stdout.splitlines() if line.startswith("@@")]
    return {(row["model"], row["engine"]): row for row in rows}


NOTES = {
    "deepspeed-inference": "deepspeed-inference: kernel injection off: DeepSpeed's cpu "
    "accelerator has no transformer_inference kernels",
    "deepspeed-zero": "deepspeed-zero: ZeRO-3, parameters offloaded to cpu",
}


@pytest.mark.skipif(not DEEPSPEED_INSTALLED, reason="deepspeed is not installed")
@pytest.mark.parametrize("engine", ["deepspeed-inference", "deepspeed-zero"])
def test_a_real_deepspeed_engine_stamps_every_token_and_generates_what_transformers_does(
    engine, tmp_path
):
    n = 12
    rows = run_real(engine, tmp_path, n)
    for model in ("tiny-llama", "tiny-bloom"):
        ds, plain = rows[(model, engine)], rows[(model, "transformers")]
        assert ds["outcome"] == "ok" and plain["outcome"] == "ok", (ds["note"], plain["note"])
        assert ds["note"].startswith(NOTES[engine])
        assert "token hook fired" not in ds["note"]
        assert len(ds["output_head"]) == n  # exactly n new tokens (checked every round too)
        metrics = {k: v["samples"] for k, v in ds["metrics"].items()}
        assert len(metrics["e2e_latency_s"]) == 2
        for e2e, ttft, tpot in zip(metrics["e2e_latency_s"], metrics["ttft_s"], metrics["tpot_s"]):
            assert ttft > 0 and tpot > 0
            assert abs(ttft + (n - 1) * tpot - e2e) / e2e < 0.05, (e2e, ttft, tpot)
        # Neither AutoTP at tp_size=1 nor ZeRO's gathering changes the arithmetic: same greedy
        # tokens, same digest (the weight source, seed:0, is the same too).
        assert ds["output_head"] == plain["output_head"]
        assert ds["output_digest"] == plain["output_digest"]
        assert plain["note"] == "" or "deepspeed" not in plain["note"]


@pytest.mark.skipif(not DEEPSPEED_INSTALLED, reason="deepspeed is not installed")
def test_a_suite_using_deepspeed_zero_runs_it_in_a_child_and_records_how_it_ran(
    project, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    # Writing a checkpoint in this process (transformers' save_pretrained unwraps the model
    # through accelerate, which imports deepspeed when installed) may have imported it already.
    monkeypatch.setenv("DS_WAS_IMPORTED", "1" if "deepspeed" in sys.modules else "")
    project.makepyfile(
        test_zero="""
        import os, sys

        def test_zero(llmperf):
            r = llmperf.generate(model="tiny-llama", engine="deepspeed-zero", new_tokens=4,
                                 rounds=5, warmup=1)
            assert r.ok, r.note
            # The auto launcher ran it in a child: this process did not import DeepSpeed.
            if not os.environ["DS_WAS_IMPORTED"]:
                assert "deepspeed" not in sys.modules
        """
    )
    result = project.runpytest(
        "--llmperf-backend=cpu", f"--llmperf-cache-dir={tmp_path / 'cache'}", "--llmperf-report=r"
    )
    result.assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "r"), "test_zero")
    assert record["outcome"] == "ok"
    assert record["note"].startswith("deepspeed-zero: ZeRO-3, parameters offloaded to cpu")
