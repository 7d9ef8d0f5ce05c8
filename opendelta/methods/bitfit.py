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

    #: adds to the host's output: commutes with a merge into the host (see core/merging.py)
    output_additive = True

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


def _is_known_type(module: nn.Module) -> bool:
    """Linear, GPT-2 Conv1D, convolutions and normalisation layers: bias-able whether or not
    they have a bias."""
    return is_linear_like(module) or is_norm(module) or isinstance(module, nn.modules.conv._ConvNd)


def biasable_layers(name: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Linear-like, convolution and normalisation layers at or below ``module``
    (never inside delta layers)."""
    if isinstance(module, DeltaLayer):
        return []
    if _is_known_type(module):
        return [(name, module)]
    out = []
    for child_name, child in module.named_children():
        out.extend(biasable_layers(f"{name}.{child_name}" if name else child_name, child))
    return out


@registered()
class BitFitModel(DeltaBase):
    """Bias tuning (default: every linear and normalisation layer of the attention and
    feed-forward blocks). Targets may be whole blocks: every Linear, Conv1D, convolution
    and normalisation layer inside gets a bias. Targets may overlap or nest
    (``["attention", "output"]`` on BERT, where ``attention.output`` is inside
    ``attention``): every layer gets exactly one bias. A target that is a leaf of another
    type gets a bias on its output, sized from the module (or by a dummy forward)."""

    delta_type = "bitfit"
    config_class = BitFitConfig
    default_modified_modules = ["attn", "crossattn", "ff", "ff.w1", "ff.w2", "layer_norm"]
    layer_name = "bitfit"

    def add_all_deltas(self, targets) -> None:
        modules = dict(self.backbone_model.named_modules())
        for target in targets:
            module = modules[target]
            layers = biasable_layers(target, module)
            if not layers and isinstance(module._parameters.get("bias"), torch.Tensor):
                layers = [(target, module)]
            if layers:
                for name, layer in layers:
                    self.add_bias_to_modules_have_bias_or_known_type(layer, name)
            elif not any(True for _ in module.children()):
                self._add_bias_after(target, module)
            else:
                raise ValueError(f"BitFit found no Linear, Conv1D, convolution or normalisation layer "
                                 f"in {target!r} ({type(module).__name__})")

    def add_delta(self, name: str, module: nn.Module) -> None:
        if not self.add_bias_to_modules_have_bias_or_known_type(module, name) and not _has_bitfit(self, module):
            raise ValueError(f"BitFit cannot add a bias to {name!r} ({type(module).__name__}): it has no "
                             "bias and is no Linear, Conv1D, convolution or normalisation layer")

    def add_bias_to_modules_have_bias_or_known_type(self, c: nn.Module, name: Optional[str] = None) -> bool:
        """Give module ``c`` a trainable bias if it has a bias or is of a known type.

        OpenDelta's rule: a module with a ``bias`` parameter, or a Linear, GPT-2 Conv1D,
        convolution or normalisation layer without one, gets a bias; any other module is
        left alone. The bias is a :class:`BiasLayer` (zeros) added to ``c``'s output:
        training it trains ``c``'s own bias (``b + delta`` gets the same gradient) without
        changing the backbone's bias, so :meth:`detach` restores it exactly. A module that
        already has this delta's bias keeps it (targets may overlap).

        Args:
            c: a module of the backbone.
            name: its full name in the backbone (found by identity when omitted).

        Returns:
            ``True`` if a bias was added, ``False`` if ``c`` already had one of this delta
            or is of an unknown type without a bias.

        Raises:
            ValueError: ``c`` is not a module of this delta's backbone.
        """
        if isinstance(c, DeltaLayer) or _has_bitfit(self, c):
            return False
        if _is_known_type(c):
            sizes = leaf_sizes(c)
            if sizes is None:
                return False
            features = sizes[1]
        else:
            bias = c._parameters.get("bias")
            if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
                return False
            features = bias.shape[0]
        name = self._name_of(c) if name is None else name
        channel_dim = 1 if isinstance(c, nn.modules.conv._ConvNd) else -1
        self.insert_layer(name, BiasLayer(features, channel_dim, **self.factory_kwargs(c)))
        return True

    def _add_bias_after(self, name: str, module: nn.Module) -> None:
        """A bias on the output of a leaf module of another type (OpenDelta's
        ``add_bias_to_others``)."""
        if _has_bitfit(self, module):
            return
        features = self.module_sizes(name, module)[1]
        self.insert_layer(name, BiasLayer(features, -1, **self.factory_kwargs(module)))

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.backbone_model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"the {type(module).__name__} passed is not a module of this delta's backbone "
                         f"({type(self.backbone_model).__name__}); pass one of backbone_model.modules()")


def _has_bitfit(delta: BitFitModel, module: nn.Module) -> bool:
    """Whether ``module`` already hosts ``delta``'s bias (its child name is ``delta``'s own)."""
    return isinstance(module._modules.get(delta.layer_attr), BiasLayer)
