"""Documented path; see :mod:`opendelta.tools.visualization`."""
from ..tools.visualization import *  # noqa: F401,F403
