"""BitFit: train a bias for every Linear, Conv1D and normalisation layer of the targets.

Ben Zaken et al., 2021. Each targeted layer gets an additive bias ``delta`` initialised at
zero: its output becomes ``f(x) + delta``. Where the layer has a bias ``b`` this is the same
as training ``b`` (``b + delta`` gets the same gradient), yet the backbone's own bias is
never touched, so :meth:`detach` restores it exactly and several BitFit deltas can share
one backbone; where it has none (T5, Llama), it is the bias the layer lacked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.layers import DeltaLayer, primary_tensor, replace_primary_tensor
from ..core.merging import MergeableLayer, Update
from ..core.registry import registered
from ..core.shapes import is_linear_like, is_norm, leaf_sizes


@dataclass
class BitFitConfig(BaseDeltaConfig):
    """BitFit has no hyperparameters beyond the targets."""

    delta_type = "bitfit"


class BiasLayer(MergeableLayer, DeltaLayer):
    """An additive bias on a module's output.

    Shapes: ``bias`` ``[features]``, added along the last dimension (``channel_dim=-1``) or,
    for convolutions, along dimension 1. Mergeable into the host's own ``bias``; where the
    host has none, only ``merge_and_detach`` creates one (see :mod:`opendelta.core.merging`).
    """

    #: module types whose forward reads ``self.bias``, so a created bias takes effect.
    BIAS_READERS = (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm)

    def __init__(self, features: int, channel_dim: int = -1, device: Any = None, dtype: Any = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        hidden = primary_tensor(output)
        bias = self.bias
        if self.channel_dim != -1:
            bias = bias.view(-1, *([1] * (hidden.dim() - 2)))
        # In the hidden states' dtype: an fp32 bias (delta_dtype) must not promote a bf16
        # stream to fp32 (the next LayerNorm would reject it, even under autocast).
        return replace_primary_tensor(output, hidden + bias.to(hidden.dtype))

    # ------------------------------------------------------------------ merging
    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        bias = getattr(host, "bias", None)
        if isinstance(bias, torch.Tensor):
            if bias.shape != self.bias.shape:
                return f"its bias has shape {tuple(bias.shape)}, the BitFit delta {tuple(self.bias.shape)}"
            return None
        if not create_missing:
            return (f"{type(host).__name__} has no bias to fold the BitFit delta into; "
                    "merge_and_detach() creates one where the module's forward uses it, "
                    "or keep this delta unmerged")
        if not isinstance(host, self.BIAS_READERS) or "bias" not in host._parameters:
            return (f"{type(host).__name__} has no bias and its forward would not read one; "
                    "keep this BitFit delta unmerged (or exclude such modules)")
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        if getattr(host, "bias", None) is None and create_missing:
            # A new backbone parameter, at zero, trainable like the module's weight.
            weight = getattr(host, "weight", None)
            grad = weight.requires_grad if isinstance(weight, torch.Tensor) else False
            host.bias = nn.Parameter(torch.zeros_like(self.bias.detach()), requires_grad=grad)
        return [(host.bias, self.bias.detach().to(host.bias.dtype))]


def biasable_layers(name: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Linear-like, convolution and normalisation layers at or below ``module``
    (never inside delta layers)."""
    if isinstance(module, DeltaLayer):
        return []
    if is_linear_like(module) or is_norm(module) or isinstance(module, nn.modules.conv._ConvNd):
        return [(name, module)]
    out = []
    for child_name, child in module.named_children():
        out.extend(biasable_layers(f"{name}.{child_name}" if name else child_name, child))
    return out


@registered()
class BitFitModel(DeltaBase):
    """Bias tuning (default: every linear and normalisation layer of the attention and
    feed-forward blocks). Targets may be whole blocks: every Linear, Conv1D, convolution
    and normalisation layer inside gets a bias."""

    delta_type = "bitfit"
    config_class = BitFitConfig
    default_modified_modules = ["attn", "crossattn", "ff", "ff.w1", "ff.w2", "layer_norm"]
    layer_name = "bitfit"

    def add_all_deltas(self, targets) -> None:
        modules = dict(self.backbone_model.named_modules())
        done = set()
        for target in targets:
            layers = [(n, m) for n, m in biasable_layers(target, modules[target]) if id(m) not in done]
            if not layers and id(modules[target]) not in done:
                raise ValueError(f"BitFit found no Linear, Conv1D, convolution or normalisation layer "
                                 f"in {target!r} ({type(modules[target]).__name__})")
            for name, module in layers:
                done.add(id(module))
                self.add_delta(name, module)

    def add_delta(self, name: str, module: nn.Module) -> None:
        sizes = leaf_sizes(module)
        if sizes is None:
            raise ValueError(f"cannot tell the output size of {name!r} ({type(module).__name__})")
        channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        self.insert_layer(name, BiasLayer(sizes[1], channel_dim, **self.factory_kwargs(module)))
