"""Merging linear deltas into *quantized* weights (4-bit, 8-bit, int8 tensor subclasses).

A quantized host (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, an ``nn.Linear`` whose
weight torchao quantized, ...) cannot take an in-place ``W += dW``. Merging into it means:
dequantize, add the update in float32, quantize again with the same scheme, and install the
result. That loses precision, so:

* **the original quantized weight is always kept** (one copy of the *quantized* tensor, no
  float copy): :meth:`QuantizedMergeMixin.unmerge` puts the very same object back, bit for
  bit, once no layer is merged into the host any more (``keep_copy`` adds nothing here);
* **the stored weight is a function of (original, merged layers)**: every merge or unmerge
  recomputes ``Q(D(original) + sum of the merged updates)``, so errors never accumulate and
  the order of merges does not matter;
* **the error is reported**: after each rewrite the host records a :class:`MergeError`,
  the max abs difference between the dequantized stored weight and the exact float merged
  weight, the bound the scheme guarantees for it, and the max abs change of the layer's
  output on a fixed probe (16 rows of standard normal inputs). :func:`merge_report` reads
  them; :mod:`opendelta.integrations.quantized` documents the bounds and measured values.

The storage formats are not known here (the core imports torch only): each is a
:class:`WeightCodec`, registered once at import time by :mod:`opendelta.integrations.quantized`
(which ``import opendelta`` loads; it imports neither bitsandbytes nor torchao), like the
delta methods in :mod:`opendelta.core.registry`. A delta layer opts in by putting
:class:`QuantizedMergeMixin` before its class in the bases (``QuantizedLoraLayer``): on a
host no codec handles, every method defers to the layer's own float merging.

Peak memory while merging: one float32 copy of the weight being rewritten, one host at a
time. ``merge_and_detach(dequantize=True)`` (see :func:`dequantize_modules`) instead turns
every quantized module into a full-precision ``nn.Linear`` holding the exact merged weight.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .dispatch import refresh_hooks

logger = logging.getLogger(__name__)

#: host attribute: ``{"kept": <codec snapshot of the original>, "layers": [...], "error": MergeError}``
_RECORD = "_opendelta_quantized_merge"
#: layer attribute while merged into a quantized host: ``{"host": module, "params": {name: tensor}}``
_SNAPSHOT = "_opendelta_quantized_snapshot"
_PROBE_ROWS = 16


class WeightCodec:
    """How merging reads and rewrites one storage format of quantized weights.

    Implementations live in :mod:`opendelta.integrations.quantized`; every method receives
    the module holding the weight (a Linear-like ``[out, in]`` layer).
    """

    #: short name of the scheme, used in reports (``"bnb-nf4"``, ``"bnb-int8"``, ...).
    name: str = "quantized"

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module``'s weight is stored in this format (cheap; imports nothing)."""
        raise NotImplementedError

    def weight_shape(self, module: nn.Module) -> Tuple[int, int]:
        """``(out, in)`` of the logical weight, read without dequantizing."""
        sizes: Any = module
        return int(sizes.out_features), int(sizes.in_features)

    def original_dtype(self, module: nn.Module) -> Optional[torch.dtype]:
        """The floating dtype the weight had before quantization, if recorded."""
        return None

    def requantize_problem(self, module: nn.Module) -> Optional[str]:
        """Why a weight of this module cannot be quantized again (``None``: it can)."""
        return None

    def keep(self, module: nn.Module) -> Any:
        """What :meth:`restore` needs to put the current weight back bit for bit."""
        raise NotImplementedError

    def restore(self, module: nn.Module, kept: Any) -> None:
        raise NotImplementedError

    def dequantize(self, module: nn.Module, kept: Any = None) -> torch.Tensor:
        """The weight as a float tensor ``[out, in]`` (``kept``: a snapshot instead of the current one)."""
        raise NotImplementedError

    def store(self, module: nn.Module, weight: torch.Tensor, kept: Any) -> None:
        """Quantize ``weight`` (float ``[out, in]``) with the scheme of ``kept`` and install it."""
        raise NotImplementedError

    def error_bound(self, module: nn.Module, weight: torch.Tensor) -> float:
        """Upper bound on ``max |dequantize(module) - weight|`` right after :meth:`store`."""
        raise NotImplementedError

    def to_float(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Make ``module`` a full-precision ``nn.Linear`` holding ``weight`` (same object)."""
        raise NotImplementedError

    def after_dequantize(self, backbone: nn.Module) -> None:
        """Called once per codec after :func:`dequantize_modules` converted modules of ``backbone``."""


#: the registered codecs, filled at import time (see the module docstring), read-only after.
_CODECS: List[WeightCodec] = []


def register_weight_codec(codec: WeightCodec) -> WeightCodec:
    """Register a storage format of quantized weights (once; registering twice is a no-op)."""
    if not any(type(c) is type(codec) for c in _CODECS):
        _CODECS.append(codec)
    return codec


def weight_codec(module: nn.Module) -> Optional[WeightCodec]:
    """The codec of ``module``'s quantized weight, or ``None`` for a plain module."""
    if "weight" not in getattr(module, "_parameters", {}):
        return None
    for codec in _CODECS:
        if codec.handles(module):
            return codec
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored in a registered quantized format."""
    return weight_codec(module) is not None


@dataclass(frozen=True)
class MergeError:
    """What a merge into a quantized weight cost.

    Attributes:
        scheme: the storage format (:attr:`WeightCodec.name`).
        weight: ``max |D(stored) - W|`` over the weight, ``W`` the exact float merged weight.
        bound: the bound the scheme guarantees for ``weight`` (see
            :mod:`opendelta.integrations.quantized`).
        output: max abs change of the layer's output (without bias) on 16 probe rows of
            standard normal inputs: ``max |x @ (D(stored) - W)^T|``.
        weight_scale: ``max |W|``, to read ``weight`` relative to the weights.
    """

    scheme: str
    weight: float
    bound: float
    output: float
    weight_scale: float


class _WeightView(nn.Linear):
    """A float stand-in of a quantized Linear: what a float merging routine expects to see
    (``weight`` ``[out, in]``; the host's own ``bias``)."""

    def __init__(self, host: nn.Module, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", getattr(host, "bias", None))


def _float_view(host: nn.Module, codec: WeightCodec, values: bool = True) -> _WeightView:
    """``host`` as a float32 Linear: its dequantized weight (``values``) or only its shape
    (a meta tensor, for checks that read no values)."""
    if values:
        weight = codec.dequantize(host).float()
    else:
        weight = torch.empty(codec.weight_shape(host), dtype=torch.float32, device="meta")
    return _WeightView(host, weight)


class QuantizedMergeMixin:
    """Merging for a :class:`~opendelta.core.merging.MergeableLayer` whose host may be
    quantized; put it first in the bases (``class Q(QuantizedMergeMixin, LoraLayer)``).

    On a quantized host the layer's own ``merge_problem`` / ``merge_updates`` run on a float
    stand-in of the host (:class:`_WeightView`), and only updates of the weight are accepted;
    merge / unmerge rewrite the stored weight as described in the module docstring.
    """

    # ------------------------------------------------------------------ checks and plans
    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        codec = weight_codec(host)
        if codec is None:
            return super().merge_problem(host, create_missing)  # type: ignore[misc]
        problem = codec.requantize_problem(host)
        if problem:
            return problem
        return super().merge_problem(_float_view(host, codec, values=False), create_missing)  # type: ignore[misc]

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Any]:
        """On a quantized host: the update against its dequantized weight (a float copy; what
        ``merge(safe=True)`` checks). The merge itself recomputes it, see :meth:`merge`."""
        codec = weight_codec(host)
        if codec is None:
            return super().merge_updates(host, create_missing)  # type: ignore[misc]
        return super().merge_updates(_float_view(host, codec), create_missing)  # type: ignore[misc]

    def _weight_increment(self, host: nn.Module, weight: torch.Tensor,
                          params: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """This layer's update of ``weight`` (float32 ``[out, in]``), computed with ``params``
        (a snapshot of its own parameters) when given."""
        view = _WeightView(host, weight)
        own = dict(self.named_parameters())  # type: ignore[attr-defined]
        current = {n: p.detach().clone() for n, p in own.items()} if params is not None else {}
        with torch.no_grad():
            try:
                if params is not None:
                    for name, param in own.items():
                        param.copy_(params[name])
                updates = super().merge_updates(view)  # type: ignore[misc]
                total = torch.zeros_like(weight)
                for tensor, increment in updates:
                    if tensor is not view.weight:
                        raise ValueError(f"{type(self).__name__} changes a tensor other than the weight of "
                                         f"{type(host).__name__}; only weight updates merge into quantized layers")
                    total += increment.to(device=weight.device, dtype=weight.dtype)
                return total
            finally:
                for name, param in own.items():
                    if name in current:
                        param.copy_(current[name])

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, host: nn.Module, keep_copy: bool = False, updates: Optional[List[Any]] = None) -> None:
        """Fold this layer into ``host``: on a quantized host, requantize
        ``D(original) + updates`` (the original stays kept); else the layer's float merge."""
        codec = weight_codec(host)
        if codec is None:
            super().merge(host, keep_copy=keep_copy, updates=updates)  # type: ignore[misc]
            return
        if getattr(self, "merged", False):
            return
        record = host.__dict__.get(_RECORD) or {"kept": codec.keep(host), "layers": []}
        params = {n: p.detach().clone() for n, p in self.named_parameters()}  # type: ignore[attr-defined]
        self.__dict__[_SNAPSHOT] = {"host": host, "params": params}
        try:
            _rewrite(host, codec, record, [*record["layers"], self])
        except Exception:
            self.__dict__.pop(_SNAPSHOT, None)
            raise
        record["layers"].append(self)
        host.__dict__[_RECORD] = record
        self.merged = True
        refresh_hooks(host)

    def unmerge(self, host: nn.Module) -> None:
        """Take this layer out of ``host``: the original quantized weight comes back (the
        same object) when no other layer stays merged, else the rest is requantized."""
        record = host.__dict__.get(_RECORD)
        if record is None or not any(layer is self for layer in record["layers"]):
            super().unmerge(host)  # type: ignore[misc]
            return
        codec = weight_codec(host)
        rest = [layer for layer in record["layers"] if layer is not self]
        if codec is None:  # pragma: no cover - a record only exists on quantized hosts
            raise RuntimeError(f"{type(host).__name__} holds a quantized merge but no codec reads it")
        if rest:
            _rewrite(host, codec, record, rest)
            record["layers"] = rest
        else:
            codec.restore(host, record["kept"])
            del host.__dict__[_RECORD]
        self.__dict__.pop(_SNAPSHOT, None)
        self.merged = False
        refresh_hooks(host)

    def merge_is_stale(self) -> bool:
        """Whether a layer merged into a quantized host changed since (an optimizer step)."""
        snapshot = self.__dict__.get(_SNAPSHOT)
        if snapshot is None:
            parent = getattr(super(), "merge_is_stale", None)
            return bool(parent()) if parent is not None else False
        own = dict(self.named_parameters())  # type: ignore[attr-defined]
        return any(not torch.equal(p.detach(), snapshot["params"][n]) for n, p in own.items())

    def forget_merge(self) -> None:
        """The layer leaves a host it was merged into for good: its update stays in the
        stored weight, the kept original is dropped once no merged layer needs it."""
        snapshot = self.__dict__.pop(_SNAPSHOT, None)
        if snapshot is not None:
            host = snapshot["host"]
            record = host.__dict__.get(_RECORD)
            if record is not None:
                record["layers"] = [layer for layer in record["layers"] if layer is not self]
                if not record["layers"]:
                    del host.__dict__[_RECORD]
            self.merged = False
            return
        parent = getattr(super(), "forget_merge", None)
        if parent is not None:
            parent()
        else:
            self.merged = False


def _rewrite(host: nn.Module, codec: WeightCodec, record: Dict[str, Any], layers: List[Any]) -> None:
    """Store ``Q(D(original) + updates of layers)`` in ``host`` and record the error."""
    weight = merged_float_weight(host, codec, record["kept"], layers)
    codec.store(host, weight.to(_storage_dtype(codec, host)), record["kept"])
    record["error"] = _measure(host, codec, weight)
    logger.info("merged into quantized %s: %s", type(host).__name__, record["error"])


def _storage_dtype(codec: WeightCodec, host: nn.Module) -> torch.dtype:
    return codec.original_dtype(host) or torch.float32


def merged_float_weight(host: nn.Module, codec: WeightCodec, kept: Any, layers: Iterable[Any]) -> torch.Tensor:
    """``D(kept) + updates`` of ``layers`` (in order, each with its merge-time parameters), float32."""
    weight = codec.dequantize(host, kept).float()
    for layer in layers:
        snapshot = layer.__dict__.get(_SNAPSHOT)
        weight = weight + layer._weight_increment(host, weight, snapshot["params"] if snapshot else None)
    return weight


def _measure(host: nn.Module, codec: WeightCodec, weight: torch.Tensor) -> MergeError:
    with torch.no_grad():
        error = codec.dequantize(host).float() - weight
        generator = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(_PROBE_ROWS, weight.shape[1], generator=generator).to(weight.device)
        return MergeError(scheme=codec.name, weight=float(error.abs().max()),
                          bound=float(codec.error_bound(host, weight)),
                          output=float((probe @ error.t()).abs().max()), weight_scale=float(weight.abs().max()))


def merge_report(model: nn.Module) -> Dict[str, MergeError]:
    """``{module name: MergeError}`` of every quantized module of ``model`` holding merged deltas."""
    return {name: module.__dict__[_RECORD]["error"] for name, module in model.named_modules()
            if _RECORD in module.__dict__}


def _default_dtype(backbone: nn.Module) -> torch.dtype:
    """The dtype of the backbone's first floating, unquantized parameter (its working dtype)."""
    for module in backbone.modules():
        if weight_codec(module) is not None:
            continue
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and type(param) in (nn.Parameter, torch.Tensor):
                return param.dtype
    return torch.float32


def dequantize_modules(backbone: nn.Module, own_layers: Iterable[Any] = ()) -> List[str]:
    """Turn every quantized module of ``backbone`` into a full-precision ``nn.Linear`` (the
    same module object, so hooks, children and references stay valid), holding the exact
    float weight ``D(original) + merged updates`` (each merged layer with its current
    parameter values); those layers stay marked merged, their update now in the float
    weight, for ``merge_and_detach`` to remove. Returns the converted module names.

    Raises:
        ValueError: a quantized module holds a merged layer not in ``own_layers`` (another
            delta's): unmerge that delta first. Nothing was changed.
    """
    own = {id(layer) for layer in own_layers}
    found: List[Tuple[str, nn.Module, WeightCodec]] = []
    for name, module in backbone.named_modules():
        codec = weight_codec(module)
        if codec is None:
            continue
        record = module.__dict__.get(_RECORD)
        foreign = [layer for layer in (record or {}).get("layers", ()) if id(layer) not in own]
        if foreign:
            names = sorted({str(getattr(layer, "delta_name", "?")) for layer in foreign})
            raise ValueError(f"cannot dequantize {name!r}: deltas {names} are merged into it; unmerge them "
                             "first. Nothing was changed.")
        found.append((name, module, codec))
    default = _default_dtype(backbone)
    used: List[WeightCodec] = []
    for _, module, codec in found:
        record = module.__dict__.pop(_RECORD, None)
        with torch.no_grad():
            if record is None:
                weight = codec.dequantize(module).float()
            else:  # merged layers: with their current values, as merge_and_detach folds them
                for layer in record["layers"]:
                    layer.__dict__.pop(_SNAPSHOT, None)
                weight = merged_float_weight(module, codec, record["kept"], record["layers"])
        codec.to_float(module, weight.to(codec.original_dtype(module) or default))
        if codec not in used:
            used.append(codec)
    for codec in used:
        codec.after_dequantize(backbone)
    return [name for name, _, _ in found]


__all__ = ["WeightCodec", "MergeError", "QuantizedMergeMixin", "register_weight_codec", "weight_codec",
           "is_quantized", "merge_report", "dequantize_modules", "merged_float_weight"]
