"""Adapter: a bottleneck MLP with a residual connection, applied to a module's output.

Houlsby et al., 2019. ``h + up(act(down(h)))``; the projections start near zero (normal,
std 0.01, zero biases), so a fresh adapter is close to the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import integer, validated
from ..core.registry import registered
from .activations import activation_rule, get_activation
from .bottleneck import ResidualAdapterLayer, plain_projections


@dataclass
class AdapterConfig(BaseDeltaConfig):
    """Args:
        bottleneck_dim: width of the bottleneck (> 0). Default 24.
        non_linearity: activation between the projections. Default ``"gelu_new"``.
    """

    delta_type = "adapter"
    bottleneck_dim: int = validated(24, integer(minimum=1))
    non_linearity: str = validated("gelu_new", activation_rule())


class AdapterLayer(ResidualAdapterLayer):
    """Bottleneck adapter on a module's output: ``h + up(act(down(h)))``.

    Shapes: host output ``[..., hidden_dim]`` (or a tuple whose first element is) -> same
    shape. Parameters in ``modulelist``: ``down_proj`` ``[bottleneck, hidden]`` and
    ``up_proj`` ``[hidden, bottleneck]`` with biases (normal std 0.01, zero biases).
    """

    def __init__(self, hidden_dim: int, bottleneck_dim: int = 24, non_linearity: str = "gelu_new",
                 device: Any = None, dtype: Any = None):
        down, up = plain_projections(hidden_dim, bottleneck_dim, hidden_dim, {"device": device, "dtype": dtype})
        super().__init__(down, get_activation(non_linearity), up, layout="modulelist")


@registered()
class AdapterModel(DeltaBase):
    """Sequential adapters after the targets (default: attention output projection and
    feed-forward down projection). Hyperparameters: see :class:`AdapterConfig`."""

    delta_type = "adapter"
    config_class = AdapterConfig
    default_modified_modules = ["attn.proj", "ff.w2"]
    layer_name = "adapter"

    def add_delta(self, name: str, module: nn.Module) -> None:
        _, hidden = self.module_sizes(name, module)
        layer = AdapterLayer(hidden, self.config.bottleneck_dim, self.config.non_linearity,
                             **self.factory_kwargs(module))
        self.insert_layer(name, layer)
