"""Benchmarking your own model: a checkpoint directory, an HF id in the local cache, a name the
project registered (directory, HF id or config.json alone), and every way those go wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FAKE, baseline_file, no_traceback, one_line_error

from pytest_llmperf import backends, models
from pytest_llmperf.errors import UsageError
from pytest_llmperf.execute import ModelCache, execute, model_of
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.runner import LLMPerf
from pytest_llmperf.runner import TestContext as Context
from pytest_llmperf.spec import RecordContext, WorkloadSpec


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``save_pretrained`` checkpoint of the tiny Llama (seeded weights, no llmperf marker:
    to the plugin it is a user's fine-tune)."""
    model, _ = models.build_model(models.get("tiny-llama"), "fp32", seed=3)
    directory = tmp_path_factory.mktemp("ckpt") / "my-llama"
    model.save_pretrained(str(directory))
    return directory


def config_file(tmp_path: Path, model_id: str = "tiny-mixtral", **changes: object) -> Path:
    cfg = {**models.get(model_id).config_dict(), **changes}
    path = tmp_path / "shape" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def hf_snapshot(cache: Path, hf_id: str, source: Path, weights: bool = True) -> Path:
    """The layout huggingface_hub writes: refs/main names the snapshot."""
    repo = cache / ("models--" + hf_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name, encoding="utf-8")
    for f in source.iterdir():
        if weights or not f.name.endswith(".safetensors"):
            shutil.copy(f, snapshot / f.name)
    return snapshot


def run(spec: WorkloadSpec, store: Path):
    context = RecordContext(key="k", suite="s", device_key="cpu-test")
    cache = ModelCache(store=CheckpointStore(store))
    return execute(spec, context, backends.get_backend("cpu"), cache)


def generate_spec(model: models.ModelSpec, **kw: object) -> WorkloadSpec:
    source = None if model.source == "catalog" else json.dumps(model.to_json(), sort_keys=True)
    values = {"new_tokens": 4, "rounds": 5, "warmup": 1, "prompt": "hello there", **kw}
    return WorkloadSpec(kind="generate", model=model.id, model_source=source, **values)  # type: ignore[arg-type]


# --- resolution -------------------------------------------------------------------------------


def test_a_catalog_id_is_the_catalog_entry():
    assert models.lookup("tiny-llama") == models.get("tiny-llama")


def test_a_checkpoint_directory_is_measured_from_its_own_weights(saved_llama, tmp_path):
    spec = models.lookup(str(saved_llama))
    assert (spec.source, spec.family, spec.location) == ("directory", "llama", str(saved_llama))
    assert spec.id == str(saved_llama)  # the name as written is the key, not a resolved path
    record = run(generate_spec(spec), tmp_path)
    assert record.outcome == "ok", record.note
    assert record.value("load_time_s") > 0
    # The weight source names the model and a content hash (the digest follows the weights).
    reference = run(generate_spec(models.get("tiny-llama"), seed=3, dtype="fp32"), tmp_path)
    assert record.output_head == reference.output_head  # same weights, same greedy tokens
    assert record.output_digest != reference.output_digest


def test_a_relative_path_is_kept_as_written_and_resolved_for_other_processes(
    saved_llama, monkeypatch
):
    monkeypatch.chdir(saved_llama.parent)
    handle = LLMPerf(
        backends.get_backend("cpu"),
        Context("k", "s", "n", rounds=5, warmup=1, device_key="d", provenance={}),
    )
    source = json.loads(handle.model_source("generate", "my-llama") or "{}")
    assert source["id"] == "my-llama" and source["location"] == str(saved_llama.resolve())


def test_a_config_alone_is_a_shape_with_seeded_weights(tmp_path):
    spec = models.lookup(str(config_file(tmp_path)))
    assert (spec.source, spec.family) == ("config", "mixtral")
    assert spec.param_count() == models.get("tiny-mixtral").param_count()
    record = run(generate_spec(spec), tmp_path)
    assert record.outcome == "ok", record.note
    # Written once into the cache under a name made from the path and the config's hash.
    (written,) = (tmp_path / "weights").iterdir()
    assert written.name.endswith("-fp32-seed0-g1") and "/" not in written.name


def test_an_unknown_architecture_is_counted_on_the_meta_device(tmp_path):
    """Any AutoModelForCausalLM architecture works, not only the catalog's families."""
    cfg = {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": 512,
        "max_position_embeddings": 256,
    }
    path = tmp_path / "neox.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    spec = models.lookup(str(path))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**cfg)
        )
    assert spec.param_count() == sum(p.numel() for p in model.parameters())
    shape = spec.shape()
    assert (shape.num_layers, shape.num_heads, shape.max_positions) == (2, 4, 256)


def test_an_hf_id_complete_in_the_local_cache_is_used_never_downloaded(saved_llama, empty_hf_cache):
    snapshot = hf_snapshot(empty_hf_cache, "acme/llama-ft", saved_llama)
    spec = models.lookup("acme/llama-ft")
    assert (spec.source, spec.hf_id, spec.location) == ("hf-cache", "acme/llama-ft", str(snapshot))


def test_an_hf_id_without_its_weights_in_the_cache_is_an_error(saved_llama, empty_hf_cache):
    hf_snapshot(empty_hf_cache, "acme/partial", saved_llama, weights=False)
    with pytest.raises(ValueError, match="without its complete \\*.safetensors weights"):
        models.lookup("acme/partial")
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and nothing is down"):
        models.lookup("acme/absent")


# --- bad input: one line, before any model is built -------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "nope"), "unknown model"),
        (lambda p: "./nope", "unknown model"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no config.json in"),
        (
            lambda p: (
                (p / "cfg").mkdir()
                or (p / "cfg" / "config.json").write_text(
                    json.dumps(models.get("tiny-llama").config_dict())
                )
                and str(p / "cfg")
            ),
            "no complete set of \\*.safetensors weights",
        ),
        (lambda p: (p / "w.bin").write_text("x") and str(p / "w.bin"), "is a file"),
        (lambda p: (p / "bad.json").write_text("{") and str(p / "bad.json"), "readable JSON"),
        (lambda p: (p / "x.json").write_text("{}") and str(p / "x.json"), "has no model_type"),
        (
            lambda p: str(config_file(p, "tiny-llama", model_type="vit")),
            "'vit' is not a causal language model",
        ),
        (
            lambda p: str(config_file(p, "tiny-llama", model_type="llama-next")),
            "does not know model_type 'llama-next'",
        ),
        (
            lambda p: str(
                config_file(
                    p,
                    "tiny-llama",
                    model_type="acme-lm",
                    auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeLM"},
                )
            ),
            "needs the model's own code .* trust_remote_code = true",
        ),
    ],
    ids=[
        "missing-dir",
        "missing-relative",
        "no-config",
        "no-weights",
        "not-a-directory",
        "bad-json",
        "no-model-type",
        "encoder",
        "unknown-type",
        "remote-code",
    ],
)
def test_a_bad_model_is_one_line_naming_the_fix(tmp_path, empty_hf_cache, make, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        models.lookup(make(tmp_path))
    assert "\n" not in str(excinfo.value)


def test_a_bad_model_in_a_test_is_a_usage_error_naming_the_argument(tmp_path):
    handle = LLMPerf(
        backends.get_backend("cpu"),
        Context("k", "s", "n", rounds=5, warmup=1, device_key="d", provenance={}),
    )
    with pytest.raises(UsageError, match=r"llmperf.generate\(model=...\): .*no config.json"):
        (tmp_path / "empty").mkdir()
        handle.generate(model=str(tmp_path / "empty"))


# --- the registry -----------------------------------------------------------------------------


def test_registered_names_map_to_directories_hf_ids_and_configs(tmp_path, saved_llama):
    table = {
        "mine": str(saved_llama),
        "shape": "shape/config.json",
        "hub": "acme/llama-ft",
        "custom": {"path": "ckpt/custom", "trust_remote_code": True},
    }
    registry = models.parse_registry(table, "pyproject.toml: [tool.llmperf.models]", tmp_path)
    assert {n: (r.kind, r.target) for n, r in registry.items()} == {
        "mine": ("path", str(saved_llama)),
        "shape": ("config", str(tmp_path / "shape/config.json")),
        "hub": ("hf", "acme/llama-ft"),
        "custom": ("path", str(tmp_path / "ckpt/custom")),
    }
    assert registry["custom"].trust_remote_code
    config_file(tmp_path)
    spec = models.lookup("shape", registry)
    assert (spec.id, spec.source, spec.family) == ("shape", "config", "mixtral")
    assert models.lookup("mine", registry).id == "mine"


@pytest.mark.parametrize(
    "table, message",
    [
        ({"tiny-llama": "x"}, "collides with the catalog id 'tiny-llama'"),
        ({"a": {"path": "x", "config": "y.json"}}, "expected exactly one of path, hf, config"),
        ({"a": {"dir": "x"}}, "unknown: dir"),
        ({"a": {"path": "x", "trust_remote_code": "yes"}}, "expected true or false"),
        ({"a": 3}, "expected a path, an HF id or a table"),
        ({"a b": "x"}, "one word without spaces"),
        ([1], "expected a table"),
    ],
)
def test_a_bad_registry_entry_names_the_file_and_the_entry(tmp_path, table, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        models.parse_registry(table, "pyproject.toml: [tool.llmperf.models]", tmp_path)
    assert str(excinfo.value).startswith("pyproject.toml: [tool.llmperf.models]")


def test_a_registered_name_that_points_nowhere_says_where_it_was_registered(tmp_path):
    registry = models.parse_registry({"gone": "./gone"}, "models.toml:", tmp_path)
    with pytest.raises(ValueError, match="models.toml: gone: no such checkpoint directory"):
        models.lookup("gone", registry)


def test_a_model_source_crosses_a_process_boundary_unchanged(tmp_path):
    spec = models.lookup(str(config_file(tmp_path)))
    again = model_of(generate_spec(spec))
    assert again == spec


# --- a project registers its models ------------------------------------------------------------


PROJECT_TEST = """
    import pytest
    from pytest_llmperf.plugin import parametrize_models

    def pytest_generate_tests(metafunc):
        parametrize_models(metafunc)

    def test_lat(llmperf, model):
        llmperf.generate(model=model, engine="fake-engine", new_tokens=10)
"""


def test_a_project_runs_the_suite_on_its_registered_model_keyed_by_its_name(
    project: pytest.Pytester,
):
    (project.path / "shapes").mkdir()
    (project.path / "shapes" / "config.json").write_text(
        json.dumps(models.get("tiny-mixtral").config_dict()), encoding="utf-8"
    )
    project.makepyprojecttoml(
        """
        [tool.llmperf.models]
        moe-shape = "shapes/config.json"
        """
    )
    project.makepyfile(test_suite=PROJECT_TEST)
    result = project.runpytest(FAKE, "--llmperf-models=moe-shape", "--llmperf-update-baselines")
    result.assert_outcomes(passed=1)
    entries = baseline_file(project.path, "test_suite")["entries"]
    assert list(entries) == ["test_lat[model=moe-shape]"]


def test_a_registry_collision_stops_the_run_with_one_line(project: pytest.Pytester):
    project.makepyprojecttoml(
        """
        [tool.llmperf.models]
        gpt2 = "somewhere"
        """
    )
    project.makepyfile(test_suite=PROJECT_TEST)
    result = project.runpytest(FAKE)
    assert "[tool.llmperf.models] gpt2: the name collides with the catalog id" in one_line_error(
        result
    )
    no_traceback(result)


def test_a_misspelt_model_list_is_a_usage_error_with_a_suggestion(project: pytest.Pytester):
    project.makepyfile(test_suite=PROJECT_TEST)
    result = project.runpytest(FAKE, "--llmperf-models=tiny-lama")
    assert "unknown model 'tiny-lama' (did you mean 'tiny-llama'?)" in one_line_error(result)
