"""Documented path of :class:`DeltaBase` (OpenDelta manual); the engine lives in :mod:`opendelta.core.base`."""
from .core.base import DeltaBase, set_trainable_state_dict  # noqa: F401

__all__ = ["DeltaBase"]
