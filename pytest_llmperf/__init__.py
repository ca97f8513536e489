"""pytest-llmperf: LLM inference benchmarks as pytest tests, gated against hardware baselines."""

from __future__ import annotations

__version__ = "0.1.0"
