"""BLOOMZ generation latency, the workload of the Gaudi2 BLOOMZ post (reference 000), through
each engine the BLOOM inference posts compare (references 001 and 003).

Batch size 1, greedy decoding of 100 new tokens after the 7-token prompt "DeepSpeed is a
machine learning framework", KV cache on, on 1 and on several devices (the post's 1-vs-8
table). The post reports latency per generate call; we also keep ms/token (its sibling post's
metric) and TTFT/TPOT. Models follow --llmperf-models: tiny ones on CPU, the real shapes
(bloom-560m … bloom-176b) on accelerators.

Engines are (engine, dtype, options) configurations as the posts tabulate them — accelerate
bf16, bitsandbytes int8 and nf4, DeepSpeed-inference, DeepSpeed ZeRO-3 with CPU offload — not a
cross product that is mostly skips. Plain transformers runs every selected model; on the tiny
tier each other engine but ZeRO runs one model (tiny-llama), and only transformers bf16 runs on
several ranks, which keeps the CPU suite within its time budget (naming tiny-llama runs them
all). Several devices run one rank per device under torchrun (on CPU: one rank per core), for
the engines that shard a model (transformers' tensor-parallel plans, DeepSpeed); an engine or
model that cannot run here is skipped with the reason.
"""

from typing import Any, Optional

import pytest

from pytest_llmperf.plugin import engine_id, model_param, selected_models

PROMPT = "DeepSpeed is a machine learning framework"

#: (engine, dtype, engine options, device counts).
ENGINES: list[tuple[str, str, Optional[dict[str, Any]], tuple[int, ...]]] = [
    ("transformers", "bf16", None, (1, 2, 8)),
    ("transformers", "fp32", None, (1, 2, 8)),
    ("accelerate", "bf16", None, (1,)),
    ("accelerate", "bf16", {"offload": "disk"}, (1,)),
    ("bnb-int8", "int8", None, (1,)),
    ("bnb-4bit", "int4", {"quant_type": "nf4", "compute_dtype": "bf16"}, (1,)),
    ("deepspeed-inference", "bf16", None, (1, 2, 8)),
    ("deepspeed-zero", "bf16", None, (1, 2)),
]
#: The one tiny model the engines other than plain transformers run on the tiny tier.
TINY_ENGINE_MODEL = "tiny-llama"
#: The one (engine, dtype) the tiny tier runs on several devices.
TINY_MULTI_DEVICE = ("transformers", "bf16")
#: Engines the tiny tier leaves out: ZeRO-3 with CPU offload takes 35 s for one tiny workload
#: on two cores, a fifth of the CPU job's budget. It runs when tiny-llama is named
#: (``--llmperf-models tiny-llama``) and on the full tier.
TINY_SKIPPED_ENGINES = ("deepspeed-zero",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" not in metafunc.fixturenames:
        return
    params = []
    for name, tier, _family in selected_models(metafunc.config):
        for engine, dtype, options, device_counts in ENGINES:
            if engine != "transformers" and tier == "tiny" and name != TINY_ENGINE_MODEL:
                continue
            if tier == "tiny" and engine in TINY_SKIPPED_ENGINES:
                continue
            for devices in device_counts:
                # Several ranks on the tiny tier: one configuration shows the torchrun path
                # (each rank group costs 20-35 s on two cores); the full tier runs them all.
                if tier == "tiny" and devices > 1 and (engine, dtype) != TINY_MULTI_DEVICE:
                    continue
                test_id = f"{engine_id(name, engine, dtype, options)}-{devices}dev"
                params.append(model_param(name, tier, engine, dtype, options, devices, id=test_id))
    metafunc.parametrize("model,engine,dtype,engine_options,devices", params)


@pytest.mark.parametrize("new_tokens", [100])
@pytest.mark.parametrize("batch_size", [1])
def test_latency(llmperf, model, engine, dtype, engine_options, devices, batch_size, new_tokens):
    result = llmperf.generate(
        model=model,
        engine=engine,
        engine_options=engine_options,
        dtype=dtype,
        batch_size=batch_size,
        new_tokens=new_tokens,
        prompt=PROMPT,
        devices=devices,
    )
    assert result.outcome in ("ok", "oom"), result.note
