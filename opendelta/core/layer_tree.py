"""A delta model's own tree of its layers, and transactional insertion.

Each layer is a child of its host in the backbone *and* of a mirror tree inside the delta
model at the same path (``bert.encoder.layer.0.attention.self.query.lora``), so that the
delta model's ``state_dict()``, ``parameters()``, ``to()`` and ``train()`` act on exactly
its layers, attached or not. Path nodes are parameterless :class:`Branch` modules.
"""
from __future__ import annotations

from typing import Any, List

from torch import nn

from .layers import LayerEntry


class Branch(nn.Module):
    """A node of a delta model's mirror tree; holds nothing itself."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - explained error
        raise RuntimeError("a path node of a delta model's layer tree cannot run")


def own_layer(root: nn.Module, entry: LayerEntry) -> None:
    """Register ``entry.layer`` under ``root`` at ``host_name.child_name``."""
    node: Any = root
    for part in filter(None, entry.host_name.split(".")):
        child = node._modules.get(part)
        if child is None:
            child = node._modules[part] = Branch()
        node = child
    # Straight into _modules: a path part may equal an attribute of the root (no clash
    # in attribute lookup, which finds __dict__ entries first).
    node._modules[entry.child_name] = entry.layer


def disown_layer(root: nn.Module, entry: LayerEntry) -> None:
    """Remove ``entry.layer`` from ``root``'s tree and prune the branches left empty."""
    path = [p for p in entry.host_name.split(".") if p]
    nodes: List[Any] = [root]
    for part in path:
        nodes.append(nodes[-1]._modules[part])
    del nodes[-1]._modules[entry.child_name]
    for node, part in zip(reversed(nodes[:-1]), reversed(path)):
        child = node._modules[part]
        if isinstance(child, Branch) and not child._modules:
            del node._modules[part]


class Transaction:
    """``with delta.transaction():`` removes the layers inserted in the block if it raises."""

    def __init__(self, delta: Any):
        self.delta = delta
        self.start = 0

    def __enter__(self) -> "Transaction":
        self.start = len(self.delta.layer_entries())
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            return
        for entry in reversed(self.delta.layer_entries()[self.start:]):
            self.delta.remove_layer(entry)
