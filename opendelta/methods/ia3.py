"""IA3 ((IA)^3): learned vectors that rescale keys, values and the feed-forward activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning". Each targeted Linear (or GPT-2 ``Conv1D``) gets a vector ``l``,
initialised at ones, so a fresh IA3 delta changes nothing:

* on most targets (keys, values) ``l`` scales the module's **output**:
  ``y = (W x + b) * l``, ``l`` of shape ``[out_features]``;
* on *feed-forward* targets (``feedforward_modules``, by default the feed-forward down
  projection ``ff.w2``) ``l`` scales the module's **input**, i.e. the feed-forward
  activations: ``y = W (x * l) + b``, ``l`` of shape ``[in_features]``.

These are PEFT's semantics (``IA3Config.feedforward_modules``), so PEFT IA3 adapters load
and export without conversion (:mod:`opendelta.io.peft_ia3`).

Merging folds ``l`` into the weight (and, for output scaling, the bias): ``W * l`` along the
output rows or input columns, written by value as PEFT does. The merge is a product, not a
sum, so it is taken out by dividing again (one fp32 rounding; bit for bit with
``merge(keep_copy=True)``), and only while no other delta was merged into the same weight
afterwards (see :mod:`opendelta.methods.merge_order`). A vector with an entry equal to zero cannot be
divided out: ``merge()`` refuses it, ``merge_and_detach()`` (which never unmerges) accepts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, cast

import torch
from torch import nn

from ..core.addressing import endswith_in
from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import boolean, string_list, validated
from ..core.layers import DeltaLayer, primary_input, replace_primary_input
from ..core.merging import MergeableLayer
from ..core.registry import registered
from ..core.shapes import is_conv1d_transposed, is_linear_like, leaf_sizes
from ..core.structure import CommonStructureMap
from .merge_order import TargetMergeMixin, check_unmerge_order

#: the common-structure names IA3 treats as feed-forward when ``feedforward_modules`` is None.
DEFAULT_FEEDFORWARD = ["ff.w2"]


@dataclass
class IA3Config(BaseDeltaConfig):
    """Args:
        feedforward_modules: keys of the targets whose *input* is scaled (PEFT's
            ``feedforward_modules``): module names or common-structure names, matched like
            ``modified_modules``; every key must match a target. ``None``: the targets whose
            common name ends with ``ff.w2`` (the feed-forward down projection), where the
            architecture is known. Default ``None``.
        init_ia3_weights: start every vector at ones (no change); ``False`` draws them from
            a standard normal, as PEFT does (for tests). Default ``True``.
    """

    delta_type = "ia3"
    feedforward_modules: Optional[List[str]] = validated(None, string_list())
    init_ia3_weights: bool = validated(True, boolean())


def _factor(vector: torch.Tensor, host: nn.Module, is_feedforward: bool) -> torch.Tensor:
    """``vector`` shaped to broadcast over ``host.weight``: Linear weights are ``[out, in]``,
    GPT-2's Conv1D ``[in, out]``; feed-forward vectors run along the input features."""
    along_rows = is_feedforward == is_conv1d_transposed(host)
    return vector.view(-1, 1) if along_rows else vector.view(1, -1)


class IA3Layer(TargetMergeMixin, MergeableLayer, DeltaLayer):
    """The scaling vector of one Linear-like module.

    Shapes: ``ia3_l`` is ``[out_features]`` (output scaling) or ``[in_features]`` (input
    scaling, ``is_feedforward``); it multiplies the last dimension of the host's output or
    input. Computes in the vector's dtype and returns the host's (``delta_dtype``).
    """

    def __init__(self, features: int, is_feedforward: bool, init_ones: bool = True,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.is_feedforward = is_feedforward
        self.uses_pre_hook = is_feedforward
        self.uses_post_hook = not is_feedforward
        self.ia3_l = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        if not init_ones and self.ia3_l.device.type != "meta":
            with torch.no_grad():
                self.ia3_l.normal_()

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``x * l`` along the last dimension, computed in ``l``'s dtype, returned in ``x``'s."""
        return (x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype)

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        return replace_primary_input(args, kwargs, self.scale(primary_input(args, kwargs)))

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: torch.Tensor) -> torch.Tensor:
        return self.scale(output)

    # ------------------------------------------------------------------ merging
    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        if not is_linear_like(host):
            return f"IA3 merges into nn.Linear and Conv1D only, not {type(host).__name__}"
        weight = getattr(host, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return f"its weight is not a floating-point tensor ({type(weight).__name__})"
        sizes = leaf_sizes(host)
        expected = sizes[0] if self.is_feedforward else sizes[1]  # type: ignore[index]
        if expected != self.ia3_l.numel():
            return f"the IA3 vector has {self.ia3_l.numel()} entries, the module {expected} features"
        if not create_missing and not self.merged and bool((self.ia3_l == 0).any()):
            return ("its IA3 vector has entries equal to zero, which merge() could not divide out "
                    "again; use merge_and_detach() to fold it in for good")
        return None

    def merge_targets(self, host: nn.Module) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """``W * l`` (and ``b * l`` for output scaling) in fp32; once merged, ``W' / l``."""
        weight: nn.Parameter = host.weight  # type: ignore[assignment]
        pairs: List[Tuple[nn.Parameter, torch.Tensor]] = [(weight, _factor(self.ia3_l, host, self.is_feedforward))]
        bias = getattr(host, "bias", None)
        if not self.is_feedforward and isinstance(bias, nn.Parameter):
            pairs.append((bias, self.ia3_l))
        with torch.no_grad():
            return [(tensor, tensor.detach().float() / factor.detach().float() if self.merged
                     else tensor.detach().float() * factor.detach().float()) for tensor, factor in pairs]

    def extra_repr(self) -> str:
        where = "input" if self.is_feedforward else "output"
        return f"scales={where}, features={self.ia3_l.numel()}" + (", merged" if self.merged else "")


@registered(aliases=["ia3", "(ia)^3", "ia_3"])
class IA3Model(DeltaBase):
    """IA3 on Linear and Conv1D modules (default: attention keys and values, fused ``qkv``
    projections, cross-attention keys and values, and the feed-forward down projection,
    whose input is scaled). Hyperparameters: see :class:`IA3Config`.

    Raises:
        ValueError: a target is not Linear-like; a ``feedforward_modules`` key matches no
            target.
    """

    delta_type = "ia3"
    config_class = IA3Config
    default_modified_modules = ["attn.k", "attn.v", "attn.qkv", "crossattn.k", "crossattn.v", "ff.w2"]
    layer_name = "ia3"

    def add_all_deltas(self, targets: Sequence[str]) -> None:
        feedforward = self.feedforward_targets(targets)
        modules = dict(self.backbone_model.named_modules())
        init_ones = cast(IA3Config, self.config).init_ia3_weights
        for name in targets:  # check every target before inserting anything
            if not is_linear_like(modules[name]):
                raise ValueError(f"IA3 applies to Linear and Conv1D modules; {name!r} is a "
                                 f"{type(modules[name]).__name__}. Choose its linear sub-modules instead.")
        for name in targets:
            module = modules[name]
            in_features, out_features = self.module_sizes(name, module)
            is_ff = name in feedforward
            layer = IA3Layer(in_features if is_ff else out_features, is_ff, init_ones,
                             **self.factory_kwargs(module))
            self.insert_layer(name, layer)

    def feedforward_targets(self, targets: Sequence[str]) -> Set[str]:
        """The targets whose input is scaled: those matched by ``feedforward_modules``
        (module name or common name), or by ``ff.w2`` when it is ``None``.

        Raises:
            ValueError: an explicit key matches none of ``targets``.
        """
        keys = cast(IA3Config, self.config).feedforward_modules
        mapping: Any = self.structure_mapping or CommonStructureMap.load(self.backbone_model)

        def names(target: str) -> List[str]:
            common = mapping.transform(target) if mapping is not None else None
            return [target] + ([common] if common else [])

        chosen = list(DEFAULT_FEEDFORWARD if keys is None else keys)
        found = {t for t in targets if any(endswith_in(n, chosen) for n in names(t))}
        if keys is not None:
            for key in keys:
                if not any(endswith_in(n, [key]) for t in targets for n in names(t)):
                    raise ValueError(
                        f"IA3Model: feedforward_modules entry {key!r} matches none of the modules IA3 "
                        f"modifies ({list(targets)[:6]}{'...' if len(targets) > 6 else ''}); "
                        "feed-forward modules must be among the modified modules")
        return found

    def unmerge(self) -> None:
        """Take the merged vectors out of the weights (see the module documentation)."""
        check_unmerge_order(self, IA3Layer)
        super().unmerge()

    def feedforward_names(self) -> List[str]:
        """Names of the modules whose input this delta scales."""
        return [e.host_name for e in self.layer_entries() if getattr(e.layer, "is_feedforward", False)]
