"""How long each engine takes to get a model ready to generate from its checkpoint on disk:
reference 001's load-time table (BLOOM-176B on 8×A100: accelerate 121 s, DeepSpeed-inference
pre-sharded int8 61 s and fp16 60 s, unsharded 662 s, DeepSpeed ZeRO 462 s).

Every round is a cold start in a fresh process: the engine's libraries are imported first and
timed apart (``import_s``), then the engine loads the checkpoint (``load_time_s``, gated) with
its files evicted from the OS page cache first (``file_cache="cold"``, the post's case: a load
from disk) or read once first (``"warm"``, what a second load on the same node sees). Three
rounds, the default of ``llmperf.load``: a round is a whole load.

Engines are the (engine, dtype, options) configurations the posts compare, as in the latency
suite; an engine that cannot run here (bitsandbytes without its kernels, DeepSpeed int8 on CPU)
is skipped with the reason. On the tiny tier plain transformers loads one model, tiny-llama,
which keeps the CPU suite within its time budget (each round pays a new interpreter); naming
tiny-llama runs every engine on it, and the full tier loads every selected model.
"""

from typing import Any, Optional

import pytest

from pytest_llmperf.plugin import engine_id, model_param, selected_models

#: (engine, dtype, engine options).
ENGINES: list[tuple[str, str, Optional[dict[str, Any]]]] = [
    ("transformers", "bf16", None),
    ("transformers", "fp32", None),
    ("accelerate", "bf16", None),
    ("bnb-int8", "int8", None),
    ("bnb-4bit", "int4", {"quant_type": "nf4", "compute_dtype": "bf16"}),
    ("deepspeed-inference", "bf16", None),  # what DeepSpeed's cpu accelerator runs
    ("deepspeed-inference", "fp16", None),  # the post's rows: fp16 and int8
    ("deepspeed-inference", "int8", None),
    ("deepspeed-zero", "bf16", None),
]
#: The one model the tiny tier loads, with plain transformers only: every round pays a new
#: interpreter (3-6 s on two cores), so each engine configuration costs 20-60 s here and the
#: nine of them alone would take the CPU job past its budget. The other engines load tiny-llama
#: when it is named (``--llmperf-models tiny-llama``) and every model on the full tier.
TINY_MODEL = "tiny-llama"
TINY_ENGINES = (("transformers", "bf16"),)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" not in metafunc.fixturenames:
        return
    params = []
    for name, tier, _family in selected_models(metafunc.config):
        if tier == "tiny" and name != TINY_MODEL:
            continue
        for engine, dtype, options in ENGINES:
            if tier == "tiny" and (engine, dtype) not in TINY_ENGINES:
                continue
            test_id = engine_id(name, engine, dtype, options)
            params.append(model_param(name, tier, engine, dtype, options, id=test_id))
    metafunc.parametrize("model,engine,dtype,engine_options", params)


@pytest.mark.parametrize("file_cache", ["cold", "warm"])
def test_load_time(llmperf, model, engine, dtype, engine_options, file_cache):
    result = llmperf.load(
        model=model,
        engine=engine,
        dtype=dtype,
        engine_options=engine_options,
        file_cache=file_cache,
    )
    assert result.outcome in ("ok", "oom"), result.note
