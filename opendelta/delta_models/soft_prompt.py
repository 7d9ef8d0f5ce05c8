"""Documented path; the method lives in :mod:`opendelta.methods.soft_prompt`."""
from ..methods.soft_prompt import *  # noqa: F401,F403
