"""BLOOMZ generation latency, the workload of the Gaudi2 BLOOMZ post (reference 000).

Batch size 1, greedy decoding of 100 new tokens after the 7-token prompt "DeepSpeed is a
machine learning framework", KV cache on, on 1 and on several devices (the post's 1-vs-8
table). The post reports latency per generate call; we also keep ms/token (its sibling post's
metric) and TTFT/TPOT. Models follow --llmperf-models: tiny ones on CPU, the real shapes
(bloom-560m … bloom-176b) on accelerators. Several devices run one rank per device under
torchrun (on CPU: one rank per core); models without a tensor-parallel plan in transformers
(BLOOM, GPT-2) are skipped there with the reason until the DeepSpeed engines arrive.
"""

import pytest

from pytest_llmperf.plugin import parametrize_models

PROMPT = "DeepSpeed is a machine learning framework"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" in metafunc.fixturenames:
        parametrize_models(metafunc)


@pytest.mark.parametrize("devices", [1, 2, 8], ids=["1dev", "2dev", "8dev"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("new_tokens", [100])
@pytest.mark.parametrize("batch_size", [1])
def test_latency(llmperf, model, dtype, batch_size, new_tokens, devices):
    result = llmperf.generate(
        model=model,
        dtype=dtype,
        batch_size=batch_size,
        new_tokens=new_tokens,
        prompt=PROMPT,
        devices=devices,
    )
    assert result.outcome in ("ok", "oom"), result.note
