"""Documented path; the method lives in :mod:`opendelta.methods.parallel_adapter`."""
from ..methods.parallel_adapter import *  # noqa: F401,F403
