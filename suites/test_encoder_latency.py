"""Encoder latency, the workload of the Inferentia2 post (reference 004): the p95 latency of one
forward pass of BERT-base, BERT-large, RoBERTa-base, DistilBERT, ALBERT-base and ViT-base at
batch size 1, text encoders over sequence lengths 8, 16, 32, 64, 128, 256 and 512, ViT on its
one image size (224×224).

Each test is ``llmperf.forward``: 100 rounds of one forward pass of the base model (BertModel
with its pooler, ViTModel: no task head) on seeded inputs of exactly that shape, after 10
warm-up passes; ``latency_p95_s`` is the headline and gated, with p50 and p99 beside it. Models
follow --llmperf-models: the tiny encoders (tiny-bert, tiny-roberta, tiny-distilbert,
tiny-albert, tiny-vit) on CPU, the real shapes on accelerators; causal LMs are the generation
suites' and never run here.

dtype is an explicit parameter, so it is in every baseline key: fp32 everywhere, as the post
ran every device ("the models were evaluated in fp32"); on the full tier bf16 too, what an
accelerator serves encoders in. A list of model names runs fp32 only.
"""

from typing import Optional

import pytest

from pytest_llmperf.plugin import ENCODERS, model_param, model_task, selected_models

SEQUENCE_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
#: dtypes by tier (None: models named in a list).
DTYPES: dict[Optional[str], tuple[str, ...]] = {
    "tiny": ("fp32",),
    "full": ("fp32", "bf16"),
    None: ("fp32",),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" not in metafunc.fixturenames:
        return
    image = "sequence_length" not in metafunc.fixturenames
    params = []
    # Model by model, so a model stays loaded for all its shapes (one model is kept resident).
    for name, tier, _family in selected_models(metafunc.config, ENCODERS):
        if (model_task(metafunc.config, name) == "image-encoder") != image:
            continue
        for dtype in DTYPES[tier]:
            if image:
                params.append(model_param(name, tier, dtype, id=f"{name}-{dtype}"))
                continue
            for length in SEQUENCE_LENGTHS:
                test_id = f"{name}-{dtype}-seq{length}"
                params.append(model_param(name, tier, dtype, length, id=test_id))
    names = "model,dtype" if image else "model,dtype,sequence_length"
    metafunc.parametrize(names, params)


@pytest.mark.parametrize("batch_size", [1])
def test_text_encoder_latency(llmperf, model, dtype, sequence_length, batch_size):
    result = llmperf.forward(
        model=model, batch_size=batch_size, sequence_length=sequence_length, dtype=dtype
    )
    assert result.outcome in ("ok", "oom"), result.note


@pytest.mark.parametrize("batch_size", [1])
def test_image_encoder_latency(llmperf, model, dtype, batch_size):
    result = llmperf.forward(model=model, batch_size=batch_size, dtype=dtype)
    assert result.outcome in ("ok", "oom"), result.note
