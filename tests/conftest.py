"""Shared fixtures: a pytester project whose conftest installs the fake chip (tests/fakes.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# pytester's in-process runs drop every module first imported during a run; torch cannot be
# imported twice in one process, so it (and the plugin's lazily imported parts) load here.
# The plugin imports these lazily (on the first measurement or judgement), i.e. inside a run;
# matplotlib when a run with --llmperf-report draws its plots at the session's end.
import matplotlib.backends.backend_agg  # noqa: F401
import matplotlib.figure  # noqa: F401
import matplotlib.ticker  # noqa: F401
import pytest
import pytest_benchmark.stats  # noqa: F401
import scipy.stats  # noqa: F401
import torch  # noqa: F401
import torch.distributed.run  # noqa: F401  (the torchrun launcher looks it up)
import transformers  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin  # noqa: F401

import pytest_llmperf.cli  # noqa: F401
import pytest_llmperf.engines  # noqa: F401
import pytest_llmperf.execute  # noqa: F401
import pytest_llmperf.gate  # noqa: F401
import pytest_llmperf.launchers.process  # noqa: F401
import pytest_llmperf.launchers.torchrun  # noqa: F401
import pytest_llmperf.measure  # noqa: F401
import pytest_llmperf.models  # noqa: F401
import pytest_llmperf.plots  # noqa: F401
import pytest_llmperf.report  # noqa: F401
import pytest_llmperf.runner  # noqa: F401
import pytest_llmperf.state  # noqa: F401
from pytest_llmperf import backends, engines

pytest_plugins = ["pytester"]

FAKES_SOURCE = Path(__file__).with_name("fakes.py").read_text() + "\n\nregister_all()\n"


@pytest.fixture(autouse=True)
def _isolated_registries() -> Any:
    """Backends and engines registered by a pytester project do not leak into later tests."""
    classes = dict(backends._classes)
    instances = dict(backends._instances)
    engine_instances = dict(engines._instances)
    yield
    backends._classes.clear()
    backends._classes.update(classes)
    backends._instances.clear()
    backends._instances.update(instances)
    engines._instances.clear()
    engines._instances.update(engine_instances)


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An empty pytester project on the fake chip; settings come only from what a test sets."""
    for name in list(os.environ):
        if name.startswith(("LLMPERF_", "FAKE_")) or name in ("GITHUB_STEP_SUMMARY", "CI"):
            monkeypatch.delenv(name)
    pytester.makeconftest(FAKES_SOURCE)
    return pytester
