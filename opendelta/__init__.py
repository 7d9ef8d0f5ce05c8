"""opendelta: plug-and-play delta tuning (LoRA, Adapter, BitFit, ...) for any PyTorch model.

``import opendelta`` needs only torch; transformers, safetensors, rich and huggingface_hub
are imported where they are used.
"""
from .version import __version__
from .delta_configs import BaseDeltaConfig
from .delta_layer import DeltaLayer
from .basemodel import DeltaBase
from .registry import get_delta_class, known_delta_types, register_delta
from .delta_models import *  # noqa: F401,F403  (registers every method)
from .delta_models import __all__ as _method_names
from .auto_delta import AutoDeltaConfig, AutoDeltaModel
from .routing import route
from .utils.structure_mapping import CommonStructureMap
from .utils.inspect import inspect_module_statistics, inspect_optimizer_statistics
from .utils.checkpoint_files import BackboneHashWarning, CheckpointError
from .utils.model_hash import gen_model_hash, gen_parameter_hash
from .utils.peft_interop import load_peft_lora, save_peft_lora

__all__ = ["__version__", "AutoDeltaConfig", "AutoDeltaModel", "BackboneHashWarning", "BaseDeltaConfig",
           "CheckpointError", "CommonStructureMap", "DeltaBase", "DeltaLayer", "gen_model_hash",
           "gen_parameter_hash", "get_delta_class", "inspect_module_statistics", "load_peft_lora", "save_peft_lora",
           "inspect_optimizer_statistics", "known_delta_types", "register_delta", "route", "Visualization",
           *_method_names]


def __getattr__(name: str):
    # Visualization draws with rich: imported on first use, not by ``import opendelta``.
    if name == "Visualization":
        from .utils.visualization import Visualization

        return Visualization
    raise AttributeError(f"module 'opendelta' has no attribute {name!r}")
