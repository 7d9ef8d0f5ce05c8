"""Documented path; see :mod:`opendelta.core.addressing` and :mod:`opendelta.core.segments`."""
from ..core.addressing import *  # noqa: F401,F403
from ..core.segments import substring_in, substring_in_normal, substring_in_regex  # noqa: F401
