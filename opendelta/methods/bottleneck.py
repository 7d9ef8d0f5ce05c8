"""The bottleneck layer shared by the adapter family: ``scale * up(act(down(x)))``.

Adapter, LowRankAdapter and Compacter add it to their host's output (a residual
adapter); ParallelAdapter computes it from one module's input and adds it to a module's
output. Only the projections differ, and they are plugged in as modules: ``nn.Linear``
(Adapter, ParallelAdapter), :class:`~opendelta.methods.low_rank_adapter.LowRankLinear`
(rank-k factors) and :class:`~opendelta.methods.compacter.PHMLinear` (hypercomplex).

Child names follow the original library, so its checkpoints load unchanged: the
``"modulelist"`` layout (``modulelist.down_proj``, ``non_linear``, ``up_proj``: Adapter,
ParallelAdapter) or the ``"sampler"`` layout (``down_sampler``, ``activation``,
``up_sampler``: LowRankAdapter, Compacter).

**One dtype policy.** A layer computes in the dtype of its own parameters (``delta_dtype``)
and returns the dtype of its input: outside ``torch.autocast`` the input is cast in and
the result cast back; under autocast the region's dtype rules apply.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..core.layers import DeltaLayer, primary_tensor, replace_primary_tensor

LAYOUTS = ("modulelist", "sampler")


def compute_in_own_dtype(module: nn.Module, fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed in the dtype of ``module``'s first floating parameter (cast back to
    ``x``'s dtype), unless autocast is on or the dtypes already agree."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None or param.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return fn(x)
    return fn(x.to(param.dtype)).to(x.dtype)


class BottleneckLayer(DeltaLayer):
    """``scale * up(act(down(x)))`` for ``x`` of shape ``[..., in_features]`` ->
    ``[..., out_features]``.

    Args:
        down: projection ``in_features -> bottleneck``.
        activation: the non-linearity.
        up: projection ``bottleneck -> out_features``.
        layout: ``"modulelist"`` or ``"sampler"`` (child names, see the module docs).
        scale: factor on the result (ParallelAdapter's ``scaled``); default 1.
    """

    def __init__(self, down: nn.Module, activation: nn.Module, up: nn.Module,
                 layout: str = "modulelist", scale: float = 1.0):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.scale = scale
        if layout == "modulelist":
            self.modulelist = nn.Sequential(OrderedDict(down_proj=down, non_linear=activation, up_proj=up))
        else:
            self.down_sampler = down
            self.activation = activation
            self.up_sampler = up

    def parts(self) -> Tuple[nn.Module, nn.Module, nn.Module]:
        """``(down, activation, up)``."""
        if self.layout == "modulelist":
            m = self.modulelist
            return m.down_proj, m.non_linear, m.up_proj
        return self.down_sampler, self.activation, self.up_sampler

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        down, activation, up = self.parts()
        out = up(activation(down(x)))
        return out * self.scale if self.scale != 1 else out

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * up(act(down(x)))`` in this layer's dtype, returned in ``x``'s."""
        return compute_in_own_dtype(self, self._raw, x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}" if self.scale != 1 else ""


class ResidualAdapterLayer(BottleneckLayer):
    """A bottleneck on its host's output with a residual connection: ``h + bottleneck(h)``.

    The host's output may be a tensor or a tuple whose first element is the hidden states
    (``[..., hidden]``); only those change.
    """

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden] -> [..., hidden]``."""
        return hidden + self.bottleneck(hidden)

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: Any) -> Any:
        return replace_primary_tensor(output, self.adapt(primary_tensor(output)))


def uninitialised_linear(in_features: int, out_features: int, device: Any = None, dtype: Any = None) -> nn.Linear:
    """An ``nn.Linear`` (with bias) whose parameters are allocated but not initialised.

    ``nn.Linear.__init__`` draws Kaiming-uniform weights that the adapters overwrite at once;
    on the meta device that draw alone was a third of the time to apply an adapter to a
    7B-parameter model. The module is a plain ``nn.Linear`` in every other respect.
    """
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    linear.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
    return linear


def plain_projections(in_features: int, bottleneck: int, out_features: int, factory: Dict[str, Any],
                      std: float = 0.01) -> Tuple[nn.Linear, nn.Linear]:
    """Two ``nn.Linear`` projections initialised near zero (normal, ``std``; zero biases),
    so that a fresh adapter is close to the identity (on the meta device: no values)."""
    down = uninitialised_linear(in_features, bottleneck, **factory)
    up = uninitialised_linear(bottleneck, out_features, **factory)
    if down.weight.device.type != "meta":
        for linear in (down, up):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
    return down, up


__all__ = ["BottleneckLayer", "ResidualAdapterLayer", "plain_projections", "uninitialised_linear",
           "compute_in_own_dtype"]
