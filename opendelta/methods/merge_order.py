"""Unmerge order for deltas whose merge is not an addition (IA3's scaling, DoRA's norm).

LoRA and BitFit merge by *adding* an increment to the host's weight, so their merges
commute and any of them can come out first. A multiplicative merge (IA3: ``W * l``;
DoRA: ``m / ||W + dW|| * (W + dW)``) does not commute with what was merged after it into
the same weight: it can only be taken out while it is the last merge still in that weight.
:func:`check_unmerge_order` refuses, before anything changes, an unmerge that would
break this rule; :class:`TargetMergeMixin` writes such merges by value.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from ..core.merging import _MERGE_STACK
from ..core.protocol import DeltaModelProtocol


def merged_after(host: nn.Module, layer: Any) -> List[Any]:
    """Layers merged into ``host`` after ``layer`` and still merged (empty if ``layer`` is
    not merged into ``host``)."""
    stack = host.__dict__.get(_MERGE_STACK, [])
    for position, merged in enumerate(stack):
        if merged is layer:
            return list(stack[position + 1:])
    return []


def check_unmerge_order(delta: DeltaModelProtocol, multiplicative: type) -> None:
    """Raise ``RuntimeError`` if a merged layer of ``delta`` of type ``multiplicative`` has
    a merge of *another* delta on top of it in its host (this delta's own layers come out
    last-first, so they never block each other).

    Raises:
        RuntimeError: naming the module and what to unmerge first; nothing was changed.
    """
    own = {id(entry.layer) for entry in delta.layer_entries()}
    for entry in delta.layer_entries():
        layer = entry.layer
        if not isinstance(layer, multiplicative) or not getattr(layer, "merged", False):
            continue
        blocking = [other for other in merged_after(delta.host_module(entry.host_name), layer)
                    if id(other) not in own]
        if blocking:
            names = sorted({str(getattr(other, "delta_name", None)) for other in blocking})
            raise RuntimeError(
                f"cannot unmerge {delta.name!r} from {entry.host_name!r}: its merge scales the "
                f"weight, and deltas {names} were merged into the same weight afterwards. Unmerge "
                "those first (merges come out in the reverse order they went in); nothing was "
                "unmerged")


class TargetMergeMixin:
    """Merging by *value* for layers whose merge is a product (put it before
    :class:`~opendelta.core.merging.MergeableLayer` in the bases).

    An additive merge (``W += increment``) of a product loses the low bits of ``W`` where the
    product is much smaller than ``W``, and ``W -= increment`` loses them where it is much
    larger. A subclass states instead, with :meth:`merge_targets`, the values its tensors
    take (``W * l`` when merging, ``W' / l`` when unmerging, in fp32); merging and unmerging
    write them, so each direction is one rounding from the exact result.
    ``merge(keep_copy=True)`` still restores the copies bit for bit.
    """

    merged: bool
    merge_state: Any

    def merge_targets(self, host: nn.Module) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """``(backbone tensor, its value after merging)`` (or after unmerging, when merged)."""
        raise NotImplementedError

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        with torch.no_grad():
            return [(t, (target - t.detach().float()).to(t.dtype)) for t, target in self.merge_targets(host)]

    def _targets_as_merged(self, host: nn.Module) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """:meth:`merge_targets` with the parameter values of merge time (they may have
        been trained or loaded since)."""
        snapshot = self.merge_state.get("snapshot")
        params = dict(self.named_parameters())  # type: ignore[attr-defined]
        if snapshot is None or all(torch.equal(p.detach(), snapshot[n].to(p.device, p.dtype))
                                   for n, p in params.items() if p.device.type != "meta"):
            return self.merge_targets(host)
        current = {n: p.detach().clone() for n, p in params.items()}
        try:
            for name, param in params.items():
                param.copy_(snapshot[name])
            return [(t, value.clone()) for t, value in self.merge_targets(host)]
        finally:
            for name, param in params.items():
                param.copy_(current[name])

    def merge(self, host: nn.Module, keep_copy: bool = False, updates: Any = None) -> None:
        if self.merged:
            return
        with torch.no_grad():
            targets = self.merge_targets(host)
        super().merge(host, keep_copy, updates)  # type: ignore[misc]  # state, stack and hooks
        with torch.no_grad():
            for tensor, target in targets:
                tensor.copy_(target)

    def unmerge(self, host: nn.Module) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            targets = self._targets_as_merged(host)
        from_copy = self.merge_state.get("backup") is not None and not merged_after(host, self)
        super().unmerge(host)  # type: ignore[misc]
        if not from_copy:
            with torch.no_grad():
                for tensor, target in targets:
                    tensor.copy_(target)
