"""Documented path; the method lives in :mod:`opendelta.methods.prefix`."""
from ..methods.prefix import *  # noqa: F401,F403
