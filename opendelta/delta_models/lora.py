"""Documented path; the method lives in :mod:`opendelta.methods.lora`."""
from ..methods.lora import *  # noqa: F401,F403
