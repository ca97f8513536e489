"""BLOOMZ generation latency, the workload of the Gaudi2 BLOOMZ post (reference 000).

Batch size 1, greedy decoding of 100 new tokens after the 7-token prompt "DeepSpeed is a
machine learning framework", KV cache on. The post reports latency per generate call; we also
keep ms/token (its sibling post's metric) and TTFT/TPOT. Models follow --llmperf-models:
tiny ones on CPU, the real shapes (bloom-560m … bloom-176b) on accelerators.
"""

import pytest

from pytest_llmperf.plugin import parametrize_models

PROMPT = "DeepSpeed is a machine learning framework"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" in metafunc.fixturenames:
        parametrize_models(metafunc)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("new_tokens", [100])
@pytest.mark.parametrize("batch_size", [1])
def test_latency(llmperf, model, dtype, batch_size, new_tokens):
    result = llmperf.generate(
        model=model, dtype=dtype, batch_size=batch_size, new_tokens=new_tokens, prompt=PROMPT
    )
    assert result.outcome in ("ok", "oom"), result.note
