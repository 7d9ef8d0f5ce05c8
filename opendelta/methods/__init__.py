"""One module per delta method; importing this package registers them all."""
from .adapter import AdapterConfig, AdapterModel
from .bitfit import BitFitConfig, BitFitModel
from .lora import LoraConfig, LoraModel

__all__ = ["AdapterConfig", "AdapterModel", "BitFitConfig", "BitFitModel", "LoraConfig", "LoraModel"]

from .prefix import PrefixConfig, PrefixModel  # noqa: E402
__all__ += ["PrefixConfig", "PrefixModel"]

from .compacter import CompacterConfig, CompacterModel  # noqa: E402
from .low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel  # noqa: E402
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel  # noqa: E402
from .soft_prompt import SoftPromptConfig, SoftPromptModel  # noqa: E402
__all__ += ["CompacterConfig", "CompacterModel", "LowRankAdapterConfig", "LowRankAdapterModel",
            "ParallelAdapterConfig", "ParallelAdapterModel", "SoftPromptConfig", "SoftPromptModel"]

from .ia3 import IA3Config, IA3Model  # noqa: E402
__all__ += ["IA3Config", "IA3Model"]

from .parameter_lora import ParameterLoraConfig, ParameterLoraModel  # noqa: E402
__all__ += ["ParameterLoraConfig", "ParameterLoraModel"]
