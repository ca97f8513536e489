"""The offline model catalog: ids, shapes, memory arithmetic, seeded weights, offline tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llmperf import models
from pytest_llmperf.models import tokenizer as tokenizer_mod

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = ["tiny-bloom", "tiny-llama", "tiny-gpt2"]
FULL = ["bloom-560m", "bloomz-7b1", "bloom-176b", "llama-2-7b", "gpt2"]

# Parameter counts of the public checkpoints (model cards / safetensors metadata).
PUBLIC_PARAMS = {
    "bloom-560m": 559_214_592,
    "bloomz-7b1": 7_069_016_064,
    "bloom-176b": 176_247_271_424,
    "llama-2-7b": 6_738_415_616,
    "gpt2": 124_439_808,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2.5-7b": 7_615_616_512,
}
#: Config-only entries for current models: run when named, not by the tier's suites.
EXTRA_TINY = ["tiny-mistral", "tiny-mixtral", "tiny-qwen2"]
EXTRA_FULL = ["llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b"]
#: Encoders of reference 004 (llmperf.forward; tests/test_forward_scenario.py).
ENCODERS_TINY = ["tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-albert", "tiny-vit"]
ENCODERS_FULL = [
    "bert-base",
    "bert-large",
    "roberta-base",
    "distilbert-base",
    "albert-base",
    "vit-base",
]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty HF cache: a developer's own downloads must not turn seeded builds into real ones."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def one_thread():
    """Generation tests run on one intra-op thread: on a shared CI host, OpenMP's spinning
    barriers turn a 0.15 s tiny-bloom generate into tens of seconds when the cores are busy."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _greedy(model, tokens: int = 12):
    import torch

    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 250]])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


# --- catalog -------------------------------------------------------------------------------


def test_catalog_lists_exact_ids_by_tier():
    every = TINY + FULL + EXTRA_TINY + EXTRA_FULL + ENCODERS_TINY + ENCODERS_FULL
    assert set(models.catalog()) == set(every)
    assert models.models_for_tier("tiny") == TINY + ENCODERS_TINY
    assert models.models_for_tier("full") == FULL + ENCODERS_FULL
    assert models.models_for_tier("tiny", ("causal-lm",)) == TINY
    assert models.models_for_tier("full", ("encoder", "image-encoder")) == ENCODERS_FULL
    for spec in models.catalog().values():
        assert spec.family in models.FAMILIES
        assert (spec.hf_id is None) == (spec.tier == "tiny")
        assert spec.config_path.is_file()
        assert spec.config_dict()["model_type"] == spec.family


def test_full_models_point_at_the_public_checkpoints():
    hf_ids = {mid: models.get(mid).hf_id for mid in FULL + EXTRA_FULL}
    assert hf_ids == {
        "bloom-560m": "bigscience/bloom-560m",
        "bloomz-7b1": "bigscience/bloomz-7b1",
        "bloom-176b": "bigscience/bloom",
        "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "gpt2": "openai-community/gpt2",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
        "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    }


def test_unknown_model_error_names_the_id_and_lists_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        models.get("bloom-7b")
    message = str(excinfo.value)
    assert message == (
        "unknown model 'bloom-7b'; known: albert-base, bert-base, bert-large, bloom-176b, "
        "bloom-560m, bloomz-7b1, distilbert-base, gpt2, llama-2-7b, llama-3.1-70b, "
        "llama-3.1-8b, mistral-7b, mixtral-8x7b, qwen2.5-7b, roberta-base, tiny-albert, "
        "tiny-bert, tiny-bloom, tiny-distilbert, tiny-gpt2, tiny-llama, tiny-mistral, "
        "tiny-mixtral, tiny-qwen2, tiny-roberta, tiny-vit, vit-base"
    )
    assert "\n" not in message


def test_unknown_tier_is_an_error():
    with pytest.raises(ValueError, match="unknown model tier 'auto'; known: tiny, full"):
        models.models_for_tier("auto")


def test_config_dict_is_a_copy():
    spec = models.get("tiny-bloom")
    spec.config_dict()["hidden_size"] = 1
    assert spec.config_dict()["hidden_size"] == 64


def test_importing_the_catalog_loads_no_heavy_library():
    code = (
        "import sys, pytest_llmperf.models as m; m.catalog(); m.get('bloom-176b').param_count(); "
        "heavy = [n for n in ('torch', 'transformers', 'tokenizers', 'accelerate', "
        "'huggingface_hub') if n in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# --- shapes and memory -----------------------------------------------------------------------


@pytest.mark.parametrize("model_id", FULL + EXTRA_FULL)
def test_param_count_matches_public_checkpoint(model_id):
    count = models.get(model_id).param_count()
    assert abs(count - PUBLIC_PARAMS[model_id]) <= 0.02 * PUBLIC_PARAMS[model_id]


def test_param_breakdown_matches_transformers_modules():
    """The config arithmetic agrees with what transformers builds, kind by kind (on the meta
    device, so even bloom-176b costs no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    # The causal LMs' formulas; encoders are counted on the meta device (test_forward_scenario).
    for spec in (s for s in models.catalog().values() if s.task == "causal-lm"):
        config = transformers.AutoConfig.for_model(**spec.config_dict())
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        linear = bias = norm = 0
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head"):
                linear += module.weight.numel()
                bias += module.bias.numel() if module.bias is not None else 0
            elif "norm" in type(module).__name__.lower():
                norm += sum(p.numel() for p in module.parameters(recurse=False))
            elif not isinstance(module, torch.nn.Embedding) and not name.endswith("lm_head"):
                # Fused MoE expert tensors (transformers 5's Mixtral) and routers.
                linear += sum(p.numel() for p in module.parameters(recurse=False) if p.ndim >= 2)
        expected = spec.param_breakdown()
        assert (linear, bias, norm) == (expected["linear"], expected["bias"], expected["norm"])
        assert sum(p.numel() for p in model.parameters()) == spec.param_count(), spec.id


def test_shapes_normalize_family_spellings():
    bloom = models.get("bloom-176b").shape()  # its config spells hidden size "n_embed"
    assert (bloom.num_layers, bloom.hidden_size, bloom.num_heads) == (70, 14336, 112)
    assert bloom.max_positions is None
    llama = models.get("tiny-llama").shape()
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert models.get("gpt2").shape().max_positions == 1024


def test_weight_bytes_per_dtype():
    spec = models.get("bloom-176b")
    n = spec.param_count()
    assert spec.weight_bytes("fp32") == 4 * n
    assert spec.weight_bytes("fp16") == spec.weight_bytes("bf16") == 2 * n
    # "As the model needs 352GB in bf16 (bfloat16) weights (176*2)" - the BLOOM inference post.
    assert 350e9 < spec.weight_bytes("bf16") < 355e9
    # bitsandbytes keeps embeddings and norms in 16 bit: a bit more than half of bf16.
    assert 0.5 * 2 * n < spec.weight_bytes("int8") < 0.53 * 2 * n
    assert spec.weight_bytes("int4") < spec.weight_bytes("int8")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        spec.weight_bytes("fp8")


@pytest.mark.parametrize("model_id", TINY + FULL)
def test_memory_estimate_grows_with_batch_and_sequence(model_id):
    spec = models.get(model_id)
    sizes = [models.estimate_generation_bytes(spec, "bf16", bs, 7, 100) for bs in (1, 2, 8, 64)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert sizes[0] > spec.weight_bytes("bf16")
    longer = models.estimate_generation_bytes(spec, "bf16", 1, 7, 1000)
    assert longer > sizes[0]
    assert models.estimate_generation_bytes(spec, "fp32", 8, 7, 100) > sizes[2]


def test_memory_estimate_kv_cache_follows_grouped_query_attention():
    spec = models.get("tiny-llama")  # 4 query heads share 2 key/value heads

    def kv_growth(extra_tokens):
        # Adding decode tokens grows only the KV cache (and the attention-score bound).
        return models.estimate_generation_bytes(
            spec, "bf16", 1, 1, extra_tokens
        ) - models.estimate_generation_bytes(spec, "bf16", 1, 1, 0)

    s = spec.shape()
    per_token_kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
    per_token_scores = s.num_heads * 4
    assert kv_growth(10) == 10 * (per_token_kv + per_token_scores)


def test_memory_estimate_does_not_rule_out_published_runs():
    """The seed posts ran bloom-176b on 8x80GB with 100 new tokens at these batch sizes; a
    pre-check that called them OOM would hide real measurements."""
    spec = models.get("bloom-176b")
    node = 8 * 80e9
    for dtype, batch_size in (("bf16", 32), ("fp16", 256), ("int8", 256)):
        assert models.estimate_generation_bytes(spec, dtype, batch_size, 7, 100) < node
    # ...while a batch whose KV cache alone outgrows the node is ruled out.
    assert models.estimate_generation_bytes(spec, "fp16", 2048, 7, 100) > node


def test_dtype_names():
    torch = pytest.importorskip("torch")
    assert models.torch_dtype("bf16") is torch.bfloat16
    assert dict(models.DTYPES) == {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }
    with pytest.raises(ValueError, match="quantized format"):
        models.torch_dtype("int8")
    with pytest.raises(ValueError, match="unknown dtype 'float16'; known: fp32, fp16, bf16"):
        models.torch_dtype("float16")


def test_dtype_keyword_follows_the_transformers_rename(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    assert list(models.dtype_kwargs("x")) == ["torch_dtype"]
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    assert list(models.dtype_kwargs("x")) == ["dtype"]


# --- seeded weights --------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", TINY)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_tiny_models_are_built_in_the_target_dtype(model_id, dtype):
    model, source = models.build_model(models.get(model_id), dtype, seed=0)
    assert source == "seed:0"
    assert not model.training
    target = models.torch_dtype(dtype)
    assert {p.dtype for p in model.parameters()} == {target}
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert sum(p.numel() for p in model.parameters()) == models.get(model_id).param_count()


def test_tied_embeddings_stay_one_tensor():
    model, _ = models.build_model(models.get("tiny-bloom"), "bf16")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


@pytest.mark.parametrize("model_id", TINY)
def test_same_seed_same_weights_same_greedy_output(model_id, one_thread):
    import torch

    spec = models.get(model_id)
    first, _ = models.build_model(spec, "fp32", seed=0)
    second, _ = models.build_model(spec, "fp32", seed=0)
    other, source = models.build_model(spec, "fp32", seed=1)
    assert source == "seed:1"
    a, b, c = _state(first), _state(second), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert _greedy(first) == _greedy(second)


def test_one_seed_is_one_model_in_every_dtype():
    """bf16 weights are the fp32 draws rounded, so dtype comparisons compare precision only."""
    import torch

    spec = models.get("tiny-llama")
    fp32, _ = models.build_model(spec, "fp32", seed=3)
    bf16, _ = models.build_model(spec, "bf16", seed=3)
    b = _state(bf16)
    for name, weight in _state(fp32).items():
        if weight.is_floating_point() and b[name].dtype == torch.bfloat16:
            assert torch.equal(weight.to(torch.bfloat16), b[name]), name


# Seeded weights and offline token ids feed the output digests stored in baselines, so they must
# not drift across machines or library versions. These were identical on transformers 4.55.4 /
# tokenizers 0.21.4 and 5.23.0 / 0.23.3. A failure means every stored digest of a seeded model
# changes: change these deliberately (and say so in the changelog), never silently.
GOLDEN_WEIGHTS = {
    "tiny-bloom": "43d12675b7023eb57814c5c5e5a1923396210680301a19366ad01fae88fd406c",
    "tiny-llama": "a375ba225e500655bbe90a737d1974a910aa4bd2a165dedbb8465bbbf02d4a72",
    "tiny-gpt2": "e814ef4ae24a9e62fd04eeec1e4e4c879ed1f5222ff1b8074e8ab522ab17a4e6",
}
GOLDEN_CORPUS_IDS = {
    "tiny-bloom": "cd361bb2ca7201aa6168c897fc207db6da90d910ab7c9d4ae75f20e9c10d275f",  # 1024 vocab
    "bloom-560m": "aa597afa90e5eac4e755a9be6e6a9ac5454b6bab9a6cd566da99b88f0c1cc52f",  # 4096 cap
}


@pytest.mark.parametrize("model_id", sorted(GOLDEN_WEIGHTS))
def test_seeded_weights_are_stable_across_versions(model_id):
    model, _ = models.build_model(models.get(model_id), "fp32", seed=0)
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().numpy().tobytes())
    assert digest.hexdigest() == GOLDEN_WEIGHTS[model_id]


@pytest.mark.parametrize("model_id", sorted(GOLDEN_CORPUS_IDS))
def test_offline_token_ids_are_stable_across_versions(model_id, empty_hf_cache):
    tokenizer, _ = models.build_tokenizer(models.get(model_id))
    ids = tokenizer(tokenizer_mod.corpus_text())["input_ids"]
    assert hashlib.sha256(str(ids).encode()).hexdigest() == GOLDEN_CORPUS_IDS[model_id]


def test_seeded_weights_do_not_depend_on_threads_or_staging(monkeypatch):
    """Chunked per-chunk generators make the weights independent of the thread count and of the
    CPU staging slabs used for accelerators, so one seed is one model on every backend."""
    import torch

    from pytest_llmperf.models import weights

    monkeypatch.setattr(weights, "_CHUNK", 1000)  # many chunks even in a tiny tensor
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = torch.empty(10_000)
        weights._fill_uniform(serial, 0, "w", 5, 0.1)
        torch.set_num_threads(max(before, 2))
        threaded = torch.empty(10_000)
        weights._fill_uniform(threaded, 0, "w", 5, 0.1)
    finally:
        torch.set_num_threads(before)
    staged = torch.empty(10_000)
    for start in range(0, 10_000, 3000):  # slabs are whole chunks, as _SLAB is
        weights._fill_uniform(staged[start : start + 3000], start, "w", 5, 0.1)
    assert torch.equal(serial, threaded) and torch.equal(serial, staged)
    assert 0.05 < float(serial.abs().max()) <= 0.1


def test_seeded_weights_have_the_configured_scale():
    model, _ = models.build_model(models.get("tiny-gpt2"), "fp32")
    block = _state(model)
    assert 0.015 < float(block["transformer.h.0.mlp.c_fc.weight"].std()) < 0.025
    assert float(block["transformer.h.0.ln_1.weight"].min()) == 1.0
    assert float(block["transformer.h.0.mlp.c_fc.bias"].abs().max()) == 0.0


def test_bad_seed_and_dtype_are_rejected():
    spec = models.get("tiny-bloom")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        models.build_model(spec, "fp32", seed=-1)
    with pytest.raises(ValueError, match="quantized format"):
        models.build_model(spec, "int4")


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A local checkpoint directory as a user would have: config, safetensors, tokenizer."""
    spec = models.get("tiny-bloom")
    model, _ = models.build_model(spec, "fp32", seed=7)
    directory = tmp_path / "tiny-bloom-ckpt"
    model.save_pretrained(directory)
    tokenizer, _ = models.build_tokenizer(spec)
    tokenizer.save_pretrained(directory)
    return directory, model


def test_explicit_checkpoint_wins_and_is_identified(tiny_checkpoint, empty_hf_cache):
    import torch

    directory, saved = tiny_checkpoint
    model, source = models.build_model(models.get("tiny-bloom"), "bf16", checkpoint=str(directory))
    assert source.startswith(f"checkpoint:{directory}@")
    assert len(source.rsplit("@", 1)[1]) == 12
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = _state(saved)
    assert all(torch.equal(expected[k].to(torch.bfloat16), v) for k, v in _state(model).items())
    # Same files, same identity; the hash is of content, not of the time it was read.
    assert (
        models.build_model(models.get("tiny-bloom"), "bf16", checkpoint=str(directory))[1] == source
    )
    tokenizer, is_real = models.build_tokenizer(models.get("tiny-bloom"), checkpoint=str(directory))
    assert is_real


def test_missing_or_foreign_checkpoint_is_an_error(tiny_checkpoint, tmp_path, empty_hf_cache):
    directory, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="model_type 'bloom', but model 'tiny-llama'"):
        models.build_model(models.get("tiny-llama"), "fp32", checkpoint=str(directory))
    with pytest.raises(ValueError, match="nothing is downloaded"):
        models.build_model(models.get("tiny-bloom"), "fp32", checkpoint="no-such-org/no-such")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.build_model(models.get("tiny-bloom"), "fp32", checkpoint=str(tmp_path / "empty"))


def _fake_cache_entry(cache: Path, hf_id: str, files: dict[str, bytes]) -> str:
    sha = hashlib.sha1(hf_id.encode()).hexdigest()
    repo = cache / ("models--" + hf_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    return sha


def test_hf_cache_is_used_when_it_holds_the_weights(tiny_checkpoint, empty_hf_cache):
    directory, _ = tiny_checkpoint
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    sha = _fake_cache_entry(empty_hf_cache, "test-org/tiny-bloom", files)
    spec = dataclasses.replace(models.get("tiny-bloom"), hf_id="test-org/tiny-bloom")
    _, source = models.build_model(spec, "fp32")
    assert source == f"checkpoint:test-org/tiny-bloom@{sha[:12]}"
    assert models.build_tokenizer(spec)[1] is True


def test_hf_cache_without_weights_falls_back_to_the_seed(tiny_checkpoint, empty_hf_cache):
    directory, _ = tiny_checkpoint
    _fake_cache_entry(
        empty_hf_cache,
        "test-org/tiny-bloom",
        {"config.json": (directory / "config.json").read_bytes()},
    )
    spec = dataclasses.replace(models.get("tiny-bloom"), hf_id="test-org/tiny-bloom")
    assert models.build_model(spec, "fp32", seed=2)[1] == "seed:2"
    assert models.build_tokenizer(spec)[1] is False


def test_absent_hf_cache_is_quiet(empty_hf_cache, recwarn):
    assert models.hf_cache_snapshot("bigscience/bloom-560m") is None
    assert models.hf_cache_snapshot("not a valid repo id!") is None
    assert models.build_tokenizer(models.get("bloom-560m"))[1] is False
    assert not recwarn.list


# --- tokenizer and prompts --------------------------------------------------------------------


@pytest.mark.parametrize("model_id", TINY + FULL)
def test_offline_tokenizer_round_trips_and_fits_the_vocab(model_id, empty_hf_cache):
    spec = models.get(model_id)
    tokenizer, is_real = models.build_tokenizer(spec)
    assert not is_real
    assert len(tokenizer) <= min(spec.shape().vocab_size, tokenizer_mod.OFFLINE_VOCAB_CAP)
    text = "DeepSpeed runs BLOOM on 8 x A100: 44.02 ms/token, naïve café ☕\n\tdone."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < spec.shape().vocab_size
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.unk_token_id == 0 and tokenizer.eos_token_id == 2


def test_offline_tokenizer_is_fresh_per_call_and_identical_across_processes():
    spec = models.get("tiny-bloom")
    first, _ = models.build_tokenizer(spec)
    first.padding_side = "left"
    assert models.build_tokenizer(spec)[0].padding_side == "right"
    code = (
        "import hashlib; from pytest_llmperf.models.tokenizer import _trained_json; "
        "print(hashlib.sha256(_trained_json(1024).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO_ROOT
        ).stdout.strip()
        for _ in range(2)
    }
    assert digests == {hashlib.sha256(tokenizer_mod._trained_json(1024).encode()).hexdigest()}


def test_seed_prompt_has_the_real_token_count_with_the_offline_tokenizer():
    tokenizer, is_real = models.build_tokenizer(models.get("tiny-bloom"))
    input_ids, mask, n = models.encode_prompt(tokenizer, is_real, models.SEED_PROMPT, batch_size=4)
    assert n == models.SEED_PROMPT_TOKENS == 7
    assert tuple(input_ids.shape) == tuple(mask.shape) == (4, 7)
    assert str(input_ids.dtype) == "torch.int64"
    assert bool((input_ids == input_ids[0]).all()) and bool(mask.all())


def test_prompt_tokens_overrides_by_cutting_or_repeating():
    tokenizer, is_real = models.build_tokenizer(models.get("tiny-llama"))
    full = tokenizer(models.SEED_PROMPT)["input_ids"]
    ids, _, n = models.encode_prompt(tokenizer, is_real, models.SEED_PROMPT, 1, prompt_tokens=3)
    assert n == 3 and ids[0].tolist() == full[:3]
    ids, _, n = models.encode_prompt(tokenizer, is_real, "short", 1, prompt_tokens=40)
    assert n == 40
    short = tokenizer("short")["input_ids"]
    assert ids[0].tolist() == (short * 40)[:40]
    other, _, n_other = models.encode_prompt(tokenizer, is_real, "Some other text here", 2)
    assert n_other == len(tokenizer("Some other text here")["input_ids"])


def test_real_tokenizer_keeps_the_text_length_and_a_single_bos():
    tokenizer, _ = models.build_tokenizer(models.get("tiny-llama"))
    # Offline tokenizers add no BOS; emulate a tokenizer that does (Llama's).
    ids = [tokenizer.bos_token_id, 10, 11]
    assert tokenizer_mod._fit(ids, 7, tokenizer) == [tokenizer.bos_token_id, 10, 11, 10, 11, 10, 11]
    _, _, n = models.encode_prompt(tokenizer, True, models.SEED_PROMPT, 1)
    assert n == len(tokenizer(models.SEED_PROMPT)["input_ids"])


def test_prompt_free_tokens_are_deterministic_text():
    tokenizer, is_real = models.build_tokenizer(models.get("tiny-gpt2"))
    a, _, n = models.encode_prompt(tokenizer, is_real, None, 2, prompt_tokens=2000)
    b, _, _ = models.encode_prompt(tokenizer, is_real, None, 2, prompt_tokens=2000)
    assert n == 2000 and a.equal(b)
    assert len(set(a[0].tolist())) > 100  # real text, not one repeated id
    with pytest.raises(ValueError, match="needs prompt= text or prompt_tokens="):
        models.encode_prompt(tokenizer, is_real, None, 1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        models.encode_prompt(tokenizer, is_real, "x", 0)


def test_tiny_bloom_runs_the_seed_workload_end_to_end(one_thread):
    """7-token seed prompt, 100 greedy tokens, twice the same. No wall-clock bound here: the CI
    host is shared and timing assertions would make this test flaky."""
    import torch

    spec = models.get("tiny-bloom")
    tokenizer, is_real = models.build_tokenizer(spec)
    ids, mask, n = models.encode_prompt(tokenizer, is_real, models.SEED_PROMPT, 2)
    outputs = []
    for _ in range(2):
        model, _ = models.build_model(spec, "bf16", seed=0)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=100,
                min_new_tokens=100,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs.append(out.tolist())
    assert len(outputs[0][0]) == n + 100 == 107
    assert outputs[0] == outputs[1]
