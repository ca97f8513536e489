"""Backend registry: the built-in hardware plus third-party backends by entry point.

A package that supports new hardware declares::

    [project.entry-points."pytest_llmperf.backends"]
    mychip = "mychip_llmperf:MyChipBackend"

and ``--llmperf-backend=mychip`` selects it. Tests (and conftest files) may also call
:func:`register` directly.
"""

from __future__ import annotations

from ..entrypoints import load_once
from .base import Backend, Probe, normalize_device_name
from .cpu import CpuBackend
from .cuda import CudaBackend
from .hpu import HpuBackend
from .mps import MpsBackend
from .neuron import NeuronBackend
from .xpu import XpuBackend

__all__ = [
    "ACCELERATORS",
    "Backend",
    "Probe",
    "get_backend",
    "names",
    "normalize_device_name",
    "register",
    "select",
]

ENTRY_POINT_GROUP = "pytest_llmperf.backends"

#: The order of auto-selection and of parametrization.
ACCELERATORS = ("cuda", "hpu", "neuron", "xpu", "mps")

_classes: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (CpuBackend, CudaBackend, HpuBackend, NeuronBackend, XpuBackend, MpsBackend)
}
_instances: dict[str, Backend] = {}


def register(cls: type[Backend], *, replace: bool = False) -> type[Backend]:
    if not cls.name:
        raise ValueError(f"backend class {cls.__qualname__} has no name")
    if cls.name in _classes and not replace and _classes[cls.name] is not cls:
        raise ValueError(f"a backend named {cls.name!r} is already registered")
    _classes[cls.name] = cls
    _instances.pop(cls.name, None)
    return cls


def _load_entry_points() -> None:
    for _name, cls in load_once(ENTRY_POINT_GROUP, "backend"):
        register(cls, replace=True)


def names() -> list[str]:
    _load_entry_points()
    builtin = ["cpu", *ACCELERATORS]
    return builtin + sorted(n for n in _classes if n not in builtin)


def get_backend(name: str) -> Backend:
    _load_entry_points()
    if name not in _classes:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(names())}")
    if name not in _instances:
        _instances[name] = _classes[name]()
    return _instances[name]


def select(requested: list[str]) -> list[str]:
    """Resolve ``auto``: the accelerators present, or CPU when there are none.

    An 8×A100 node runs the suites on CUDA only; CPU is the fallback, not an extra.
    Third-party backends count as accelerators for auto when their probe succeeds.
    """
    out: list[str] = []
    for name in requested:
        if name == "auto":
            found = [n for n in names() if n != "cpu" and get_backend(n).probe().available]
            out.extend(found or ["cpu"])
        else:
            out.append(name)
    return list(dict.fromkeys(out))
