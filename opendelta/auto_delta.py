"""Documented path of the Auto classes; see :mod:`opendelta.core.auto`."""
from .core.auto import AutoDeltaConfig, AutoDeltaModel  # noqa: F401

__all__ = ["AutoDeltaConfig", "AutoDeltaModel"]
