"""Documented path of :class:`BaseDeltaConfig`; see :mod:`opendelta.core.config`."""
from .core.config import BaseDeltaConfig  # noqa: F401

__all__ = ["BaseDeltaConfig"]
