"""Per-token throughput over batch sizes, the table of the BLOOM inference posts (references
001 and 003): greedy decoding of 100 new tokens after a short prompt at batch sizes 1 … 512,
per engine and dtype, headline ``ms_per_token = wall / (batch_size × new_tokens)`` (gated,
lower is better) beside ``tokens_per_s``.

OOM is a cell, not a crash: the memory check records a batch size that cannot fit as ``oom``
without running it, a real out-of-memory is caught and recorded, and once a batch size of a
series (same model, dtype, engine, devices) is ``oom`` the larger ones are recorded as ``oom``
without running (series.py). The baseline keeps every cell: a cell that was ``ok`` and is now
``oom`` fails. ``--llmperf-memory-limit=2GiB`` shows the rule on any machine.

Cells run in ascending batch size within a series (the parametrization is built in that order).
The batch sizes follow the model and the backend: the whole range on accelerators; on a CPU
host a ceiling that keeps the run to minutes — a tiny model stops where one generate still
takes well under a second, a full-size one (bloom-560m takes 8-25 s per generate at batch size
1 here) at 8 with plain transformers only — unless --llmperf-memory-limit is given: then the
cap ends each series.
"""

from typing import Any, Optional

import pytest

from pytest_llmperf.models.catalog import catalog
from pytest_llmperf.plugin import engine_id, model_param, selected_models

PROMPT = "DeepSpeed is a machine learning framework"
NEW_TOKENS = 100
BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256, 512)
#: The largest batch size on a CPU host, per model tier (accelerators run every size). A
#: full-size model runs plain transformers only there: bloom-560m takes ~72 s per cell (5
#: rounds + 1 warm-up of 10-12 s) at batch sizes 1 and 8 on two cores, so its four
#: transformers cells take ~5 minutes and every other engine would add minutes more.
CPU_CEILING = {"tiny": 64, "full": 8}

#: (engine, dtype, engine options, device counts), the seed table's rows.
ENGINES: list[tuple[str, str, Optional[dict[str, Any]], tuple[int, ...]]] = [
    ("transformers", "bf16", None, (1, 8)),
    ("transformers", "fp32", None, (1,)),
    ("accelerate", "bf16", None, (1,)),
    ("bnb-int8", "int8", None, (1,)),
    ("deepspeed-inference", "bf16", None, (1, 8)),
    ("deepspeed-zero", "bf16", None, (1,)),
]
#: On the tiny tier only plain transformers runs, on this model (the seed's family): the other
#: engines' wrappers (hooks, quantized kernels, DeepSpeed's process group) cost seconds per
#: call at batch 32-64 on two cores, which is minutes per series; the latency suite covers them
#: at batch size 1 on the tiny tier, and this suite at every size on the full tier.
TINY_MODEL = "tiny-bloom"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model" not in metafunc.fixturenames:
        return
    params = []
    for name, tier, _family in selected_models(metafunc.config):
        for engine, dtype, options, device_counts in ENGINES:
            if tier == "tiny" and (name != TINY_MODEL or engine != "transformers"):
                continue
            # One device on the tiny tier: a CPU host has no 8 devices to shard over.
            for devices in device_counts if tier != "tiny" else (1,):
                series = f"{engine_id(name, engine, dtype, options)}-{devices}dev"
                # Ascending within a series: a size after an oom one is recorded, not run.
                for batch_size in BATCH_SIZES:
                    params.append(
                        model_param(
                            name,
                            tier,
                            engine,
                            dtype,
                            options,
                            devices,
                            batch_size,
                            id=f"{series}-bs{batch_size}",
                        )
                    )
    metafunc.parametrize("model,engine,dtype,engine_options,devices,batch_size", params)


@pytest.mark.llmperf(rounds=5, warmup=1, gate=["ms_per_token", "peak_memory_bytes"])
@pytest.mark.parametrize("new_tokens", [NEW_TOKENS])
def test_throughput(
    llmperf, model, engine, dtype, engine_options, devices, batch_size, new_tokens, request
):
    # Under --llmperf-memory-limit the cap, not the ceiling, ends a series.
    if llmperf.backend.name == "cpu" and llmperf.backend.memory_limit is None:
        known = catalog().get(model)
        tier = known.tier if known is not None else "full"
        ceiling = CPU_CEILING[tier]
        if tier == "full" and engine != "transformers":
            pytest.skip(
                f"{engine} series of a full-size model take minutes per cell on a CPU host; the "
                "latency suite times this engine at batch size 1 here"
            )
        if batch_size > ceiling:
            pytest.skip(
                f"batch size {batch_size} is above the CPU ceiling of {ceiling} for {model}"
            )
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
