"""Engine registry: engine id → implementation, imported lazily."""

from __future__ import annotations

from importlib import import_module

from .base import Engine, LoadedModel

__all__ = ["ENGINE_IDS", "Engine", "EngineUnavailable", "LoadedModel", "get_engine", "register"]

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


def register(engine: Engine) -> Engine:
    """Add or replace an engine instance (third-party engines, and fakes in tests)."""
    if not engine.name:
        raise ValueError(f"engine {type(engine).__qualname__} has no name")
    _instances[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    if name in _instances:
        return _instances[name]
    if name not in ENGINE_IDS:
        known = sorted(set(ENGINE_IDS) | set(_instances))
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(known)}")
    if name not in _MODULES:
        raise EngineUnavailable(f"engine {name!r} is not implemented in this version")
    if name not in _instances:
        module, cls = _MODULES[name]
        _instances[name] = getattr(import_module(f"{__name__}.{module}"), cls)()
    return _instances[name]
