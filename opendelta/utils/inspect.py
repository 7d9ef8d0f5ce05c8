"""Documented path; see :mod:`opendelta.tools.inspect`."""
from ..tools.inspect import *  # noqa: F401,F403
