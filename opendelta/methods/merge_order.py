"""Unmerge order for deltas whose merge is not an addition (IA3's scaling, DoRA's norm).

LoRA and BitFit merge by *adding* an increment to the host's weight, so their merges
commute and any of them can come out first. A multiplicative merge (IA3: ``W * l``;
DoRA: ``m / ||W + dW|| * (W + dW)``) does not commute with what was merged after it into
the same weight: it can only be taken out while it is the last merge still in that weight.
:func:`check_unmerge_order` refuses, before anything changes, an unmerge that would
break this rule.
"""
from __future__ import annotations

from typing import Any, List

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
