"""Several devices under DeepSpeed's launcher: ``python -m deepspeed.launcher.runner`` (the
``deepspeed`` command) starts one rank per device, each running the same rank entry as the
torchrun launcher (``python -m pytest_llmperf.worker --rank``).

The contract is the torchrun launcher's, and so is the code (:class:`DeepSpeedLauncher` only
says how the group is started): rank 0 returns the record; a rank that crashes fails the
workload with the launcher's exit code, the rank's own exit code as DeepSpeed's launch logs it,
and the tail of the group's output; a timeout kills the runner, its ``launch`` process and every
rank (the descendants are listed before anything is killed), so no rank outlives the test.

The command is the one optimum-habana's ``gaudi_spawn.py --use_deepspeed`` builds for one node
(``deepspeed --num_nodes 1 --num_gpus N --no_local_rank --master_port P``) plus
``--master_addr 127.0.0.1`` (no ``hostname -I`` over ssh when a hostfile exists) and
``--module`` (the rank entry is a module). What each rank gets from DeepSpeed 0.19.8's
``launcher/launch.py``: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_SIZE``, ``CROSS_RANK``/``CROSS_SIZE`` and the accelerator's
visible-devices variable (CUDA_VISIBLE_DEVICES for cuda, cpu and hpu, ZE_AFFINITY_MASK for
xpu) listing the node's slots — ``torchrun.init_rank`` joins the group from the first four, as
under torchrun, and DeepSpeed's ``init_distributed`` then wraps that group.

- ``DS_ACCELERATOR`` is set for the runner and the ranks to the backend's accelerator unless the
  user set it (DeepSpeed picks one per process; on a CPU host it counts NUMA nodes as devices,
  which is why ``--num_gpus`` is always given).
- Where the backend's visible-devices variable is the one DeepSpeed's accelerator manages
  (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK) and is set, it is narrowed to the first N entries
  and ``--num_gpus`` left out: DeepSpeed's runner then keeps those devices (with ``--num_gpus``
  it drops the variable and takes devices 0..N-1).
- Gaudi: the ranks get ``PT_HPU_ENABLE_LAZY_COLLECTIVES=true`` and
  ``PT_HPU_LAZY_ACC_PAR_MODE=0`` (``torchrun.RANK_DEFAULTS``) and join over hccl
  (``HpuBackend.distributed_backend``). optimum-habana's other way, ``gaudi_spawn.py --use_mpi``
  (``mpirun -n N --bind-to core --map-by socket:PE=k``), is not built.

More than one node: ``LLMPERF_DEEPSPEED_ARGS`` passes DeepSpeed's own resource options through
(checked here; anything else is a one-line error naming the variable), e.g.
``LLMPERF_DEEPSPEED_ARGS="--hostfile=/etc/hostfile --master_addr=node-0"`` with a hostfile of
``node-0 slots=8`` lines, or ``--include=node-0:0,1@node-1:0,1``. Then neither ``--num_nodes``
nor ``--num_gpus`` nor ``--master_addr`` is added (DeepSpeed refuses them beside
``--include``/``--exclude``); the resources must add up to the workload's ``devices`` (a rank
group of another size is an error record saying so), ssh must reach every host, and the
request and reply files (``TMPDIR``) and ``--llmperf-cache-dir`` must be on a filesystem all
nodes share, rank 0 on this node. torchrun's multi-node form (``torchrun --nnodes=2
--nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node-0:29500``, run on every node) is not
started by the plugin. Neither multi-node form has been run by this project.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import ClassVar, Optional

from ..backends.base import Backend
from ..engines.deepspeed_inference import ACCELERATORS, free_port, install_reason
from ..errors import UsageError
from ..settings import DEEPSPEED_ARGS_ENV
from .base import exit_reason
from .torchrun import TorchrunLauncher, _failed_rank, _tail

#: DeepSpeed's resource options a user may pass through (multi-node, core binding); the ones
#: this launcher sets itself (``--num_gpus``, ``--master_port``, ``--module``,
#: ``--no_local_rank``) and the ones that change what runs (``--autotuning``, ``--no_python``)
#: are refused.
ARGS_ENV = DEEPSPEED_ARGS_ENV
_VALUE_OPTIONS = (
    "--hostfile",
    "--include",
    "--exclude",
    "--num_nodes",
    "--master_addr",
    "--launcher",
    "--launcher_args",
    "--bind_core_list",
    "--ssh_port",
    "--venv_script",
)
_FLAG_OPTIONS = ("--bind_cores_to_rank", "--no_ssh_check", "--force_multi")
_SHORT = {"-H": "--hostfile", "-i": "--include", "-e": "--exclude"}

#: DeepSpeed accelerators whose visible-devices variable its launcher manages itself.
_DS_VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}

#: The line DeepSpeed's launch writes when a rank exits non-zero (it then kills the others).
_RANK_EXIT = "exits with return code = "
#: DeepSpeed's runner and launch log every step at INFO (the world info, each rank's command,
#: each kill): ten lines that would push a rank's traceback out of an error record's tail.
_LAUNCHER_INFO = ("] [INFO] [runner.py:", "] [INFO] [launch.py:")


def passthrough(text: str) -> dict[str, Optional[str]]:
    """``LLMPERF_DEEPSPEED_ARGS`` as {option: value, None for a flag}; UsageError naming the
    variable for anything DeepSpeed's runner would not take here."""
    allowed = ", ".join(_VALUE_OPTIONS + _FLAG_OPTIONS)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{ARGS_ENV}={text!r}: {exc}") from None
    given: dict[str, Optional[str]] = {}
    while words:
        word = words.pop(0)
        option, equals, value = word.partition("=")
        option = _SHORT.get(option, option)
        if option in _FLAG_OPTIONS and not equals:
            given[option] = None
        elif option in _VALUE_OPTIONS:
            if not equals:
                if not words or words[0].startswith("-"):
                    raise UsageError(f"{ARGS_ENV}={text!r}: {option} needs a value")
                value = words.pop(0)
            given[option] = value
        else:
            raise UsageError(
                f"{ARGS_ENV}={text!r}: {word!r} is not passed through to DeepSpeed's launcher "
                f"(allowed: {allowed})"
            )
    nodes = given.get("--num_nodes")
    if nodes is not None and not (nodes.isdigit() and int(nodes) > 0):
        raise UsageError(f"{ARGS_ENV}={text!r}: --num_nodes={nodes!r} is not a node count")
    if {"--include", "--exclude"} & set(given) and nodes is not None:
        raise UsageError(
            f"{ARGS_ENV}={text!r}: DeepSpeed refuses --num_nodes beside --include/--exclude"
        )
    return given


class DeepSpeedLauncher(TorchrunLauncher):
    name: ClassVar[str] = "deepspeed"

    def unavailable(self) -> Optional[str]:
        # Package metadata only: importing DeepSpeed here would pick an accelerator for the
        # pytest process and cost seconds.
        reason = install_reason("the deepspeed launcher")
        return f"{reason}; launcher='torchrun' runs the ranks without it" if reason else None

    def command(self, ranks: int, backend: Backend, worker: list[str]) -> list[str]:
        given = passthrough(os.environ.get(ARGS_ENV, ""))
        resources = {"--hostfile", "--include", "--exclude"} & set(given)
        cmd = [self.settings.python, "-u", "-m", "deepspeed.launcher.runner"]
        if not resources:
            cmd.append("--num_nodes=1")
            if self._visible(backend, self.rank_env(ranks, backend)) is None:
                cmd.append(f"--num_gpus={ranks}")
        if "--master_addr" not in given and not resources:
            cmd.append("--master_addr=127.0.0.1")
        cmd += [f"--master_port={free_port()}", "--no_local_rank", "--module"]
        cmd += [option if value is None else f"{option}={value}" for option, value in given.items()]
        return [*cmd, *worker]

    def rank_env(self, ranks: int, backend: Backend) -> dict[str, str]:
        env = super().rank_env(ranks, backend)
        accelerator = ACCELERATORS.get(backend.torch_device)
        if accelerator:
            env.setdefault("DS_ACCELERATOR", accelerator)
        visible = self._visible(backend, env)
        if visible is not None:
            env[backend.visible_devices_env] = ",".join(visible[:ranks])
        return env

    def _visible(self, backend: Backend, env: dict[str, str]) -> Optional[list[str]]:
        """The entries of the backend's visible-devices variable in ``env`` when DeepSpeed's
        launcher manages that variable itself; else None."""
        name = _DS_VISIBLE.get(backend.torch_device)
        if not name or name != backend.visible_devices_env:
            return None
        entries = [v.strip() for v in env.get(name, "").split(",") if v.strip()]
        return entries or None

    def first_failure(self, log: Path) -> str:
        """DeepSpeed's launch names the failed rank's exit code (not the rank: it logs the
        last command it started), then kills the others; a signal's code is negative there and
        255-wrapped in the runner's own exit code, so the rank's is the one to read."""
        try:
            text = log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        _, found, after = text.partition(_RANK_EXIT)
        code = after.split()[0] if found and after.split() else ""
        if code.lstrip("-").isdigit():
            return f" (a rank {exit_reason(int(code))})"
        return _failed_rank(log)

    def tail(self, log: Path) -> str:
        return _tail(log, skip=lambda line: any(mark in line for mark in _LAUNCHER_INFO))
