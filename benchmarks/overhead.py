"""How much does llmperf's measuring add to what it measures? (goal: plugin / bare ≤ 1.01)

Why this script exists
----------------------
``llmperf.generate`` wraps every round in device syncs, clock reads and a per-token hook (for
TTFT/TPOT). On a tiny model that machinery is a visible share of a 75 ms ``generate``; the
plugin claims it costs at most 1 %. The claim is checked against the simplest honest
alternative: a bare, hand-timed ``model.generate`` loop on **the very model object the plugin
loaded**, with the same prompt ids and generation arguments, warm-up outside the timed
rounds, and exactly ``new_tokens`` per call (``min_new_tokens = max_new_tokens``, EOS off;
every bare output's length, and its tokens against the plugin's, are checked).

Why it is built like this
-------------------------
A single "median of the plugin's rounds / median of the bare rounds" printed 1.087, 1.002 and
1.017 in three runs back to back. On a shared 2-vCPU VM a 75 ms ``generate`` takes 130 ms for
a few rounds whenever the host is busy, and 1.8 s while another process in the VM competes
with torch's two threads: noise far above the 1 % being checked. So:

* the two sides run in short **blocks**: one plugin segment and one bare segment back to back
  (``--rounds`` timed calls each, after ``--warmup`` untimed ones). A block's contrast is
  log(plugin / bare) of one statistic per segment, so drift between blocks cancels;
* that statistic is by default the segment's **minimum**. Interference only ever adds time,
  in bursts, while the measuring machinery costs the same Python calls in every round: the
  minimum shifts by that cost exactly as the median does, but is not moved by a burst that
  covers a few rounds of one segment. On this VM it needs ~5x fewer blocks than the median
  for the same interval. ``--statistic median`` compares what the plugin reports, literally;
  it also counts costs that hit only some rounds (a GC pause), and needs a quiet machine;
* blocks **alternate which side goes first** (ABBA), so whatever the first segment of a block
  pays cancels between the two order groups;
* a block during which **other processes used CPU** (more than ``--max-foreign`` CPUs on
  average, from /proc/stat minus this process's own CPU time) is discarded: the question is
  what the plugin costs, not what a neighbour's test run costs. The rule looks only at the
  block as a whole, never at its timings or its order, so it cannot favour either side;
* the ratio is exp of the order-balanced 20 % trimmed mean of the kept blocks' log-ratios,
  with a 95 % **bootstrap interval that resamples blocks** (within order groups), never
  rounds (``_stats.py`` says why this estimate rather than a ratio of pooled medians);
* blocks are added until the interval's half-width is below ``--target`` (0.5 %), or the
  per-model ``--budget-s`` or ``--max-blocks`` is spent. Stopping on the width, never on the
  verdict, keeps the interval honest;
* the verdict comes from the interval only: **goal met** when its upper bound is ≤ 1.01,
  **goal missed** when its lower bound is > 1.01, **undecided** otherwise (and with fewer
  than 10 kept blocks: a bootstrap over a handful of blocks is too narrow to trust).

Per engine
----------
The per-token hook is installed by each engine (``Engine.generate(..., hook)``), around
whatever that engine's generate runs: accelerate's dispatch hooks, bitsandbytes' quantized
layers, DeepSpeed's wrapped module. So a second section measures every engine that runs here
(``--engines``), on one tiny model (``--engine-model``, tiny-llama): the plugin through
``llmperf.generate(engine=...)`` (inline, as a test's ``execute()`` runs it) against a bare
loop through **the same engine object and loaded model**: ``engine.generate(loaded, prompt,
new_tokens, hook=None)`` between a backend sync and a clock read, the prompt encoded as the
generate scenario encodes it. Blocks, order, the statistic, the foreign-CPU rule, the
interval and the verdict are the section above's. The section's own: the time budget
(``--engine-budget-s``, 30 s, a hard stop at 2x even before ``--min-blocks``) and, for the
slower engines' sake (ZeRO-3 and bitsandbytes take 4-8x plain transformers' time per token on
a tiny model), 50 new tokens (``--engine-new-tokens``): the stamp's cost is per token, so the
ratio hardly depends on the count. Every engine is measured in **its own process** (the
script runs itself with an internal flag): DeepSpeed starts a process group and picks its
accelerator once per process, and bitsandbytes may crash the interpreter. An engine that
cannot run here is listed with the skip reason the plugin would give (``execute.resolve``,
i.e. ``Engine.unsupported``).

An asynchronous device
----------------------
On CPU every kernel is done when the call returns, so what a sync per token costs on a GPU
does not show above. A first section (``--async-only`` runs it alone, ~10 s) builds a
CUDA-shaped fake: a device thread runs queued "kernels" that take real time (``time.sleep``,
so the host thread runs on meanwhile), events are stamped by that thread when it reaches them,
and ``synchronize()`` waits for the queue to drain plus a round trip. A fake generate spends
host time per step (Python, launches) and enqueues one kernel per token without waiting, as
transformers' generate does since its per-step stop check stopped syncing. Four ways of timing
the same generate, interleaved round by round in one run: bare (sync, clock, generate, sync,
clock), the plugin's ``measure.run_rounds`` with the backend's event timer, the same without
(sync and clock per token), and host clock reads per token without a sync (which stamp
kernel launch: tpot comes out as the host's step time, not the device's). The claim checked:
event stamps keep e2e within 1 % of bare; a sync per token does not (the device idles while
the host launches each next step).

Usage
-----
    python benchmarks/overhead.py                     # tiny models, then engines: ~5-10 min
    python benchmarks/overhead.py --async-only        # the fake asynchronous device alone
    python benchmarks/overhead.py --model tiny-llama --dtype bf16 --engines none
    python benchmarks/overhead.py --engines-only --engines accelerate,deepspeed-zero
    python benchmarks/overhead.py --quick             # 6 blocks each: checks the pipeline only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from _machine import ForeignCpu
from _stats import Interval, goal_verdict, paired_interval

from pytest_llmperf import engines, models
from pytest_llmperf.backends import Backend, get_backend
from pytest_llmperf.engines.base import Engine, LoadedModel, Prompt
from pytest_llmperf.errors import SkipWorkload, UsageError
from pytest_llmperf.execute import ModelCache, resolve
from pytest_llmperf.measure import run_rounds
from pytest_llmperf.runner import LLMPerf, TestContext
from pytest_llmperf.spec import WorkloadSpec

GOAL = 1.01
#: Per-segment statistic the blocks compare (see the module docstring for the default).
STATISTICS: dict[str, Callable[[list[float]], float]] = {"min": min, "median": statistics.median}
PROMPT = models.SEED_PROMPT
#: How an engine's child process hands its result back: one stdout line with this prefix.
RESULT_TAG = "overhead-result: "
#: Width of the name column of the per-engine section ("deepspeed-inference fp32").
ENGINE_WIDTH = 24
#: An engine stops at this many times its budget even before ``--min-blocks`` blocks have run:
#: on a busy machine a 0.4 s ZeRO-3 call takes seconds, and 16 blocks of 12 calls would not end.
ENGINE_CAP = 2.0


# ----------------------------------------------------------------------------- the two sides


@dataclass
class PluginSegment:
    """What one ``llmperf.generate`` call measured, and the objects it measured."""

    samples: list[float]
    loaded: Any
    prompt_tokens: int
    output_head: list[int] | None


def measure_with_plugin(
    backend: Backend,
    cache: ModelCache,
    model: str,
    *,
    dtype: str,
    new_tokens: int,
    rounds: int,
    warmup: int,
    tag: str,
    engine: str = "transformers",
) -> PluginSegment:
    """One plugin segment: the only function that knows anything of runner.py's internals.

    It measures through the path a test takes (a ``TestContext``, ``LLMPerf.generate``, the
    inline launcher, so ``execute()`` runs in this process) and reaches into ``ModelCache`` for
    one thing: the loaded model the plugin just timed, so the bare loop can time the very same
    object. Should runner.py change, adapt here only.
    """
    handle = LLMPerf(
        backend,
        TestContext(
            key=f"overhead:{engine}:{model}:{tag}",
            suite="overhead",
            nodeid="benchmarks/overhead.py",
            rounds=rounds,
            warmup=warmup,
            device_key=backend.device_key(),
            provenance={},
            # "auto" would run engines that may crash (bitsandbytes, DeepSpeed) in a child
            # process, out of reach of the bare loop; each engine has a process of its own here.
            launcher="inline",
        ),
        cache=cache,
    )
    record = handle.generate(
        model, engine=engine, dtype=dtype, new_tokens=new_tokens, prompt=PROMPT
    )
    if record.outcome != "ok":
        raise SystemExit(
            f"{engine} {model} {dtype}: not measured ({record.outcome}): {record.note}"
        )
    loaded = cache.loaded
    if loaded is None:
        raise SystemExit("ModelCache no longer exposes .loaded: adapt measure_with_plugin()")
    return PluginSegment(
        samples=list(record.metrics["e2e_latency_s"].samples),
        loaded=loaded,
        prompt_tokens=int(record.workload["prompt_tokens"]),
        output_head=record.output_head,
    )


class Bare(Protocol):
    """The bare side of a block: the object it times, and a timing loop."""

    loaded: Any
    prompt_tokens: int

    def measure(self, rounds: int, warmup: int) -> tuple[list[float], list[int]]: ...


@dataclass
class BareLoop:
    """A hand-written timing loop: what a careful user would measure without the plugin."""

    loaded: Any
    new_tokens: int
    input_ids: Any = field(init=False)
    mask: Any = field(init=False)
    prompt_tokens: int = field(init=False)
    kwargs: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        # The same prompt, encoded by the same tokenizer, as the plugin encodes it.
        self.input_ids, self.mask, self.prompt_tokens = models.encode_prompt(
            self.loaded.tokenizer, self.loaded.real_tokenizer, PROMPT, 1, None
        )
        pad = getattr(self.loaded.tokenizer, "pad_token_id", None)
        # Exactly new_tokens greedy tokens: the arguments the plugin's engine passes.
        self.kwargs = {
            "max_new_tokens": self.new_tokens,
            "min_new_tokens": self.new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "use_cache": True,
            "eos_token_id": None,
            "pad_token_id": 0 if pad is None else pad,
        }

    def measure(self, rounds: int, warmup: int) -> tuple[list[float], list[int]]:
        """``warmup`` untimed calls, then ``rounds`` timed ones; returns times and the tokens."""
        model = self.loaded.model
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                model.generate(self.input_ids, attention_mask=self.mask, **self.kwargs)
            for _ in range(rounds):
                t0 = time.perf_counter()
                out = model.generate(self.input_ids, attention_mask=self.mask, **self.kwargs)
                times.append(time.perf_counter() - t0)
                produced = out.shape[-1] - self.prompt_tokens
                assert produced == self.new_tokens, f"bare loop made {produced} tokens"
        return times, out[0, self.prompt_tokens :].tolist()


@dataclass
class EngineBareLoop:
    """The same engine, unstamped: ``engine.generate(..., hook=None)`` on the plugin's loaded
    model, between a device sync and a clock read, and nothing else.

    What stays on both sides is the engine's own work (its generate arguments, its
    ``inference_mode``, the hooks accelerate or DeepSpeed install); what differs is what the
    plugin adds: the per-token stamp (a wrapped ``forward``, a sync and a clock read per
    token), the timing loop and the token-count check.
    """

    engine: Engine
    loaded: LoadedModel
    backend: Backend
    new_tokens: int
    prompt: Prompt = field(init=False)
    prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        # As the generate scenario's prepare() encodes it, on the backend's device.
        ids, mask, self.prompt_tokens = models.encode_prompt(
            self.loaded.tokenizer, self.loaded.real_tokenizer, PROMPT, 1, None
        )
        device = self.backend.torch_device
        self.prompt = Prompt(ids.to(device), mask.to(device), self.prompt_tokens)

    def measure(self, rounds: int, warmup: int) -> tuple[list[float], list[int]]:
        generate, sync, clock = self.engine.generate, self.backend.synchronize, self.backend.clock
        args = (self.loaded, self.prompt, self.new_tokens, None)
        times: list[float] = []
        for _ in range(warmup):
            generate(*args)
        for _ in range(rounds):
            sync()
            t0 = clock()
            out = generate(*args)
            sync()
            times.append(clock() - t0)
            produced = out.shape[-1] - self.prompt_tokens
            assert produced == self.new_tokens, f"bare loop made {produced} tokens"
        return times, out[0, self.prompt_tokens :].tolist()


# ----------------------------------------------------------------------------- blocks


@dataclass
class ModelResult:
    model: str
    kept: int
    blocks: int
    plugin_ms: float
    bare_ms: float
    ratio: Interval | None
    stop: str
    seconds: float
    #: How the engine ran (``LoadedModel.note``), for the per-engine section.
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelResult:
        ratio = data.get("ratio")
        return cls(**{**data, "ratio": Interval(**ratio) if ratio else None})


def balanced(plugin_first: list[bool]) -> int:
    """Blocks in the smaller order group: the estimate needs both orders."""
    return min(sum(plugin_first), len(plugin_first) - sum(plugin_first))


def run_blocks(
    name: str,
    plugin: Callable[[str], PluginSegment],
    bare: Bare,
    args: argparse.Namespace,
    *,
    budget_s: float,
    start: float,
    cap_s: float = math.inf,
) -> ModelResult:
    """Interleaved blocks until the interval is narrow enough or time (from ``start``) is up:
    ``budget_s`` once ``--min-blocks`` blocks have run, ``cap_s`` in any case."""

    def block(plugin_first: bool, tag: str) -> tuple[list[float], list[float]]:
        """One plugin and one bare segment back to back: (plugin times, bare times)."""
        if plugin_first:
            seg = plugin(tag)
            times, tokens = bare.measure(args.rounds, args.warmup)
        else:
            times, tokens = bare.measure(args.rounds, args.warmup)
            seg = plugin(tag)
        # The same object, the same prompt, the same tokens: the same workload.
        if seg.loaded is not bare.loaded:
            raise SystemExit(f"{name}: the plugin reloaded the model between blocks")
        if seg.prompt_tokens != bare.prompt_tokens:
            raise SystemExit(f"{name}: prompt of {seg.prompt_tokens} vs {bare.prompt_tokens}")
        if seg.output_head is not None and tokens[: len(seg.output_head)] != seg.output_head:
            raise SystemExit(f"{name}: the bare loop generated other tokens than the plugin")
        return seg.samples, times

    stat = STATISTICS[args.statistic]
    contrasts: list[float] = []
    plugin_first: list[bool] = []
    plugin_all: list[float] = []
    bare_all: list[float] = []
    monitor = ForeignCpu()
    blocks = 0
    stop = "max blocks"
    while blocks < args.max_blocks:
        order = blocks % 2 == 0
        monitor.start()
        p, b = block(order, str(blocks))
        foreign = monitor.cpus()
        blocks += 1
        if foreign is None or foreign <= args.max_foreign:
            contrasts.append(math.log(stat(p) / stat(b)))
            plugin_first.append(order)
            plugin_all += p
            bare_all += b
        if 2 * balanced(plugin_first) >= args.min_blocks:
            iv = paired_interval(contrasts, plugin_first).map(np.exp)
            if iv.half_width < args.target:
                stop = "target reached"
                break
        spent = time.monotonic() - start
        if spent > budget_s and blocks >= args.min_blocks:
            stop = "budget spent"
            break
        if spent > cap_s:
            stop = "time cap"
            break
    return ModelResult(
        model=name,
        kept=len(contrasts),
        blocks=blocks,
        plugin_ms=statistics.median(plugin_all) * 1000 if plugin_all else math.nan,
        bare_ms=statistics.median(bare_all) * 1000 if bare_all else math.nan,
        ratio=paired_interval(contrasts, plugin_first).map(np.exp)
        if balanced(plugin_first)
        else None,
        stop=stop,
        seconds=time.monotonic() - start,
    )


# ----------------------------------------------------------------------------- one model


def measure_model(model: str, backend: Backend, args: argparse.Namespace) -> ModelResult:
    """The transformers engine on ``model``: plugin against a hand-written ``model.generate``."""
    cache = ModelCache()
    start = time.monotonic()

    def plugin(tag: str) -> PluginSegment:
        return measure_with_plugin(
            backend,
            cache,
            model,
            dtype=args.dtype,
            new_tokens=args.new_tokens,
            rounds=args.rounds,
            warmup=args.warmup,
            tag=tag,
        )

    # Loads (and warms) the model, outside any timed round; these rounds are not used.
    bare = BareLoop(plugin("load").loaded, args.new_tokens)
    return run_blocks(model, plugin, bare, args, budget_s=args.budget_s, start=start)


# ----------------------------------------------------------------------------- one engine


def engine_dtype(engine: Engine, wanted: str) -> str:
    """``--dtype`` where the engine runs it, else the engine's own (bnb: int8, int4)."""
    return wanted if wanted in engine.dtypes else engine.dtypes[0]


def engine_skip(name: str, backend: Backend, args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """(dtype, why the engine cannot run here or None), decided as the plugin decides a skip:
    ``execute.resolve`` (device count, then ``Engine.unsupported``), without loading anything."""
    try:
        engine = engines.get_engine(name)
    except UsageError as exc:
        return "-", str(exc)
    dtype = engine_dtype(engine, args.dtype)
    spec = WorkloadSpec(
        kind="generate",
        model=args.engine_model,
        engine=name,
        dtype=dtype,
        new_tokens=args.engine_new_tokens,
        prompt=PROMPT,
        rounds=args.rounds,
        warmup=args.warmup,
    )
    try:
        resolve(spec, backend)
    except (SkipWorkload, UsageError) as exc:
        return dtype, str(exc)
    return dtype, None


def measure_engine(name: str, backend: Backend, args: argparse.Namespace) -> ModelResult:
    """``name`` on ``--engine-model``: plugin against the engine's own generate, unstamped."""
    engine = engines.get_engine(name)
    dtype = engine_dtype(engine, args.dtype)
    cache = ModelCache()
    start = time.monotonic()

    def plugin(tag: str) -> PluginSegment:
        return measure_with_plugin(
            backend,
            cache,
            args.engine_model,
            engine=name,
            dtype=dtype,
            new_tokens=args.engine_new_tokens,
            rounds=args.rounds,
            warmup=args.warmup,
            tag=tag,
        )

    try:
        loaded = plugin("load").loaded
        bare = EngineBareLoop(engine, loaded, backend, args.engine_new_tokens)
        label = f"{name} {dtype}"
        budget = args.engine_budget_s
        result = run_blocks(
            label, plugin, bare, args, budget_s=budget, start=start, cap_s=ENGINE_CAP * budget
        )
        result.note = loaded.note
        return result
    finally:
        cache.drop(backend)


def engine_worker(name: str, args: argparse.Namespace) -> int:
    """The child process of one engine: measure, print one tagged JSON line, exit."""
    backend = get_backend("cpu")
    try:
        payload: dict[str, Any] = {"result": measure_engine(name, backend, args).to_json()}
    except SkipWorkload as exc:  # found out at load (DeepSpeed's import, its dtypes)
        payload = {"skip": str(exc)}
    print(RESULT_TAG + json.dumps(payload), flush=True)
    return 0


def run_engine(name: str, argv: Sequence[str], args: argparse.Namespace) -> str:
    """One engine in a child process (this script with ``--engine-worker``): its table line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--engine-worker", name]
    timeout = ENGINE_CAP * args.engine_budget_s + 600  # a first DeepSpeed start builds an op
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"error: no result after {timeout:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            payload = json.loads(line[len(RESULT_TAG) :])
            if "skip" in payload:
                return f"skipped: {payload['skip']}"
            result = ModelResult.from_json(payload["result"])
            text = render(result, ENGINE_WIDTH)
            return text + (f"\n{'':{ENGINE_WIDTH}} ({result.note})" if result.note else "")
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"error (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"


# ----------------------------------------------------------------------------- output


def render(r: ModelResult, width: int = 11) -> str:
    head = f"{r.model:<{width}} {r.kept:3d}/{r.blocks:<3d} blocks  "
    tail = f"({r.stop}, {r.seconds:.0f} s)"
    iv = r.ratio
    if iv is None:
        return head + f"no verdict: too few blocks without competing processes  {tail}"
    verdict = goal_verdict(iv, GOAL, n=r.kept)
    return head + (
        f"bare {r.bare_ms:6.2f} ms  plugin {r.plugin_ms:6.2f} ms  ratio {iv.estimate:.4f} "
        f"[{iv.low:.4f}, {iv.high:.4f}] ±{iv.half_width:.2%}  {verdict}  {tail}"
    )


def load_line(when: str) -> str:
    try:
        one, five, _ = os.getloadavg()
    except (AttributeError, OSError):
        return f"load      unknown ({when})"
    return (
        f"load      load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} "
        f"CPUs, {when}"
    )


# ----------------------------------------------------------------------------- async device

#: The fake device's work per token and the host's per step, in seconds (a small GPU model:
#: the device is the bottleneck, the host runs ahead unless something makes it wait).
ASYNC_PREFILL_S = 0.008
ASYNC_DECODE_S = 0.002
ASYNC_HOST_STEP_S = 0.0003
#: What a synchronize costs beyond waiting for the queue: the driver's round trip.
ASYNC_SYNC_RTT_S = 0.00005
ASYNC_NEW_TOKENS = 64


class _Marker:
    """A device event: the device thread writes its time when it gets past it."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = math.nan


class AsyncDevice:
    """A queue of kernels run by one device thread, CUDA-style: launching returns at once."""

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fake-device", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            kind, arg = self._queue.get()
            if kind == "kernel":
                time.sleep(arg)
            elif kind == "event":
                arg.t = time.perf_counter()
            elif kind == "fence":
                arg.set()
            else:
                return

    def launch(self, seconds: float) -> None:
        self._queue.put(("kernel", seconds))

    def record(self) -> _Marker:
        marker = _Marker()
        self._queue.put(("event", marker))
        return marker

    def synchronize(self) -> None:
        import threading

        fence = threading.Event()
        self._queue.put(("fence", fence))
        fence.wait()
        time.sleep(ASYNC_SYNC_RTT_S)

    def close(self) -> None:
        self._queue.put(("stop", None))
        self._thread.join()


class AsyncEventTimer:
    def __init__(self, device: AsyncDevice) -> None:
        self.device = device

    def record(self) -> _Marker:
        return self.device.record()

    def elapsed(self, start: _Marker, end: _Marker) -> float:
        return end.t - start.t


class AsyncBackend(Backend):
    """The fake device as a backend; ``events=False`` is a device without event support."""

    name = "async-fake"

    def __init__(self, device: AsyncDevice, *, events: bool) -> None:
        self.device = device
        self.timer = AsyncEventTimer(device) if events else None

    def synchronize(self) -> None:
        self.device.synchronize()

    def event_timer(self) -> Any:
        return self.timer


def async_generate(device: AsyncDevice, hook: Optional[Callable[[], None]]) -> int:
    """One kernel per token, no sync: host step, launch, then the per-token hook (as
    ``token_stamps`` calls it after each forward returns)."""
    for i in range(ASYNC_NEW_TOKENS):
        time.sleep(ASYNC_HOST_STEP_S)
        device.launch(ASYNC_PREFILL_S if i == 0 else ASYNC_DECODE_S)
        if hook is not None:
            hook()
    return ASYNC_NEW_TOKENS


@dataclass
class AsyncSide:
    label: str
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


def measure_async(rounds: int) -> list[AsyncSide]:
    """The four ways, interleaved round by round (the order rotates), in this process."""
    device = AsyncDevice()
    events = AsyncBackend(device, events=True)
    synced = AsyncBackend(device, events=False)
    bare = AsyncSide("bare generate (sync, clock, generate, sync, clock)")
    with_events = AsyncSide("plugin, event stamps (run_rounds, event timer)")
    per_token = AsyncSide("plugin, sync per token (run_rounds, no events)")
    host_only = AsyncSide("host clock per token, no sync (launch, not completion)")
    clock = time.perf_counter

    def run_bare() -> None:
        device.synchronize()
        t0 = clock()
        async_generate(device, None)
        device.synchronize()
        bare.e2e.append(clock() - t0)

    def run_plugin(backend: AsyncBackend, side: AsyncSide) -> None:
        timing = run_rounds(
            backend,
            lambda hook: async_generate(device, hook),
            rounds=1,
            warmup=0,
            new_tokens=ASYNC_NEW_TOKENS,
            count_new_tokens=lambda n: n,
        )
        side.e2e += timing.e2e
        side.ttft += timing.ttft
        side.tpot += timing.tpot

    def run_host_only() -> None:
        stamps: list[float] = []
        device.synchronize()
        t0 = clock()
        async_generate(device, lambda: stamps.append(clock()))
        device.synchronize()
        host_only.e2e.append(clock() - t0)
        host_only.ttft.append(stamps[0] - t0)
        host_only.tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

    ways: list[Callable[[], None]] = [
        run_bare,
        lambda: run_plugin(events, with_events),
        lambda: run_plugin(synced, per_token),
        run_host_only,
    ]
    try:
        for way in ways:  # warm-up: thread start, first sleeps
            way()
        for side in (bare, with_events, per_token, host_only):
            side.e2e.clear()
            side.ttft.clear()
            side.tpot.clear()
        for r in range(rounds):
            for k in range(len(ways)):
                ways[(r + k) % len(ways)]()
    finally:
        device.close()
    return [bare, with_events, per_token, host_only]


def render_async(sides: list[AsyncSide], rounds: int) -> list[str]:
    bare = statistics.median(sides[0].e2e)
    lines = [
        f"async     fake device: prefill {ASYNC_PREFILL_S * 1e3:g} ms, decode "
        f"{ASYNC_DECODE_S * 1e3:g} ms/token on the device thread, host "
        f"{ASYNC_HOST_STEP_S * 1e3:g} ms/step, sync round trip {ASYNC_SYNC_RTT_S * 1e6:g} µs, "
        f"{ASYNC_NEW_TOKENS} tokens; medians of {rounds} rounds each, interleaved",
        "",
        f"{'timing':<56} {'e2e ms':>9} {'÷ bare':>7} {'ttft ms':>8} {'tpot ms':>8}",
    ]
    for side in sides:
        e2e = statistics.median(side.e2e)
        ttft = f"{statistics.median(side.ttft) * 1e3:8.3f}" if side.ttft else f"{'-':>8}"
        tpot = f"{statistics.median(side.tpot) * 1e3:8.3f}" if side.tpot else f"{'-':>8}"
        lines.append(f"{side.label:<56} {e2e * 1e3:9.2f} {e2e / bare:7.4f} {ttft} {tpot}")
    events_ratio = statistics.median(sides[1].e2e) / bare
    synced_ratio = statistics.median(sides[2].e2e) / bare
    lines += [
        "",
        f"event stamps: e2e ×{events_ratio:.4f} of bare ("
        + ("within" if events_ratio <= GOAL else "NOT within")
        + f" 1 %); sync per token: ×{synced_ratio:.4f}"
        + (" (worse)" if synced_ratio > GOAL else " (no worse: the claim is not shown)"),
    ]
    return lines


# ----------------------------------------------------------------------------- main


def parse_engines(text: str) -> list[str]:
    """``all`` (every implemented engine, the registry's order first), ``none``, or a list."""
    implemented = engines.implemented()
    if text == "all":
        return [e for e in engines.ENGINE_IDS if e in implemented] + [
            e for e in implemented if e not in engines.ENGINE_IDS
        ]
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = set(engines.ENGINE_IDS) | set(implemented)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown engine {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    tiny = models.models_for_tier("tiny")
    p.add_argument("--model", choices=tiny, help="one model (default: every tiny model)")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=models.DTYPES,
        help="default fp32; engines that do not run it (bnb: int8, int4) use their own",
    )
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per side per block (≥ 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side per block")
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="min",
        help="per-segment statistic compared within a block (default min)",
    )
    p.add_argument("--min-blocks", type=int, default=16, help="kept blocks before stopping")
    p.add_argument("--max-blocks", type=int, default=400)
    p.add_argument("--budget-s", type=float, default=100.0, help="per model (default ≤ ~6 min)")
    p.add_argument("--target", type=float, default=0.005, help="interval half-width to reach")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.1,
        help="discard a block when other processes used more CPUs than this on average",
    )
    p.add_argument(
        "--engines",
        type=parse_engines,
        default="all",
        help="comma-separated engines for the per-engine section, 'all' (default: every "
        "implemented one; those that cannot run here are listed with the reason) or 'none'",
    )
    p.add_argument("--engines-only", action="store_true", help="skip the per-model section")
    p.add_argument("--engine-model", default="tiny-llama", choices=tiny)
    p.add_argument(
        "--engine-new-tokens",
        type=int,
        default=50,
        help="new tokens per call in the per-engine section (default 50: ZeRO-3 and "
        "bitsandbytes take 4-8x the time of plain transformers per token here)",
    )
    p.add_argument(
        "--engine-budget-s",
        type=float,
        default=30.0,
        help=f"per engine, its load included: stops there once --min-blocks blocks have run, "
        f"at {ENGINE_CAP:g}x in any case (default 30)",
    )
    p.add_argument("--engine-worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--async-only",
        action="store_true",
        help="only the fake asynchronous device section (event stamps vs a sync per token)",
    )
    p.add_argument(
        "--async-rounds",
        type=int,
        default=25,
        help="rounds per timing way on the fake asynchronous device (default 25)",
    )
    p.add_argument("--quick", action="store_true", help="6 blocks each: a pipeline check")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds: the plugin measures at least 5 rounds")
    if args.quick:
        args.min_blocks = args.max_blocks = 6
    args.models = [] if args.engines_only else [args.model] if args.model else tiny
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.engine_worker:
        return engine_worker(args.engine_worker, args)
    print("\n".join(render_async(measure_async(args.async_rounds), args.async_rounds)))
    print(flush=True)
    if args.async_only:
        return 0
    backend = get_backend("cpu")
    print(f"machine   {backend.device_key()} (torch {torch.__version__}, {os.cpu_count()} CPUs)")
    print(load_line("at the start"))
    print(
        f"settings  {args.dtype}, bs=1, {args.new_tokens} new tokens, prompt {PROMPT!r}; per "
        f"block {args.rounds} timed + {args.warmup} warm-up calls per side, order alternating"
    )
    print(
        f"stopping  half-width < {args.target:.2%} after ≥ {args.min_blocks} kept blocks, or "
        f"{args.budget_s:.0f} s / {args.max_blocks} blocks per model; blocks kept/run: a block "
        f"is discarded when other processes used > {args.max_foreign} CPU"
        + ("  [--quick: a pipeline check, not a figure]" if args.quick else "")
    )
    print(
        f"ratio     plugin/bare of each segment's {args.statistic}, 95 % bootstrap interval over "
        f"kept blocks; goal ≤ {GOAL}; bare/plugin ms: medians of all kept rounds"
    )
    print()
    for model in args.models:
        print(render(measure_model(model, backend, args)), flush=True)
    if not args.engines:
        return 0
    if args.models:
        print()
        print(load_line("after the models"))
    print(
        f"engines   {args.engine_model}, {args.engine_new_tokens} new tokens, each engine in its "
        f"own process, {args.engine_budget_s:.0f} s each after ≥ {args.min_blocks} blocks, "
        f"{ENGINE_CAP * args.engine_budget_s:.0f} s at most; bare = the engine's generate("
        "hook=None) between sync and clock, plugin = llmperf.generate(engine=...) inline"
    )
    print()
    for name in args.engines:
        dtype, reason = engine_skip(name, backend, args)
        label = f"{name} {dtype}"
        line = f"skipped: {reason}" if reason else run_engine(name, argv, args)
        # A measured line starts with the label already; the others get it here.
        print(line if line.startswith(label) else f"{label:<{ENGINE_WIDTH}} {line}", flush=True)
    print()
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
