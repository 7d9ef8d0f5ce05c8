"""Documented path; the method lives in :mod:`opendelta.methods.adapter`."""
from ..methods.adapter import *  # noqa: F401,F403
