"""LowRankAdapter: a sequential adapter whose projections are rank-k matrix products.

Proposed as a baseline in the Compacter paper (Mahabadi et al., 2021). Each projection is
``x @ (W_left @ W_right) + b``; the adapter on a module's output ``h`` computes
``h + up(act(down(h)))`` with a bottleneck of ``hidden // reduction_factor`` features.
Parameter names and shapes are those of OpenDelta 0.3.2 (``low_rank_adapter.down_sampler.W_left``
...), so its checkpoints load unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import integer, text, validated
from ..core.registry import registered
from .activations import activation_rule, get_activation
from .bottleneck import ResidualAdapterLayer

WEIGHT_INITS = ("glorot-uniform", "glorot-normal")


def glorot_init_(tensor: torch.Tensor, method: str) -> None:
    """Xavier initialisation with gain sqrt(2), as the Compacter code base does.

    ``method`` is ``"glorot-uniform"`` or ``"glorot-normal"``; fans are the last two dims.
    """
    if method == "glorot-uniform":
        nn.init.xavier_uniform_(tensor, gain=math.sqrt(2))
    elif method == "glorot-normal":
        nn.init.xavier_normal_(tensor, gain=math.sqrt(2))
    else:
        raise ValueError(f"unknown weight initialisation {method!r}; choose one of {WEIGHT_INITS}")


def bottleneck_size(hidden: int, reduction_factor: int, where: str) -> int:
    """``hidden // reduction_factor``, which must be at least 1."""
    size = hidden // reduction_factor
    if size < 1:
        raise ValueError(f"{where}: hidden size {hidden} // reduction_factor {reduction_factor} = 0; "
                         f"use a reduction_factor of at most {hidden}")
    return size


@dataclass
class LowRankAdapterConfig(BaseDeltaConfig):
    """Args:
        reduction_factor: bottleneck = hidden // reduction_factor (> 0). Default 32.
        non_linearity: activation between the projections. Default ``"gelu_new"``.
        low_rank_w_init: ``"glorot-uniform"`` or ``"glorot-normal"``, applied to each
            factor. Default ``"glorot-uniform"``.
        low_rank_rank: rank ``k`` of each projection's weight (> 0). Default 1.
    """

    delta_type = "low_rank_adapter"
    reduction_factor: int = validated(32, integer(minimum=1))
    non_linearity: str = validated("gelu_new", activation_rule())
    low_rank_w_init: str = validated("glorot-uniform", text(choices=WEIGHT_INITS))
    low_rank_rank: int = validated(1, integer(minimum=1))


class LowRankLinear(nn.Module):
    """``y = x @ (W_left @ W_right) + b``.

    Shapes: ``W_left`` ``[in_features, rank]``, ``W_right`` ``[rank, out_features]``, ``b``
    ``[out_features]`` (zero at start); input ``[..., in_features]`` -> ``[..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 1, bias: bool = True,
                 w_init: str = "glorot-uniform", device: Any = None, dtype: Any = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.W_left = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.W_right = nn.Parameter(torch.empty(rank, out_features, **factory))
        self.b = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        glorot_init_(self.W_left, w_init)
        glorot_init_(self.W_right, w_init)

    def weight(self) -> torch.Tensor:
        """The full ``[in_features, out_features]`` matrix ``W_left @ W_right``."""
        return self.W_left @ self.W_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight())
        return out + self.b if self.b is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankAdapterLayer(ResidualAdapterLayer):
    """Adapter on a module's output with low-rank projections and a residual connection.

    Shapes: host output ``[..., hidden]`` (or a tuple whose first element is) -> same shape.
    Children: ``down_sampler`` (hidden -> bottleneck), ``activation``, ``up_sampler``
    (bottleneck -> hidden), both :class:`LowRankLinear`.
    """

    def __init__(self, hidden: int, reduction_factor: int = 32, non_linearity: str = "gelu_new",
                 low_rank_w_init: str = "glorot-uniform", low_rank_rank: int = 1,
                 device: Any = None, dtype: Any = None):
        bottleneck = bottleneck_size(hidden, reduction_factor, "LowRankAdapter")
        factory = {"device": device, "dtype": dtype}
        down = LowRankLinear(hidden, bottleneck, low_rank_rank, w_init=low_rank_w_init, **factory)
        up = LowRankLinear(bottleneck, hidden, low_rank_rank, w_init=low_rank_w_init, **factory)
        super().__init__(down, get_activation(non_linearity), up, layout="sampler")


@registered(aliases=["lowrankadapter", "low_rank_adapter", "lowrank_adapter"])
class LowRankAdapterModel(DeltaBase):
    """Low-rank adapters after the targets (default: attention output projection and
    feed-forward down projection). Hyperparameters: see :class:`LowRankAdapterConfig`."""

    delta_type = "low_rank_adapter"
    config_class = LowRankAdapterConfig
    default_modified_modules = ["attn.proj", "ff.w2"]
    layer_name = "low_rank_adapter"

    def add_delta(self, name: str, module: nn.Module) -> None:
        _, hidden = self.module_sizes(name, module)
        cfg = self.config
        bottleneck_size(hidden, cfg.reduction_factor, f"LowRankAdapter on {name!r}")
        layer = LowRankAdapterLayer(hidden, cfg.reduction_factor, cfg.non_linearity, cfg.low_rank_w_init,
                                    cfg.low_rank_rank, **self.factory_kwargs(module))
        self.insert_layer(name, layer)
