"""Documented path; see :mod:`opendelta.core.structure`."""
from ..core.structure import *  # noqa: F401,F403
