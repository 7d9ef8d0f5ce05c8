"""Batched kernels of per-example routing: all deltas of one module in one pass.

Under :func:`opendelta.route` with rows routed to different deltas, the dispatch of
:mod:`opendelta.route` hands the layers it can batch to the kernels below. For a module
(*host*) carrying K routed deltas of one kind, a kernel gathers each row's factors from the
deltas' parameters and computes every row's update with batched matrix products
(``bmm`` / ``baddbmm``, one small GEMM per row: the BGMV scheme of Punica / S-LoRA). The
number of tensor operations per host is constant: it does not grow with K.

Kinds (a layer opts out with ``batched_routing = False``, class or instance attribute):

* ``"lora"``: :class:`~opendelta.methods.lora.LoraLayer` (``lora_A`` [r, in], ``lora_B``
  [out, r], ``scaling``): ``out[i] += s_i * B_i (A_i x_i)``. A subclass that overrides the
  layer's maths without declaring ``batched_routing = True`` keeps the per-delta path.
* ``"residual"``: :class:`~opendelta.methods.bottleneck.ResidualAdapterLayer` (Adapter,
  LowRankAdapter, Compacter): ``h[i] += scale_i * up_i(act(down_i(h_i)))``.
* ``"parallel"`` / ``"parallel_out"``: ParallelAdapter's source layer (pre-hook) and the
  layer adding its result (post-hook).

Layers of one kind are batched together when their factors have the same shapes, dtype and
activation (the *batch key*); several keys on one host are several batched passes.

Per-row factors come from :func:`opendelta.routing_stacks.row_factors`: built from the
parameters on every call (never stale after an optimizer step, a ``load_state_dict`` or a
write through ``.data``), memory ``P * r * (in + out)`` elements per LoRA module and call for
P routed rows, independent of the number of deltas attached (details there).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from .core.dispatch import pop_call_value, push_call_value
from .core.layers import primary_input
from .methods.bottleneck import ResidualAdapterLayer
from .methods.compacter import PHMLinear
from .methods.lora import LoraLayer
from .methods.low_rank_adapter import LowRankLinear
from .methods.parallel_adapter import ParallelAdapterLayer, ParallelAdapterOutput
from .routing_stacks import Factors, row_factors

__all__ = ["post_batch_key", "pre_batch_key", "post_update", "pre_push", "groups_rows"]

Key = Tuple[Hashable, ...]


# --------------------------------------------------------------------------- batch keys
#: kind -> (base class, side, the methods holding its maths).
_KINDS = {
    "lora": (LoraLayer, "post", ("post_forward", "routed_update", "delta")),
    "residual": (ResidualAdapterLayer, "post", ("post_forward", "adapt", "bottleneck", "_raw")),
    "parallel_out": (ParallelAdapterOutput, "post", ("post_forward",)),
    "parallel": (ParallelAdapterLayer, "pre", ("pre_forward", "delta", "bottleneck", "_raw")),
}


@functools.lru_cache(maxsize=None)
def _class_kind(layer_class: Hashable, side: str) -> Optional[str]:
    """The kernel kind of a layer class on ``side`` (``"pre"`` / ``"post"``), or ``None``.

    A class (or a base) setting ``batched_routing = False`` opts out; a subclass overriding
    the maths of its kind's base class is batched only if it declares
    ``batched_routing = True``. (A pure function of the class: cached.)
    """
    cls = cast(type, layer_class)
    for kind, (base, kind_side, methods) in _KINDS.items():
        if kind_side != side or not issubclass(cls, base):
            continue
        flag = getattr(cls, "batched_routing", None)
        if flag is not None:
            return kind if flag else None
        return kind if all(getattr(cls, m) is getattr(base, m) for m in methods) else None
    return None


def _activation_key(module: nn.Module) -> Hashable:
    return type(module), module.extra_repr()


def _projection_key(proj: nn.Module) -> Optional[Hashable]:
    """What a stack of projections must share: type, sizes, bias, parameterisation."""
    params = proj._parameters
    if type(proj) is nn.Linear or type(proj) is LowRankLinear:
        return type(proj), tuple((name, p.shape) for name, p in params.items() if p is not None)
    if type(proj) is PHMLinear:
        return PHMLinear, tuple((name, p.shape) for name, p in params.items() if p is not None), proj.learn_phm
    return None


def _bottleneck_key(layer: Any, kind: str) -> Optional[Key]:
    down, activation, up = layer.parts()
    down_key, up_key = _projection_key(down), _projection_key(up)
    if down_key is None or up_key is None:
        return None
    param = next(iter(down._parameters.values()))
    return (kind, down_key, up_key, _activation_key(activation), param.dtype, param.device)


def _layer_key(layer: Any, side: str) -> Optional[Key]:
    kind = _class_kind(cast(Hashable, type(layer)), side)
    if kind is None or layer.__dict__.get("batched_routing") is False:  # instance opt-out
        return None
    if kind == "lora":
        A, B = layer._parameters["lora_A"], layer._parameters["lora_B"]
        return ("lora", A.shape, B.shape, A.dtype, A.device)
    if kind == "parallel_out":
        return ("parallel_out",)
    return _bottleneck_key(layer, kind)


def post_batch_key(layer: nn.Module) -> Optional[Key]:
    """The batch key of a post-hook layer, or ``None`` if it runs on the per-delta path."""
    return _layer_key(layer, "post")


def pre_batch_key(layer: nn.Module) -> Optional[Key]:
    """The batch key of a pre-hook layer, or ``None`` if it runs on the per-delta path."""
    return _layer_key(layer, "pre")


def groups_rows(key: Key) -> bool:
    """Whether the kernel of ``key`` needs its rows grouped by delta (ParallelAdapter hands
    each delta its own rows), rather than in batch order."""
    return key[0] in ("parallel", "parallel_out")


# --------------------------------------------------------------------------- kernels
def _rows3(tensor: torch.Tensor) -> torch.Tensor:
    """``[P, tokens, features]`` view (or copy) of a ``[P, ..., features]`` tensor."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def _own_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one dtype policy of the delta layers: compute in the deltas' dtype outside autocast."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def _row_scale(values: Sequence[float], slot_list: Sequence[int], like: torch.Tensor) -> Any:
    """One float when every delta shares it, else a ``[P, 1, 1]`` tensor of per-row values."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor([values[s] for s in slot_list], dtype=like.dtype, device=like.device).view(-1, 1, 1)


def _dropout(x: torch.Tensor, layers: Sequence[Any], slot_list: Sequence[int]) -> torch.Tensor:
    """Each row through its delta's LoRA dropout (training mode only)."""
    if not layers[0].training and all(not layer.training for layer in layers):
        return x
    probs = [layer.lora_dropout.p if layer.lora_dropout is not None and layer.training else 0.0
             for layer in layers]
    if not any(probs):
        return x
    if all(p == probs[0] for p in probs):
        return nn.functional.dropout(x, probs[0], training=True)
    keep = torch.tensor([1.0 - probs[s] for s in slot_list], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * torch.bernoulli(keep.expand_as(x)) / keep


def _lora(factors: Factors, layers: Sequence[Any], x: torch.Tensor, base: Optional[torch.Tensor],
          dtype: torch.dtype, slot_list: Sequence[int]) -> torch.Tensor:
    """``base + update`` (``base`` given: every row, in batch order) or the update
    (``[P, ..., out]`` in ``dtype``) of the rows of ``x`` (``[P, ..., in]``); ``factors``:
    per row ``A^T`` ``[P, in, r]`` and ``B^T`` ``[P, r, out]``."""
    At, Bt = cast(Tuple[torch.Tensor, torch.Tensor], factors)
    x3 = _dropout(_own_dtype(_rows3(x), At.dtype), layers, slot_list)
    low = torch.bmm(x3, At)  # [P, T, r]
    scale = _row_scale([layer.scaling for layer in layers], slot_list, low)
    out_shape = (*x.shape[:-1], Bt.shape[-1])
    if (base is not None and isinstance(scale, float) and low.dtype == base.dtype
            and tuple(base.shape) == out_shape):
        # base + scaling * low @ B^T in one kernel, as LoraLayer.post_forward does.
        return torch.baddbmm(_rows3(base), low, Bt, alpha=scale).view(out_shape)
    update = torch.bmm(low * scale, Bt).view(out_shape).to(dtype)
    return update if base is None else base + update


def _bottleneck(factors: Factors, layers: Sequence[Any], h: torch.Tensor, slot_list: Sequence[int]
                ) -> torch.Tensor:
    """``scale_i * up_i(act(down_i(h_i)))`` for the rows of ``h`` (``[P, ..., in]``), in
    ``h``'s dtype; ``factors``: per row ``W_down``, ``b_down``, ``W_up``, ``b_up``."""
    w_down, w_up = cast(torch.Tensor, factors[0]), cast(torch.Tensor, factors[2])
    b_down, b_up = factors[1], factors[3]
    h3 = _own_dtype(_rows3(h), w_down.dtype)
    z = torch.baddbmm(b_down.unsqueeze(1), h3, w_down) if b_down is not None else torch.bmm(h3, w_down)
    z = layers[0].parts()[1](z)
    y = torch.baddbmm(b_up.unsqueeze(1), z, w_up) if b_up is not None else torch.bmm(z, w_up)
    scale = _row_scale([layer.scale for layer in layers], slot_list, y)
    if not isinstance(scale, float) or scale != 1:
        y = y * scale
    return y.reshape(*h.shape[:-1], y.shape[-1]).to(h.dtype)


def post_update(key: Key, layers: Sequence[nn.Module], plan: Any, args: Tuple[Any, ...],
                kwargs: Dict[str, Any], current: torch.Tensor, fuse: bool) -> torch.Tensor:
    """The rows' result of the post-hook layers ``layers`` (one batch key, layer ``j``
    serving the rows whose slot is ``j``).

    ``plan`` (:class:`opendelta.route.RowPlan`) gives the rows (``plan.rows``; ``None``: all
    rows in batch order) and their slots. Returns ``current + update`` when ``fuse`` (all
    rows, batch order), else the update of ``plan.rows`` (to be index-added).
    """
    kind = key[0]
    rows = plan.rows
    if kind == "parallel_out":
        values = [pop_call_value(layer.__dict__["adapter"], None) for layer in layers]
        for layer, value in zip(layers, values):
            if value is None:
                raise RuntimeError(f"the parallel adapter read from {layer.source_name!r} has not run "
                                   "before this module: a pair's input module must run before its "
                                   "output module in every forward pass")
        update = torch.cat(values) if len(values) > 1 else values[0]
        target = current if rows is None else current.index_select(0, rows)
        if update.shape != target.shape:
            if update.numel() != target.numel():
                raise RuntimeError(f"the parallel adapters routed here produced shape {tuple(update.shape)}, "
                                   f"which cannot be added to this module's output rows {tuple(target.shape)}")
            update = update.reshape(target.shape)
        update = update.to(current.dtype)
        return current + update if fuse else update
    if kind == "lora":
        x = args[0] if args else next(iter(kwargs.values()))
        x = x if rows is None else x.index_select(0, rows)
        factors = row_factors(key, layers, plan.slots, plan.slot_list)
        return _lora(factors, layers, x, current if fuse else None, current.dtype, plan.slot_list)
    # residual adapters: h + bottleneck(h) on the current hidden states
    h = current if rows is None else current.index_select(0, rows)
    update = _bottleneck(row_factors(key, layers, plan.slots, plan.slot_list), layers, h, plan.slot_list)
    return current + update if fuse else update


def pre_push(key: Key, layers: Sequence[nn.Module], plan: Any, args: Tuple[Any, ...],
             kwargs: Dict[str, Any]) -> None:
    """ParallelAdapter sources: compute every row's adapter output in one pass and hand each
    delta its rows (``plan`` groups rows by delta, see :meth:`opendelta.route.Routing.plan`)
    through the forward pass, as :class:`ParallelAdapterLayer` does."""
    x = primary_input(args, kwargs)
    x = x if plan.rows is None else x.index_select(0, plan.rows)
    out = _bottleneck(row_factors(key, layers, plan.slots, plan.slot_list), layers, x, plan.slot_list)
    pieces = torch.split(out, plan.sizes) if len(layers) > 1 else (out,)
    for layer, piece in zip(layers, pieces):
        push_call_value(layer, piece)
