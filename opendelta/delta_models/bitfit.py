"""Documented path; the method lives in :mod:`opendelta.methods.bitfit`."""
from ..methods.bitfit import *  # noqa: F401,F403
