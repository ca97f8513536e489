"""How much does llmperf's measuring add to what it measures?

Compares the plugin-measured median e2e latency of a tiny model with a bare, hand-timed
``generate`` loop on the same model in the same process (goal: ratio ≤ 1.01). The two are
interleaved in blocks so drift of the machine (thermal, a neighbour's load) hits both alike.

    python benchmarks/overhead.py [--model tiny-bloom] [--dtype fp32] [--blocks 6] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pytest_llmperf import models
from pytest_llmperf.backends import get_backend
from pytest_llmperf.runner import LLMPerf, ModelCache, Workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-bloom")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()

    backend = get_backend("cpu")
    cache = ModelCache()
    bare: list[float] = []
    plugin: list[float] = []
    for block in range(args.blocks):
        handle = LLMPerf(
            backend,
            Workload(
                key=f"overhead:{block}",
                suite="overhead",
                nodeid="benchmarks/overhead.py",
                rounds=args.rounds,
                warmup=2,
                device_key=backend.device_key(),
                provenance={},
            ),
            cache=cache,
        )
        record = handle.generate(
            args.model, dtype=args.dtype, new_tokens=args.new_tokens, prompt=models.SEED_PROMPT
        )
        plugin += record.metrics["e2e_latency_s"].samples

        loaded = cache.loaded  # the very model the plugin measured
        ids, mask, _n = models.encode_prompt(
            loaded.tokenizer, loaded.real_tokenizer, models.SEED_PROMPT, 1, None
        )
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        with torch.inference_mode():
            for _ in range(2):
                loaded.model.generate(ids, attention_mask=mask, **kwargs)
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                out = loaded.model.generate(ids, attention_mask=mask, **kwargs)
                bare.append(time.perf_counter() - t0)
        assert out.shape[-1] - ids.shape[-1] == args.new_tokens

    m_plugin, m_bare = statistics.median(plugin), statistics.median(bare)
    ratio = m_plugin / m_bare
    print(
        f"model {args.model} {args.dtype}, {args.new_tokens} new tokens, bs=1, CPU "
        f"{backend.device_key()}, {args.blocks} interleaved blocks × {args.rounds} rounds"
    )
    print(f"bare generate loop   median {m_bare * 1000:8.3f} ms  (n={len(bare)})")
    print(f"llmperf.generate     median {m_plugin * 1000:8.3f} ms  (n={len(plugin)})")
    verdict = "ok" if ratio <= 1.01 else "GOAL MISSED"
    print(f"ratio plugin / bare  {ratio:.4f}  (goal ≤ 1.01: {verdict})")


if __name__ == "__main__":
    main()
