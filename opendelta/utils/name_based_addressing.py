"""Documented path; see :mod:`opendelta.core.addressing`."""
from ..core.addressing import *  # noqa: F401,F403
