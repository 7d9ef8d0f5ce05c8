"""The one registry of delta methods, keyed by ``delta_type``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Type

if TYPE_CHECKING:  # pragma: no cover
    from .base import DeltaBase

DELTA_MODELS: Dict[str, "Type[DeltaBase]"] = {}
#: other spellings accepted for a delta_type (original OpenDelta's and common variants).
_ALIASES: Dict[str, str] = {}


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_")


def register_delta(cls: "Type[DeltaBase]", aliases: Sequence[str] = ()) -> "Type[DeltaBase]":
    """Register a :class:`DeltaBase` subclass under its ``delta_type`` (class decorator)."""
    key = _normalise(cls.delta_type)
    if not key:
        raise ValueError(f"{cls.__name__} has no delta_type")
    if key in DELTA_MODELS and DELTA_MODELS[key] is not cls:
        raise ValueError(f"delta_type {key!r} is already registered by {DELTA_MODELS[key].__name__}")
    DELTA_MODELS[key] = cls
    for alias in (*aliases, key.replace("_", ""), cls.__name__, cls.__name__.removesuffix("Model")):
        _ALIASES[_normalise(alias)] = key
    return cls


def registered(aliases: Sequence[str] = ()):
    """Decorator form of :func:`register_delta` with extra spellings."""
    def decorate(cls):
        return register_delta(cls, aliases)
    return decorate


def known_delta_types() -> List[str]:
    return sorted(DELTA_MODELS)


def get_delta_class(delta_type: str) -> "Type[DeltaBase]":
    """The delta model class registered for ``delta_type`` (aliases accepted).

    Raises:
        ValueError: unknown delta_type; the message lists the known ones.
    """
    key = _normalise(str(delta_type))
    key = _ALIASES.get(key, key)
    if key not in DELTA_MODELS:
        raise ValueError(f"unknown delta_type {delta_type!r}; known delta types: "
                         f"{', '.join(known_delta_types())}")
    return DELTA_MODELS[key]
