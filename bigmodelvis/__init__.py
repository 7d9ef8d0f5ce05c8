"""bigmodelvis: visualise the structure of big models (re-exported from opendelta).

``from bigmodelvis import Visualization`` as in OpenDelta's documentation; needs ``rich``.
"""
from opendelta.tools.visualization import Visualization

__all__ = ["Visualization"]
