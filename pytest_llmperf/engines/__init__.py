"""Engine registry: engine id → implementation, imported lazily.

Third-party engines arrive by entry point, like backends::

    [project.entry-points."pytest_llmperf.engines"]
    my-engine = "my_package:MyEngine"   # a subclass of pytest_llmperf.engines.Engine
"""

from __future__ import annotations

from importlib import import_module

from ..entrypoints import load_once
from ..errors import UsageError
from .base import Engine, LoadedModel

__all__ = [
    "ENGINE_IDS",
    "Engine",
    "EngineUnavailable",
    "LoadedModel",
    "get_engine",
    "implemented",
    "register",
]

ENTRY_POINT_GROUP = "pytest_llmperf.engines"

#: Engine ids users may name (ARCHITECTURE.md); those without a module are usage errors.
ENGINE_IDS = (
    "transformers",
    "accelerate",
    "bnb-int8",
    "bnb-4bit",
    "deepspeed-inference",
    "deepspeed-zero",
    "optimum-habana",
    "optimum-neuron",
)

_MODULES = {
    "transformers": ("hf_transformers", "TransformersEngine"),
    "accelerate": ("accelerate", "AccelerateEngine"),
    "bnb-int8": ("bnb", "BnbInt8Engine"),
    "bnb-4bit": ("bnb", "Bnb4bitEngine"),
    "deepspeed-inference": ("deepspeed_inference", "DeepSpeedInferenceEngine"),
    "deepspeed-zero": ("deepspeed_zero", "DeepSpeedZeroEngine"),
    "optimum-habana": ("optimum_habana", "OptimumHabanaEngine"),
    "optimum-neuron": ("optimum_neuron", "OptimumNeuronEngine"),
}
_instances: dict[str, Engine] = {}


class EngineUnavailable(Exception):
    """The engine is implemented but cannot run in this installation (a skip reason naming the
    package and version it needs)."""


def register(engine: Engine) -> Engine:
    """Add or replace an engine instance (third-party engines, and fakes in tests)."""
    if not engine.name:
        raise ValueError(f"engine {type(engine).__qualname__} has no name")
    _instances[engine.name] = engine
    return engine


def _load_entry_points() -> None:
    for name, cls in load_once(ENTRY_POINT_GROUP, "engine"):
        _instances.setdefault(name, cls())


def implemented() -> list[str]:
    _load_entry_points()
    return sorted(set(_MODULES) | set(_instances))


def get_engine(name: str) -> Engine:
    """The engine ``name``; an unknown or not yet implemented id is a usage error: a suite that
    asks for DeepSpeed must not be green while measuring nothing."""
    _load_entry_points()
    if name in _instances:
        return _instances[name]
    if name not in _MODULES:
        done = ", ".join(implemented())
        if name in ENGINE_IDS:
            raise UsageError(
                f"engine {name!r} is not implemented in this version (implemented: {done})"
            )
        known = sorted(set(ENGINE_IDS) | set(_instances))
        raise UsageError(
            f"unknown engine {name!r}; known: {', '.join(known)} (implemented: {done})"
        )
    module, cls = _MODULES[name]
    _instances[name] = getattr(import_module(f"{__name__}.{module}"), cls)()
    return _instances[name]
