"""Engine registry: engine id → implementation, imported lazily."""

from __future__ import annotations

from importlib import import_module

from .base import Engine, LoadedModel

__all__ = ["ENGINE_IDS", "Engine", "LoadedModel", "get_engine"]

#: Engine ids users may name; those without a module yet raise a clear "not implemented".
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

_MODULES = {"transformers": ("hf_transformers", "TransformersEngine")}
_instances: dict[str, Engine] = {}


class EngineUnavailable(Exception):
    """The engine id is valid but cannot run in this installation (a skip reason)."""


def get_engine(name: str) -> Engine:
    if name not in ENGINE_IDS:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_IDS)}")
    if name not in _MODULES:
        raise EngineUnavailable(f"engine {name!r} is not implemented in this version")
    if name not in _instances:
        module, cls = _MODULES[name]
        _instances[name] = getattr(import_module(f"{__name__}.{module}"), cls)()
    return _instances[name]
