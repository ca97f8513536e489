"""Generation over a whole dataset of prompts, the second experiment of the Gaudi2 BLOOMZ post
(reference 000): each prompt cut to its first 16 tokens, then exactly 50 new greedy tokens,
the prompts in batches (1 and 8 here).

The prompts come from --llmperf-prompts (a .jsonl or .txt file of the user's own data), else
from the few dozen sentences shipped with the plugin (pytest_llmperf/data/prompts.jsonl). The
``dataset`` parameter is their digest: another file is another workload, with a baseline of its
own. A round is one pass over all of them (``dataset_time_s``, gated), so a test runs 5 passes
after one warm-up pass whatever --llmperf-rounds says; ``batch_latency_s`` times each full
batch inside the passes. The first prompts and what the model generated after them are in the
report (summary.md, "Generated text"): with seeded random weights that text is nonsense, with a
real checkpoint it is what the post printed.

Models follow --llmperf-models (causal LMs). The full tier runs the real shapes in bf16 (the
post's 16-bit) over every prompt. The tiny tier (CPU) runs one model in fp32 (bf16 matmuls are
emulated, several times slower, on CPUs without bf16 instructions) over the first 12 prompts
(three of them shorter than 16 tokens; a full batch of 8 and a smaller last one), which keeps
this suite to seconds.
"""

from typing import Any, Optional

import pytest

from pytest_llmperf.plugin import dataset_prompts, model_param, selected_models
from pytest_llmperf.prompts import digest

#: The tiny tier runs one model: what a CPU run checks is the harness, not the model zoo.
TINY_MODEL = "tiny-llama"
#: Prompts a tiny-tier pass covers (the file's first ones): at batch size 1 a pass is one
#: generate call per prompt, and 6 passes over all ~40 took most of a minute on a quiet 2-core
#: host, minutes on a busy one.
TINY_PROMPTS = 12


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" not in metafunc.fixturenames:
        return
    # (model, dtype, max_prompts) per tier; a model named by --llmperf-models runs as full.
    params: list[Any] = []
    for name, tier, _family in selected_models(metafunc.config):
        if tier == "tiny":
            if name == TINY_MODEL:
                params.append(model_param(name, tier, "fp32", TINY_PROMPTS))
        else:
            params.append(model_param(name, tier, "bf16", None))
    metafunc.parametrize("model,dtype,max_prompts", params)
    # The first 16 hex digits of the prompts' sha256 name the dataset in the baseline key.
    dataset = digest(dataset_prompts(metafunc.config)).split(":", 1)[1][:16]
    metafunc.parametrize("dataset", [dataset])


@pytest.mark.llmperf(rounds=5, warmup=1)
@pytest.mark.parametrize("new_tokens", [50])
@pytest.mark.parametrize("prompt_tokens", [16])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_dataset(
    llmperf,
    model: str,
    dtype: str,
    max_prompts: Optional[int],
    dataset: str,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
) -> None:
    result = llmperf.generate_dataset(
        model=model,
        engine="transformers",
        dtype=dtype,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        max_prompts=max_prompts,
    )
    assert result.outcome in ("ok", "oom"), result.note
    if result.outcome == "ok":
        assert result.generated_text, "the record shows no generated text"
