"""Fake hardware for the plugin's own tests.

A backend whose clock moves only when work is done on it (the fake engines, or a test calling
``advance``), and engines that "generate" by advancing that clock: prefill costs ``PREFILL_S``,
each further token ``DECODE_S``, the very first call of a loaded model also ``COMPILE_S``. All
are binary fractions, so sums of them are exact and tests can compare with ``==``.

The same source serves two purposes: unit tests import it, and the pytester projects get it as
their ``conftest.py`` with ``register_all()`` appended (see ``tests/conftest.py``). Behaviour
that differs between runs of one project (a 20 % slower chip, less memory, four devices, a new
SDK version) is read from environment variables, as a user's hardware would differ.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, ClassVar, Optional

from pytest_llmperf import backends, engines
from pytest_llmperf.backends import Backend, Probe
from pytest_llmperf.engines.base import Engine, LoadedModel

GiB = 2**30

PREFILL_S = 1 / 16
DECODE_S = 1 / 128
COMPILE_S = 2.0
LOAD_S = 0.5
#: One forward pass of the fake engine (llmperf.forward), after the first (compile) call.
FORWARD_S = 1 / 256
PEAK_BYTES = 3 * 2**20
AVAILABLE_BYTES = 64 * GiB

#: Multiplies every prefill/decode step: 1.2 makes the fake chip 20 % slower.
ENV_SLOWDOWN = "FAKE_SLOWDOWN"
#: Memory one device still has free, in bytes.
ENV_AVAILABLE = "FAKE_AVAILABLE_BYTES"
#: The device's total memory, in bytes: free memory is then this minus the weights of every
#: fake model still alive, so a model nobody released keeps its memory (as on real hardware).
ENV_TOTAL = "FAKE_TOTAL_BYTES"
ENV_DEVICES = "FAKE_DEVICES"
ENV_SDK = "FAKE_SDK_VERSION"
#: Added to every generated token id: a kernel change that flips the greedy output.
ENV_OUTPUT_SHIFT = "FAKE_OUTPUT_SHIFT"
#: "FACTOR:CALLS": the first CALLS generate calls run FACTOR times slower (a neighbour's burst).
ENV_BURST = "FAKE_BURST"
#: The host's load average the fake chip reports (default 0: a quiet host, whatever the real
#: machine running the tests is doing).
ENV_LOAD = "FAKE_LOAD"
#: The fake chip's memory bandwidth in bytes/s (default: none known, no roofline_fraction).
ENV_BANDWIDTH = "FAKE_BANDWIDTH"
#: The batch size from which the fake-batch-oom engine runs out of memory.
ENV_OOM_BATCH = "FAKE_OOM_BATCH"
#: The fake chip's power in watts: set, the chip has an energy counter (joules = watts × its
#: clock), read as "energy" in ``FakeBackend.events``; unset, it has none (energy_meter None).
ENV_ENERGY_W = "FAKE_ENERGY_W"
#: Counter reads (1-based, comma-separated) that fail, as an unreadable or reset counter does.
ENV_ENERGY_FAIL = "FAKE_ENERGY_FAIL"
#: The fake chip has a counter kind but cannot read it here; the value is the reason.
ENV_ENERGY_ABSENT = "FAKE_ENERGY_ABSENT"


def slowdown() -> float:
    return float(os.environ.get(ENV_SLOWDOWN, "1"))


def steady_e2e(new_tokens: int, factor: float = 1.0) -> float:
    """What one generate call of the fake engine costs after the first (compile) call."""
    return (PREFILL_S + (new_tokens - 1) * DECODE_S) * factor


class FakeBackend(Backend):
    """One fake chip. ``events`` logs every sync, clock read and memory call, in order."""

    name: ClassVar[str] = "fake"
    torch_device: ClassVar[str] = "cpu"

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[str] = []
        #: Weight bytes of the fake models alive now (see FakeModel).
        self.resident = 0
        #: Calls of memory_bandwidth (the run asks once, for provenance).
        self.bandwidth_asked = 0

    def _probe_impl(self) -> Probe:
        return Probe(True, "", int(os.environ.get(ENV_DEVICES, "1")))

    def device_name(self) -> str:
        return "Fake Chip"

    def device_key(self) -> str:
        return "fake-chip"

    def versions(self) -> dict[str, str]:
        return {"fake-sdk": os.environ.get(ENV_SDK, "1.0")}

    def host_load(self) -> Optional[float]:
        return float(os.environ.get(ENV_LOAD, "0"))

    def own_load(self, load: Optional[float]) -> Optional[float]:
        """None of the fake load is ours, so FAKE_LOAD is all foreign: deterministic, whatever
        the test process itself costs (noise.own_load is tested on a fake process table)."""
        return 0.0

    def clock(self) -> float:
        self.events.append("clock")
        return self.now

    def synchronize(self) -> None:
        self.events.append("sync")

    def advance(self, seconds: float, what: str = "work") -> None:
        """Device work: the only thing that moves the clock."""
        self.events.append(what)
        self.now += seconds

    def reset_peak_memory(self) -> None:
        self.events.append("reset_peak")

    def peak_memory_bytes(self) -> Optional[int]:
        self.events.append("read_peak")
        return PEAK_BYTES

    def memory_in_use_bytes(self) -> Optional[int]:
        return self.resident

    def available_memory_bytes(self) -> Optional[int]:
        if ENV_TOTAL in os.environ:
            return int(os.environ[ENV_TOTAL]) - self.resident
        return int(os.environ.get(ENV_AVAILABLE, str(AVAILABLE_BYTES)))

    def energy_meter(self) -> Any:
        """An energy counter only where a test asks for one (FAKE_ENERGY_W / _ABSENT), made
        once per chip as real backends do."""
        from pytest_llmperf.energy import AbsentMeter

        if getattr(self, "_energy", None) is None:
            if ENV_ENERGY_ABSENT in os.environ:
                self._energy: Any = AbsentMeter("fake-counter", os.environ[ENV_ENERGY_ABSENT])
            elif ENV_ENERGY_W in os.environ:
                self._energy = fake_energy_meter(self)
            else:
                return None
        return self._energy

    def memory_bandwidth(self) -> Any:
        from pytest_llmperf.roofline import PUBLISHED, Bandwidth

        self.bandwidth_asked += 1
        if ENV_BANDWIDTH not in os.environ:
            return None
        return Bandwidth(float(os.environ[ENV_BANDWIDTH]), PUBLISHED, "fake datasheet", "Fake Chip")


def fake_energy_meter(backend: FakeBackend) -> Any:
    """The fake chip's energy counter: FAKE_ENERGY_W watts for as long as its clock ran, read
    on the chip's own clock (binary-fraction watts keep every delta exact). The energy module
    is imported here, not at the top: only tests that ask for a counter need it."""
    from pytest_llmperf.energy import EnergyMeter

    class FakeEnergyMeter(EnergyMeter):
        name = "fake-counter"

        def __init__(self) -> None:
            super().__init__(clock=lambda: backend.now)
            self.reads = 0

        def _read_parts(self) -> Optional[list[tuple[str, float]]]:
            self.reads += 1
            backend.events.append("energy")
            if str(self.reads) in os.environ.get(ENV_ENERGY_FAIL, "").split(","):
                return None
            return [("fake:0", float(os.environ.get(ENV_ENERGY_W, "0")) * backend.now)]

    return FakeEnergyMeter()


class FakeModel:
    """A loaded fake model: holds its weight bytes on the backend until it is garbage."""

    def __init__(self, backend: FakeBackend, nbytes: int) -> None:
        self.backend = backend
        self.calls = 0
        backend.resident += nbytes
        weakref.finalize(self, _release, backend, nbytes)


def _release(backend: FakeBackend, nbytes: int) -> None:
    backend.resident -= nbytes


class MissingSdkBackend(Backend):
    """Hardware whose vendor stack is not installed: the probe's import fails."""

    name: ClassVar[str] = "fakeoff"

    def _probe_impl(self) -> Probe:
        raise ModuleNotFoundError("No module named 'fake_sdk'")


class WordTokenizer:
    """Just enough of a tokenizer for ``models.encode_prompt``: one id per word; ``decode``
    gives back the words it encoded, and ``<id>`` for ids it never made (generated ones)."""

    bos_token_id = None
    pad_token_id = 0

    def __init__(self) -> None:
        self.words: dict[int, str] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = []
        for word in text.split():
            ids.append(4 + sum(map(ord, word)) % 1000)
            self.words[ids[-1]] = word
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.words.get(int(i), f"<{int(i)}>") for i in ids)


class FakeEngine(Engine):
    """Generates ``new_tokens`` per row by advancing the backend's clock token by token."""

    name: ClassVar[str] = "fake-engine"
    options: ClassVar[dict[str, tuple[type, ...]]] = {"attn": (str,), "layers": (list,)}
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "image-encoder")
    #: Tokens produced short of those asked for (a broken engine).
    missing_tokens: ClassVar[int] = 0
    #: Seconds spent after the last token inside the call (e.g. a host copy).
    overhead_s: ClassVar[float] = 0.0

    def load(self, model: Any, spec: Any, backend: Backend, store: Any = None) -> LoadedModel:
        backend.synchronize()
        start = backend.clock()
        backend.advance(LOAD_S, "load")
        backend.synchronize()
        weight_bytes = self.weight_bytes(model, spec.dtype)
        return LoadedModel(
            model=FakeModel(backend, weight_bytes),
            tokenizer=WordTokenizer(),
            real_tokenizer=False,
            weight_source="fake-seed-0",
            weight_bytes=weight_bytes,
            load_time_s=backend.clock() - start,
            dtype=spec.dtype,
            devices=spec.devices,
        )

    def generate(self, loaded: LoadedModel, prompt: Any, new_tokens: int, on_token: Any) -> Any:
        import torch

        input_ids = prompt.input_ids
        state = loaded.model
        backend: FakeBackend = state.backend
        if state.calls == 0:
            backend.advance(COMPILE_S, "compile")
        state.calls += 1
        factor = slowdown()
        burst = os.environ.get(ENV_BURST)
        if burst:
            burst_factor, calls = burst.split(":")
            if state.calls <= int(calls):
                factor *= float(burst_factor)
        produced = new_tokens - self.missing_tokens
        for i in range(produced):
            backend.advance((PREFILL_S if i == 0 else DECODE_S) * factor, "token")
            if on_token is not None:
                on_token()
        if self.overhead_s:
            backend.advance(self.overhead_s, "overhead")
        shift = int(os.environ.get(ENV_OUTPUT_SHIFT, "0"))
        new = torch.arange(produced, dtype=torch.long) % 50 + 5 + shift
        new = new.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)

    def forward(self, loaded: LoadedModel, inputs: dict[str, Any]) -> Any:
        """One forward pass: ``FORWARD_S`` (times the slowdown), the first call compiling."""
        state = loaded.model
        backend: FakeBackend = state.backend
        if state.calls == 0:
            backend.advance(COMPILE_S, "compile")
        state.calls += 1
        backend.advance(FORWARD_S * slowdown(), "forward")
        return inputs


class ShortEngine(FakeEngine):
    name: ClassVar[str] = "fake-short"
    missing_tokens: ClassVar[int] = 1


class OverheadEngine(FakeEngine):
    name: ClassVar[str] = "fake-overhead"
    overhead_s: ClassVar[float] = 0.25


class OomEngine(FakeEngine):
    name: ClassVar[str] = "fake-oom"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        import torch

        raise torch.OutOfMemoryError("fake: tried to allocate 2.00 GiB")


class BatchOomEngine(FakeEngine):
    """Runs out of memory from the batch size in ``FAKE_OOM_BATCH`` on (a device whose memory
    the estimate did not foresee); counts the calls it got in ``calls_by_batch``."""

    name: ClassVar[str] = "fake-batch-oom"
    calls_by_batch: ClassVar[dict[int, int]] = {}

    def generate(self, loaded: LoadedModel, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        batch = int(prompt.input_ids.shape[0])
        self.calls_by_batch[batch] = self.calls_by_batch.get(batch, 0) + 1
        limit = os.environ.get(ENV_OOM_BATCH)
        if limit and batch >= int(limit):
            raise torch.OutOfMemoryError(f"fake: batch {batch} does not fit")
        return super().generate(loaded, prompt, *args, **kwargs)


class CrashEngine(FakeEngine):
    """Loads fine, then fails inside generate (a kernel fault): an error, not an OOM."""

    name: ClassVar[str] = "fake-crash"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("fake: illegal instruction in kernel")


class SegfaultEngine(FakeEngine):
    """Takes the whole process down, as a native extension's bad pointer does."""

    name: ClassVar[str] = "fake-segfault"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        import signal
        import sys

        print("fake: about to dereference a bad pointer", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)


class ExitEngine(FakeEngine):
    """A library that calls sys.exit(3) deep inside."""

    name: ClassVar[str] = "fake-exit"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        import sys

        sys.exit(3)


class HangEngine(FakeEngine):
    """Never returns (a deadlock in a collective): only a timeout ends it."""

    name: ClassVar[str] = "fake-hang"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        import time

        while True:
            time.sleep(60)


class RankCrashEngine(FakeEngine):
    """Runs on every rank but rank 1, which dies: a crash in one rank of a group."""

    name: ClassVar[str] = "fake-rank-crash"

    def generate(self, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get("RANK") == "1":
            os._exit(7)
        return super().generate(loaded, *args, **kwargs)


def register_all() -> None:
    backends.register(FakeBackend, replace=True)
    backends.register(MissingSdkBackend, replace=True)
    for engine in (
        FakeEngine(),
        ShortEngine(),
        OverheadEngine(),
        OomEngine(),
        BatchOomEngine(),
        CrashEngine(),
        SegfaultEngine(),
        ExitEngine(),
        HangEngine(),
        RankCrashEngine(),
    ):
        engines.register(engine)
