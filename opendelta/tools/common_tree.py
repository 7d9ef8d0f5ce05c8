"""The common-structure view of a model: modules named ``encoder.block.0.attn.q``.

Used by :meth:`opendelta.tools.visualization.Visualization.build_common_tree` and by
``structure_graph(common_structure=True)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch import nn

from ..core.layers import DeltaLayer
from ..core.structure import CommonStructureMap
from .structure_tree import StructureNode, fold, own_params, raw_tree


class CommonTreeBuilder:
    """Rebuilds the tree under common-structure names (``encoder.block.0.attn.q``).

    A module with a common name hangs under the node of its closest ancestor that has one,
    named relative to it (levels no module has become virtual nodes). A module without a
    common name is transparent when something below it has one; otherwise it is shown grey
    under its own name relative to that ancestor (or left out with ``only_common``).

    Args:
        model: the module to draw (the whole backbone, or a submodule of it).
        mapping: an object with ``transform(name) -> Optional[str]`` for names of the
            whole backbone (a :class:`CommonStructureMap`).
        keep_non_params: keep modules without parameters.
        only_common: leave out modules outside the common structure.
        prefix: the name of ``model`` inside the backbone (``""`` for the backbone itself),
            so that a submodule is drawn under the common names it has in the backbone.
    """

    def __init__(self, model: nn.Module, mapping: Any, keep_non_params: bool, only_common: bool,
                 prefix: str = ""):
        self.model = model
        self.mapping = mapping
        self.keep_non_params = keep_non_params
        self.only_common = only_common
        self.prefix = prefix.strip(".")
        self._common_below: Dict[str, bool] = {}

    def common_name(self, full_name: str) -> Optional[str]:
        """The common name of ``model``'s submodule ``full_name`` (``""``: ``model``)."""
        name = ".".join(p for p in (self.prefix, full_name) if p)
        return self.mapping.transform(name) if name else None

    def build(self, rootname: str) -> StructureNode:
        root = StructureNode([rootname], type(self.model).__name__, own_params(self.model, False))
        self._place_children(self.model, "", False, root, self.common_name("") or "", "")
        self._prune(root)
        return fold(root)

    def _has_common_below(self, module: nn.Module, full_name: str) -> bool:
        cache = self._common_below
        if full_name not in cache:
            found = False
            for child_name, child in module._modules.items():
                if child is None or isinstance(child, DeltaLayer):
                    continue
                child_full = f"{full_name}.{child_name}" if full_name else child_name
                if self.common_name(child_full) or self._has_common_below(child, child_full):
                    found = True
                    break
            cache[full_name] = found
        return cache[full_name]

    def _place_children(self, module: nn.Module, full_name: str, in_delta: bool,
                        anchor: StructureNode, anchor_common: str, anchor_full: str) -> None:
        for child_name, child in module._modules.items():
            if child is None:
                continue
            child_full = f"{full_name}.{child_name}" if full_name else child_name
            self._place(child, child_full, in_delta or isinstance(child, DeltaLayer),
                        anchor, anchor_common, anchor_full)

    def _place(self, module: nn.Module, full_name: str, in_delta: bool, anchor: StructureNode,
               anchor_common: str, anchor_full: str) -> None:
        common = None if in_delta else self.common_name(full_name)
        if common and common == anchor_common:  # a wrapper sharing its parent's common name
            anchor.params.extend(own_params(module, in_delta))
            self._place_children(module, full_name, in_delta, anchor, anchor_common, full_name)
            return
        if common:
            rel = common[len(anchor_common) + 1:] if anchor_common and common.startswith(anchor_common + ".") \
                else common
            *levels, last = rel.split(".")
            host = anchor
            for level in levels:
                host = self._child(host, level, None)
            node = self._child(host, last, type(module).__name__)
            node.params.extend(own_params(module, in_delta))
            self._place_children(module, full_name, in_delta, node, common, full_name)
            return
        if not in_delta and self._has_common_below(module, full_name):
            own = own_params(module, in_delta)
            if own and not self.only_common:
                anchor.children.append(StructureNode([self._relative(full_name, anchor_full)],
                                                     type(module).__name__, own, common=False))
            self._place_children(module, full_name, in_delta, anchor, anchor_common, anchor_full)
            return
        if self.only_common:
            return
        grey = raw_tree(module, self._relative(full_name, anchor_full), in_delta,
                        self.keep_non_params, skip_deltas=False)
        if grey is not None:
            mark_not_common(grey)
            anchor.children.append(grey)

    @staticmethod
    def _relative(full_name: str, anchor_full: str) -> str:
        return full_name[len(anchor_full) + 1:] if anchor_full else full_name

    @staticmethod
    def _child(host: StructureNode, name: str, type_name: Optional[str]) -> StructureNode:
        """The common child ``name`` of ``host``, created if needed. Two modules with one
        common name (BERT's ``intermediate`` and ``output`` are both ``ff``) share a node."""
        for child in host.children:
            if child.common and child.names == [name]:
                if type_name is not None:
                    if child.type_name is None:
                        child.type_name = type_name
                    elif type_name not in child.type_name.split("+"):
                        child.type_name += "+" + type_name
                return child
        child = StructureNode([name], type_name)
        host.children.append(child)
        return child

    def _prune(self, node: StructureNode) -> bool:
        """Drop parameter-free subtrees (unless ``keep_non_params``); True if ``node`` stays."""
        node.children = [c for c in node.children if self._prune(c)]
        return self.keep_non_params or bool(node.params) or bool(node.children)


def mark_not_common(node: StructureNode) -> None:
    """Mark ``node`` and its subtree as outside the common structure (drawn grey)."""
    node.common = False
    for child in node.children:
        mark_not_common(child)


def as_mapping(model: nn.Module, mapping: Any) -> Any:
    """A :class:`CommonStructureMap` from ``None`` (the model's own), a map or a dict."""
    if mapping is None:
        return CommonStructureMap(model)
    if isinstance(mapping, CommonStructureMap):
        return mapping
    if isinstance(mapping, Mapping):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise TypeError(
                "mapping must send module names to common names, e.g. "
                "{'encoder.layer.{i}.attention.self.query': 'encoder.block.{i}.attn.q'}; "
                "OpenDelta 0.3's nested mapping dicts are not supported")
        return CommonStructureMap(model, mapping=dict(mapping))
    raise TypeError(f"mapping must be None, a CommonStructureMap or a dict, not {type(mapping).__name__}")


__all__ = ["CommonTreeBuilder", "as_mapping", "mark_not_common"]
