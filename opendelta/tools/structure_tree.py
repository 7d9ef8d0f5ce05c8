"""The folded structure of a model: plain-Python nodes, built fast, drawn elsewhere.

Every subtree gets a *structure id* by hash-consing (a dict from ``(type, parameters,
(child names, child ids)...)`` to an integer), so deciding that two siblings are identical
is one integer comparison and the work is linear in the number of modules. Parameters are
only asked for their shape and ``requires_grad``, so models on the ``meta`` device work.

:mod:`opendelta.tools.visualization` draws these nodes with :mod:`rich`; the interactive
module picker (:mod:`opendelta.tools.interactive`) serves them to a browser.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..core.layers import DeltaLayer

FROZEN, TRAINABLE, DELTA = "frozen", "trainable", "delta"


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as shown in the tree: ``weight:[768, 768]`` and its state."""

    name: str
    shape: Tuple[int, ...]
    #: ``"frozen"``, ``"trainable"`` or ``"delta"`` (inside a delta layer, trainable or not).
    state: str

    @property
    def label(self) -> str:
        return f"{self.name}:{list(self.shape)}"


@dataclass(eq=False)
class StructureNode:
    """A node of the folded tree: one module, or several identical sibling modules.

    Attributes:
        names: the child names this node stands for, in model order: ``["0", ..., "11"]``
            for a folded block, ``["query", "key", "value"]`` for merged siblings. Inside
            the common-structure view a name may contain dots.
        type_name: class name of the module(s); ``None`` for a virtual node (a level of
            the common structure that no module has).
        params: the module's own parameters (not its children's).
        children: child nodes, already folded.
        common: ``False`` for modules outside the common structure (drawn grey).
        structure_id: equal for two nodes exactly when their subtrees are identical
            (types, parameters and their states, child names), whatever their own names.
    """

    names: List[str]
    type_name: Optional[str]
    params: List[ParamInfo] = field(default_factory=list)
    children: List["StructureNode"] = field(default_factory=list)
    common: bool = True
    structure_id: int = -1

    @property
    def display_name(self) -> str:
        """``names`` compacted: consecutive integers become ranges (``0-11``)."""
        return compact_names(self.names)

    @property
    def num_parameters(self) -> int:
        """Parameters (elements) of one module of this node, children included."""
        own = 0
        for p in self.params:
            n = 1
            for d in p.shape:
                n *= d
            own += n
        return own + sum(len(c.names) * c.num_parameters for c in self.children)


def _is_index(name: str) -> bool:
    return name.isascii() and name.isdigit()


def compact_names(names: Sequence[str]) -> str:
    """``["0", "1", "2", "5", "q"]`` -> ``"0-2,5,q"``: runs of consecutive integers as ranges."""
    out: List[str] = []
    i = 0
    while i < len(names):
        name = names[i]
        if _is_index(name):
            j = i
            while j + 1 < len(names) and _is_index(names[j + 1]) and int(names[j + 1]) == int(names[j]) + 1:
                j += 1
            out.append(name if j == i else f"{name}-{names[j]}")
            i = j + 1
        else:
            out.append(name)
            i += 1
    return ",".join(out)


# ----------------------------------------------------------------------------- building
class _Interner:
    """Hash-consing of subtree structures into small integers."""

    def __init__(self) -> None:
        self._ids: Dict[Tuple[Any, ...], int] = {}

    def __call__(self, node: StructureNode) -> int:
        key = (node.type_name, node.common, tuple(node.params),
               tuple((tuple(c.names), c.structure_id) for c in node.children))
        node.structure_id = self._ids.setdefault(key, len(self._ids))
        return node.structure_id


def fold(node: StructureNode, intern: Optional[_Interner] = None) -> StructureNode:
    """Fold ``node``'s subtree in place, bottom-up: siblings with identical structure become
    one node listing all their names (first occurrence keeps its place)."""
    intern = intern or _Interner()
    groups: Dict[int, StructureNode] = {}
    for child in node.children:
        fold(child, intern)
        first = groups.get(child.structure_id)
        if first is None:
            groups[child.structure_id] = child
        else:
            first.names.extend(child.names)
    node.children = list(groups.values())
    intern(node)
    return node


def param_state(param: nn.Parameter, in_delta: bool) -> str:
    """``"delta"`` inside a delta layer, else ``"trainable"`` or ``"frozen"``."""
    if in_delta:
        return DELTA
    return TRAINABLE if param.requires_grad else FROZEN


def own_params(module: nn.Module, in_delta: bool) -> List[ParamInfo]:
    """The :class:`ParamInfo` of ``module``'s own parameters (not its children's)."""
    return [ParamInfo(n, tuple(p.shape), param_state(p, in_delta))
            for n, p in module._parameters.items() if p is not None]


def raw_tree(module: nn.Module, name: str, in_delta: bool, keep_non_params: bool,
             skip_deltas: bool) -> Optional[StructureNode]:
    """The unfolded tree of ``module`` (``None`` if pruned for holding no parameter)."""
    params = own_params(module, in_delta)
    children = []
    for child_name, child in module._modules.items():
        if child is None:
            continue
        is_delta = isinstance(child, DeltaLayer)
        if is_delta and skip_deltas:
            continue
        node = raw_tree(child, child_name, in_delta or is_delta, keep_non_params, skip_deltas)
        if node is not None:
            children.append(node)
    if not params and not children and not keep_non_params:
        return None
    return StructureNode([name], type(module).__name__, params, children)


def build_structure(model: nn.Module, rootname: str = "root", keep_non_params: bool = False,
                    skip_deltas: bool = False) -> StructureNode:
    """The folded structure of ``model`` under its own module names.

    Args:
        model: any module (on any device, ``meta`` included).
        rootname: name of the root node.
        keep_non_params: keep modules without parameters (dropout, activations).
        skip_deltas: leave delta layers (and what is inside them) out.
    """
    root = raw_tree(model, rootname, isinstance(model, DeltaLayer), keep_non_params, skip_deltas)
    if root is None:  # a model without any parameter still shows its root
        root = StructureNode([rootname], type(model).__name__)
    return fold(root)


__all__ = ["ParamInfo", "StructureNode", "build_structure", "compact_names", "fold", "own_params",
           "param_state", "raw_tree", "FROZEN", "TRAINABLE", "DELTA"]
