"""What child processes run: ``python -m pytest_llmperf.worker``.

Two modes, one reply format (a JSON object with exactly one of ``record``, ``usage``, ``skip``
or ``error``):

* **serve** (the process launcher): one request per line on stdin (``{"spec", "context",
  "backend"}``), one reply per line on the protocol channel, until stdin closes. Before its
  reply, lines ``{"progress": {...}}`` (``progress.Progress``, sent between rounds) tell the
  launcher where the workload stands. The worker keeps the loaded model between requests, as
  the inline launcher does.
* **rank** (``--rank --request FILE --out FILE [--progress FILE]``, under
  ``torch.distributed.run``): every rank executes the same spec with clocks read after a
  barrier; rank 0 appends its progress events to the progress file and writes the reply to
  the out file.

Whatever else the worker or a library prints goes to stderr: file descriptor 1 is pointed at
stderr before anything runs, so a chatty model cannot corrupt the protocol. Backends and engines
that a conftest registered in code are unknown here unless their module is named in
``LLMPERF_WORKER_IMPORTS`` (``module`` or ``module:function`` to call, comma-separated);
entry-point plugins load by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional

from .settings import MEMORY_LIMIT_ENV, WORKER_IMPORTS_ENV


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_llmperf.worker")
    parser.add_argument("--rank", action="store_true", help="one rank of a torchrun group")
    parser.add_argument("--request", help="the request (JSON file), with --rank")
    parser.add_argument("--out", help="where rank 0 writes its reply, with --rank")
    parser.add_argument("--progress", help="where rank 0 appends progress events, with --rank")
    args = parser.parse_args(argv)
    channel = _protocol_channel()
    _import_plugins()
    if args.rank:
        progress = Path(args.progress) if args.progress else None
        return _rank(Path(args.request), Path(args.out), progress)
    return _serve(channel)


def _protocol_channel() -> IO[str]:
    """A private copy of stdout for replies; fd 1 then writes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _import_plugins() -> None:
    for entry in filter(
        None, (e.strip() for e in os.environ.get(WORKER_IMPORTS_ENV, "").split(","))
    ):
        module, _, function = entry.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()


def _serve(channel: IO[str]) -> int:
    from .execute import ModelCache

    cache = ModelCache()
    for line in sys.stdin:
        if line.strip():
            reply = handle(json.loads(line), cache, progress=_events_to(channel))
            channel.write(json.dumps(reply) + "\n")
            channel.flush()
    return 0


def _events_to(sink: IO[str]) -> Any:
    """Progress events as lines ``{"progress": {...}}`` on ``sink``, ahead of the reply (the
    launcher reads them while it waits). Written between rounds only, as run_rounds calls."""

    def send(event: Any) -> None:
        sink.write(json.dumps({"progress": event.to_json()}) + "\n")
        sink.flush()

    return send


def handle(
    request: dict[str, Any], cache: Any = None, backend: Any = None, progress: Any = None
) -> dict[str, Any]:
    """Execute one request; every outcome, an exception included, becomes a reply."""
    from . import backends
    from .errors import SkipWorkload, UsageError
    from .execute import execute
    from .spec import RecordContext, WorkloadSpec

    try:
        spec = WorkloadSpec.from_json(request["spec"])
        context = RecordContext.from_json(request["context"])
        if backend is None:
            backend = _backend(backends, request["backend"])
        record = execute(spec, context, backend, cache, progress)
        return {"record": record.to_json()}
    except UsageError as exc:
        return {"usage": str(exc)}
    except SkipWorkload as exc:
        return {"skip": str(exc)}
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {
            "error": f"{type(exc).__name__}: {text[0] if text else ''}"[:500],
            "traceback": traceback.format_exc()[-4000:],
        }


def _backend(backends: Any, name: str) -> Any:
    try:
        backend = backends.get_backend(name)
    except KeyError as exc:
        raise RuntimeError(
            f"{exc.args[0]} in the worker process: a backend registered in a conftest must be "
            f"importable here, list its module in {WORKER_IMPORTS_ENV}"
        ) from None
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit and backend.memory_limit is None:  # once per process: the cap stays
        backend.limit_memory(int(limit), in_worker=True)
    return backend


def _rank(request_path: Path, out: Path, progress: Optional[Path] = None) -> int:
    from . import backends
    from .launchers.torchrun import RankBackend, init_rank

    request = json.loads(request_path.read_text(encoding="utf-8"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    devices = int(request["spec"].get("devices", 1))
    if world != devices:
        # A hostfile or --include naming other resources than the workload's devices: a group
        # of the wrong size would measure another workload under this one's key.
        if int(os.environ.get("RANK", "0")) == 0:
            why = f"the launcher started {world} ranks, the workload asks for devices={devices}"
            _reply(out, {"error": why})
        return 0
    inner = _backend(backends, request["backend"])
    rank = init_rank(inner)
    with contextlib.ExitStack() as stack:
        events = None
        if rank == 0 and progress is not None:
            # Line-buffered: the launcher reads each event as it comes.
            sink = stack.enter_context(open(progress, "a", buffering=1, encoding="utf-8"))
            events = _events_to(sink)
        reply = handle(request, backend=RankBackend(inner), progress=events)
    if rank == 0:
        _reply(out, reply)
    return 0


def _reply(out: Path, reply: dict[str, Any]) -> None:
    """Written whole or not at all: the launcher reads the file once the group has exited."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(reply), encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
