"""Documented path of :class:`SaveLoadMixin`; see :mod:`opendelta.io.checkpoint`."""
from ..io.checkpoint import SaveLoadMixin  # noqa: F401

__all__ = ["SaveLoadMixin"]
