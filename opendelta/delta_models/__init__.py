"""One module per delta method; importing this package registers them all."""
from .adapter import AdapterConfig, AdapterModel
from .bitfit import BitFitConfig, BitFitModel
from .lora import LoraConfig, LoraModel

__all__ = ["AdapterConfig", "AdapterModel", "BitFitConfig", "BitFitModel", "LoraConfig", "LoraModel"]
