"""ParallelAdapter: a bottleneck adapter fed by one module's input, whose output is added
to (the same or a later) module's output.

He et al., 2022 ("Towards a unified view of parameter-efficient transfer learning"). For a
pair (input module ``A``, output module ``B``): ``B(...) + scaled * up(act(down(x_A)))`` where
``x_A`` is the hidden-state input of ``A``.

**Pairs.** ``modified_modules`` is read two entries at a time, as in OpenDelta:
``[in_1, out_1, in_2, out_2, ...]``. ``["attn", "attn"]`` puts one adapter from each attention
block's input to its output; ``["ff.w1", "ff.w2"]`` one from each feed-forward up projection's
input to its down projection's output. A key may match several modules (one per layer):
the i-th module matched by ``in_k`` is paired with the i-th matched by ``out_k``, so both
must match as many modules. The default is ``["attn", "attn", "ff.w1", "ff.w2"]``, and
OpenDelta's saved configs (``["attn@", "attn@", "ff@.w1@", "ff@.w2@"]``) build the same
pairs through :meth:`ParallelAdapterModel.from_config`.

The adapter's parameters live on ``A`` (``A.parallel_adapter.modulelist.down_proj``..., the
names OpenDelta 0.3.2 saves); ``B`` gets a parameterless ``parallel_adapter_output`` layer
that adds the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import integer, number, validated
from ..core.dispatch import pop_call_value, push_call_value
from ..core.layers import DeltaLayer, primary_input, primary_tensor, replace_primary_tensor
from ..core.targets import candidate_modules
from ..core.registry import registered
from .activations import activation_rule, get_activation
from .bottleneck import BottleneckLayer, plain_projections


@dataclass
class ParallelAdapterConfig(BaseDeltaConfig):
    """Args:
        bottleneck_dim: width of the bottleneck (> 0). Default 24.
        non_linearity: activation between the projections. Default ``"gelu_new"``.
        scaled: factor applied to the adapter's output; ``None`` (as written by OpenDelta)
            means 1. Default 1.0.
    """

    delta_type = "parallel_adapter"
    bottleneck_dim: int = validated(24, integer(minimum=1))
    non_linearity: str = validated("gelu_new", activation_rule())
    scaled: Optional[float] = validated(1.0, number(nullable=True))


class ParallelAdapterLayer(BottleneckLayer):
    """The adapter, on the module whose input it reads.

    Its pre-hook computes ``scaled * up(act(down(x)))`` from the host's hidden-state input
    ``x`` (``[..., in_dim]``) and hands it, through the forward pass in progress (never
    through ``self``), to the :class:`ParallelAdapterOutput` of the pair, which adds it to
    its host's output (``[..., out_dim]``). Parameters in ``modulelist``: ``down_proj``
    ``[bottleneck, in_dim]`` and ``up_proj`` ``[out_dim, bottleneck]`` with biases,
    initialised normal (std 0.01) with zero biases.
    """

    uses_pre_hook = True
    uses_post_hook = False

    def __init__(self, in_dim: int, out_dim: int, bottleneck_dim: int = 24, non_linearity: str = "gelu_new",
                 scaled: float = 1.0, device: Any = None, dtype: Any = None):
        down, up = plain_projections(in_dim, bottleneck_dim, out_dim, {"device": device, "dtype": dtype})
        super().__init__(down, get_activation(non_linearity), up, layout="modulelist", scale=scaled)

    @property
    def scaled(self) -> float:
        return self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scaled * up(act(down(x)))`` for ``x`` of shape ``[..., in_dim]``."""
        return self.bottleneck(x)

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        push_call_value(self, self.delta(primary_input(args, kwargs)))
        return None


class ParallelAdapterOutput(DeltaLayer):
    """Adds the result of its pair's :class:`ParallelAdapterLayer` to the host's output."""

    #: adds a value computed from another module's input: commutes with a merge
    output_additive = True

    def __init__(self, adapter: ParallelAdapterLayer, source_name: str):
        super().__init__()
        # A plain reference, not a child: the adapter's parameters belong to its own host.
        self.__dict__["adapter"] = adapter
        self.source_name = source_name

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        hidden = primary_tensor(output)
        delta = pop_call_value(self.__dict__["adapter"], None)
        if delta is None:
            raise RuntimeError(
                f"the parallel adapter read from {self.source_name!r} has not run before this module: "
                "a pair's input module must run before its output module in every forward pass")
        if delta.shape != hidden.shape:
            # e.g. OPT flattens tokens to [batch * length, hidden] inside its feed-forward block.
            if delta.numel() != hidden.numel():
                raise RuntimeError(
                    f"the parallel adapter read from {self.source_name!r} produced shape "
                    f"{tuple(delta.shape)}, which cannot be added to this module's output of shape "
                    f"{tuple(hidden.shape)}; pair modules that see the same tokens")
            delta = delta.reshape(hidden.shape)
        return replace_primary_tensor(output, hidden + delta.to(hidden.dtype))

    def extra_repr(self) -> str:
        return f"source={self.source_name!r}"


@registered(aliases=["paralleladapter", "parallel_adapter"])
class ParallelAdapterModel(DeltaBase):
    """Parallel adapters from a module's input to a module's output (default: around each
    attention block and from each feed-forward block's input to its output). See the module
    documentation for how ``modified_modules`` expresses the pairs; hyperparameters: see
    :class:`ParallelAdapterConfig`.

    Raises:
        ValueError: an odd number of ``modified_modules``; the two keys of a pair match
            different numbers of modules, or an output module that comes before its input
            module; a module used as the input (or the output) of two pairs.
    """

    delta_type = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules = ["attn", "attn", "ff.w1", "ff.w2"]
    layer_name = "parallel_adapter"

    # ------------------------------------------------------------------ pairs
    def _matches(self, key: str, uses_defaults: bool) -> List[str]:
        if not uses_defaults:
            return DeltaBase.resolve_targets(self, [key])
        try:  # a default key the architecture lacks is skipped
            return DeltaBase.resolve_targets(self, [key], uses_defaults=True)
        except ValueError:
            return []

    def resolve_targets(self, keys: Sequence[str], uses_defaults: bool = False) -> List[str]:
        """Pair the modules matched by consecutive keys; keeps the pairs in ``self.pairs``
        and returns every module involved, in model order."""
        keys = list(keys)
        if len(keys) % 2:
            raise ValueError(
                f"ParallelAdapter reads modified_modules in pairs (input module, output module), e.g. "
                f"['attn', 'attn', 'ff.w1', 'ff.w2']; got an odd number of entries: {keys}")
        order = {name: i for i, (name, _) in enumerate(candidate_modules(self.backbone_model))}
        pairs: List[Tuple[str, str]] = []
        for key_in, key_out in zip(keys[::2], keys[1::2]):
            ins, outs = self._matches(key_in, uses_defaults), self._matches(key_out, uses_defaults)
            if uses_defaults and not (ins and outs):
                continue
            if len(ins) != len(outs):
                raise ValueError(
                    f"ParallelAdapter pair ({key_in!r}, {key_out!r}): {key_in!r} matches {len(ins)} modules "
                    f"and {key_out!r} {len(outs)}; the i-th input module is paired with the i-th output "
                    "module, so both keys must match as many")
            for source, target in zip(ins, outs):
                if order[target] < order[source]:
                    raise ValueError(f"ParallelAdapter pair ({key_in!r}, {key_out!r}): output module "
                                     f"{target!r} comes before input module {source!r}")
                pairs.append((source, target))
        if not pairs:
            raise ValueError(f"ParallelAdapterModel's default pairs {keys} match no module of "
                             f"{type(self.backbone_model).__name__}; pass modified_modules explicitly")
        for side, names in (("input", [s for s, _ in pairs]), ("output", [t for _, t in pairs])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"ParallelAdapter: {repeated} would be the {side} module of several "
                                 "pairs; use one pair per module (or one ParallelAdapterModel per pair)")
        self.pairs = sorted(pairs, key=lambda pair: (order[pair[0]], order[pair[1]]))
        return sorted({name for pair in pairs for name in pair}, key=order.__getitem__)

    # ------------------------------------------------------------------ building
    def add_all_deltas(self, targets: Sequence[str]) -> None:
        modules = dict(self.backbone_model.named_modules())
        cfg = self.config
        scaled = 1.0 if cfg.scaled is None else cfg.scaled
        for source, target in self.pairs:
            in_dim = self.module_sizes(source, modules[source])[0]
            out_dim = self.module_sizes(target, modules[target])[1]
            adapter = ParallelAdapterLayer(in_dim, out_dim, cfg.bottleneck_dim, cfg.non_linearity, scaled,
                                           **self.factory_kwargs(modules[source]))
            self.insert_layer(source, adapter)
            self.insert_layer(target, ParallelAdapterOutput(adapter, source), f"{self.layer_attr}_output")
