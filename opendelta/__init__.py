"""opendelta: plug-and-play delta tuning (LoRA, Adapter, BitFit, ...) for any PyTorch model.

``import opendelta`` needs only torch; transformers, safetensors, rich and huggingface_hub
are imported where they are used.
"""
from .version import __version__
from .core.config import BaseDeltaConfig
from .core.layers import DeltaLayer
from .core.base import DeltaBase
from .core.registry import get_delta_class, known_delta_types, register_delta
from .methods import *  # noqa: F401,F403  (registers every method)
from .methods import __all__ as _method_names
from .core.auto import AutoDeltaConfig, AutoDeltaModel
from .route import route
from .core.structure import CommonStructureMap
from .tools.inspect import inspect_module_statistics, inspect_optimizer_statistics
from .io.files import BackboneHashWarning, CheckpointError
from .io.hashing import gen_model_hash, gen_parameter_hash
from .io.peft import load_peft_lora, save_peft_lora
# Quantized backbones: imports neither bitsandbytes nor torchao; registers their weight formats.
from .integrations.quantized import prepare_for_kbit_training

__all__ = ["__version__", "AutoDeltaConfig", "AutoDeltaModel", "BackboneHashWarning", "BaseDeltaConfig",
           "CheckpointError", "CommonStructureMap", "DeltaBase", "DeltaLayer", "gen_model_hash",
           "gen_parameter_hash", "get_delta_class", "inspect_module_statistics", "load_peft_lora", "save_peft_lora",
           "inspect_optimizer_statistics", "known_delta_types", "prepare_for_kbit_training", "register_delta", "route",
           "Visualization",  # noqa: F405 (provided lazily by __getattr__ below)
           *_method_names]


def __getattr__(name: str):
    # Visualization draws with rich: imported on first use, not by ``import opendelta``.
    if name == "Visualization":
        from .tools.visualization import Visualization

        return Visualization
    raise AttributeError(f"module 'opendelta' has no attribute {name!r}")
