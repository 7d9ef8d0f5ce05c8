"""Documented path; the method lives in :mod:`opendelta.methods.low_rank_adapter`."""
from ..methods.low_rank_adapter import *  # noqa: F401,F403
