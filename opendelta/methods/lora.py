"""LoRA: a parallel low-rank update ``B @ A @ x * alpha / r`` of Linear and Conv1D layers.

Hu et al., 2021. ``A`` ([r, in]) is Kaiming-uniform initialised and ``B`` ([out, r]) is
zero, so a fresh LoRA leaves every output unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import integer, number, validated
from ..core.layers import DeltaLayer
from ..core.merging import MergeableLayer, Update
from ..core.quantized_merge import QuantizedMergeMixin, is_quantized
from ..core.registry import registered
from ..core.shapes import is_conv1d_transposed, is_linear_like


@dataclass
class LoraConfig(BaseDeltaConfig):
    """Args:
        lora_r: rank ``r`` of the update (a positive integer, not a bool). Default 8.
        lora_alpha: scaling numerator (a finite number); the update is multiplied by
            ``lora_alpha / lora_r``. Default 16.
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1). Default 0.
    """

    delta_type = "lora"
    lora_r: int = validated(8, integer(minimum=1))
    lora_alpha: float = validated(16, number())
    lora_dropout: float = validated(0.0, number(minimum=0, maximum=1, exclusive_maximum=True))


class LoraLayer(MergeableLayer, DeltaLayer):
    """The low-rank branch of one Linear-like module.

    Shapes: input ``[..., in_features]``; adds ``[..., out_features]`` to the host output.
    Parameters ``lora_A`` ``[r, in_features]`` and ``lora_B`` ``[out_features, r]``.
    Mergeable into the host's weight (``nn.Linear`` ``[out, in]`` or GPT-2's ``Conv1D``
    ``[in, out]``), see :mod:`opendelta.core.merging`.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, device: Any = None, dtype: Any = None):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        # No dropout module at p = 0: nothing runs on the hot path.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B @ A @ x * scaling`` for ``x`` of shape ``[..., in_features]``."""
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        # Scale the rank-r intermediate: the smallest tensor of the branch.
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            # Deltas kept in another dtype (``delta_dtype``) outside autocast: compute in theirs.
            return output + self.delta(x.to(self.lora_A.dtype)).to(output.dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        low_rank = F.linear(x, self.lora_A)  # [..., r]
        if output.dim() >= 2 and low_rank.shape[:-1] == output.shape[:-1] and low_rank.dtype == output.dtype:
            # output + scaling * low_rank @ B^T in one fused kernel: no [..., out] temporary
            # and no separate scaling pass (addmm's alpha; autograd supports it).
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), low_rank.reshape(-1, self.r),
                               self.lora_B.t(), alpha=self.scaling)
            return flat.view(output.shape)
        return output + F.linear(low_rank * self.scaling, self.lora_B)

    def routed_update(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        """What this layer adds to the host's output for the (row-sliced) call: routing
        (:mod:`opendelta.route`) index-adds it to the rows routed to this delta."""
        return self.delta(args[0] if args else next(iter(kwargs.values())))

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``, ``[out_features, in_features]`` (computed in fp32 for
        half-precision weights, then cast back)."""
        A, B = self.lora_A, self.lora_B
        if A.dtype in (torch.float16, torch.bfloat16):
            return (B.float() @ A.float() * self.scaling).to(A.dtype)
        return B @ A * self.scaling

    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        weight = getattr(host, "weight", None)
        expected = (self.lora_A.shape[1], self.lora_B.shape[0])
        if is_conv1d_transposed(host):
            shape = expected
        elif isinstance(host, nn.Linear):
            shape = expected[::-1]
        else:
            return f"LoRA merges into nn.Linear and Conv1D only, not {type(host).__name__}"
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return f"its weight is not a floating-point tensor ({type(weight).__name__})"
        if tuple(weight.shape) != shape:
            return f"its weight has shape {tuple(weight.shape)}, the LoRA update {shape}"
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        with torch.no_grad():
            update = self.delta_weight().to(host.weight.dtype)
        # Conv1D stores its weight as [in, out].
        return [(host.weight, update.t() if is_conv1d_transposed(host) else update)]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}" + (", merged" if self.merged else "")


class QuantizedLoraLayer(QuantizedMergeMixin, LoraLayer):
    """LoRA on a quantized Linear (bitsandbytes, torchao): merging dequantizes, adds and
    requantizes, keeping the original weight (see :mod:`opendelta.core.quantized_merge`)."""


@registered()
class LoraModel(DeltaBase):
    """LoRA on Linear and Conv1D modules (default: attention query and value, or GPT-2's
    fused ``c_attn``). Hyperparameters: see :class:`LoraConfig`."""

    delta_type = "lora"
    config_class = LoraConfig
    default_modified_modules = ["attn.q", "attn.v", "attn.qkv"]
    layer_name = "lora"

    def add_delta(self, name: str, module: nn.Module) -> None:
        if not is_linear_like(module):
            raise ValueError(
                f"LoRA applies to Linear and Conv1D modules; {name!r} is a "
                f"{type(module).__name__}. Choose its linear sub-modules instead.")
        in_features, out_features = self.module_sizes(name, module)
        cfg = self.config
        layer_class = QuantizedLoraLayer if is_quantized(module) else LoraLayer
        layer = layer_class(in_features, out_features, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                            **self.factory_kwargs(module))
        self.insert_layer(name, layer)
