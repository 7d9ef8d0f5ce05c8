"""AutoDeltaConfig / AutoDeltaModel: build any registered delta from a config."""
from __future__ import annotations

from typing import Any, Dict, Union

from torch import nn

from .basemodel import DeltaBase
from .delta_configs import BaseDeltaConfig
from .registry import get_delta_class


class AutoDeltaConfig:
    """Factory of delta configs; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError("AutoDeltaConfig is a factory: use AutoDeltaConfig.from_dict(...)")

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides: Any) -> BaseDeltaConfig:
        """The config of the method named by ``config_dict["delta_type"]``.

        Raises:
            ValueError: missing or unknown ``delta_type`` (the message lists known ones).
        """
        if "delta_type" not in config_dict:
            raise ValueError("the config has no 'delta_type' key; it cannot tell which delta to build")
        delta_class = get_delta_class(config_dict["delta_type"])
        return delta_class.config_class.from_dict(config_dict, **overrides)


class AutoDeltaModel:
    """Factory of delta models; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError("AutoDeltaModel is a factory: use AutoDeltaModel.from_config(...)")

    @classmethod
    def from_config(cls, config: Union[BaseDeltaConfig, Dict[str, Any]], backbone_model: nn.Module,
                    **overrides: Any) -> DeltaBase:
        """Apply the delta described by ``config`` to ``backbone_model``.

        Keyword ``overrides`` win over the config's values.
        """
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        delta_class = get_delta_class(config.delta_type)
        return delta_class.from_config(config, backbone_model, **overrides)
