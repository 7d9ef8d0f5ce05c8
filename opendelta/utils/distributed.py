"""Path documented in earlier READMEs; see :mod:`opendelta.integrations.distributed`."""
from ..integrations.distributed import *  # noqa: F401,F403
