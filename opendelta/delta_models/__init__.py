"""Documented paths of the delta methods (``opendelta.delta_models.lora`` ...); each
method lives in one file of :mod:`opendelta.methods`."""
from ..methods import *  # noqa: F401,F403
from ..methods import __all__  # noqa: F401
