"""Documented path; the method lives in :mod:`opendelta.methods.compacter`."""
from ..methods.compacter import *  # noqa: F401,F403
