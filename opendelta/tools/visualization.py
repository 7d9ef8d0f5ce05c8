"""Draw a big model as a compact tree: repeated blocks folded, parameters and their state.

``Visualization(model).structure_graph()`` prints (and returns) a :mod:`rich` tree such as::

    root
    └── bert (BertModel)
        ├── embeddings (BertEmbeddings)
        │   ├── word_embeddings (Embedding) weight:[30522, 768]
        │   ...
        └── encoder (BertEncoder)
            └── layer (ModuleList)
                └── 0-11 (BertLayer)
                    ├── attention (BertAttention)
                    │   ├── self (BertSelfAttention)
                    │   │   └── query,key,value (Linear) weight:[768, 768] bias:[768]
                    ...

How it stays fast on 7B-sized models: every subtree gets a *structure id* by hash-consing
(a dict from ``(type, parameters, (child names, child ids)...)`` to an integer), so
deciding that two siblings are identical is one integer comparison, and the work is linear
in the number of modules. Parameters are only asked for their shape and ``requires_grad``,
so models on the ``meta`` device work.

The folded structure itself (:class:`StructureNode`) is plain Python; :mod:`rich` is used
only to draw it, and the interactive module picker
(:mod:`opendelta.tools.interactive`) serves the same structure to a browser.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

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


def _param_state(param: nn.Parameter, in_delta: bool) -> str:
    if in_delta:
        return DELTA
    return TRAINABLE if param.requires_grad else FROZEN


def _raw_tree(module: nn.Module, name: str, in_delta: bool, keep_non_params: bool,
              skip_deltas: bool) -> Optional[StructureNode]:
    """The unfolded tree of ``module`` (``None`` if pruned for holding no parameter)."""
    params = [ParamInfo(n, tuple(p.shape), _param_state(p, in_delta))
              for n, p in module._parameters.items() if p is not None]
    children = []
    for child_name, child in module._modules.items():
        if child is None:
            continue
        is_delta = isinstance(child, DeltaLayer)
        if is_delta and skip_deltas:
            continue
        node = _raw_tree(child, child_name, in_delta or is_delta, keep_non_params, skip_deltas)
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
    root = _raw_tree(model, rootname, isinstance(model, DeltaLayer), keep_non_params, skip_deltas)
    if root is None:  # a model without any parameter still shows its root
        root = StructureNode([rootname], type(model).__name__)
    return fold(root)


# ------------------------------------------------------------------ common-structure view
class _CommonBuilder:
    """Rebuilds the tree under common-structure names (``encoder.block.0.attn.q``).

    A module with a common name hangs under the node of its closest ancestor that has one,
    named relative to it (levels no module has become virtual nodes). A module without a
    common name is transparent when something below it has one; otherwise it is shown grey
    under its own name relative to that ancestor (or left out with ``only_common``).
    """

    def __init__(self, model: nn.Module, mapping: Any, keep_non_params: bool, only_common: bool):
        self.model = model
        self.mapping = mapping
        self.keep_non_params = keep_non_params
        self.only_common = only_common
        self._common_below: Dict[str, bool] = {}

    def common_name(self, full_name: str) -> Optional[str]:
        return self.mapping.transform(full_name) if full_name else None

    def build(self, rootname: str) -> StructureNode:
        root = StructureNode([rootname], type(self.model).__name__,
                             [ParamInfo(n, tuple(p.shape), _param_state(p, False))
                              for n, p in self.model._parameters.items() if p is not None])
        self._place_children(self.model, "", False, root, "", "")
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
            anchor.params.extend(ParamInfo(n, tuple(p.shape), _param_state(p, in_delta))
                                 for n, p in module._parameters.items() if p is not None)
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
            node.params.extend(ParamInfo(n, tuple(p.shape), _param_state(p, in_delta))
                               for n, p in module._parameters.items() if p is not None)
            self._place_children(module, full_name, in_delta, node, common, full_name)
            return
        if not in_delta and self._has_common_below(module, full_name):
            own = [ParamInfo(n, tuple(p.shape), _param_state(p, in_delta))
                   for n, p in module._parameters.items() if p is not None]
            if own and not self.only_common:
                anchor.children.append(StructureNode([self._relative(full_name, anchor_full)],
                                                     type(module).__name__, own, common=False))
            self._place_children(module, full_name, in_delta, anchor, anchor_common, anchor_full)
            return
        if self.only_common:
            return
        node = _raw_tree(module, self._relative(full_name, anchor_full), in_delta,
                         self.keep_non_params, skip_deltas=False)
        if node is not None:
            _mark_not_common(node)
            anchor.children.append(node)

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


def _mark_not_common(node: StructureNode) -> None:
    node.common = False
    for child in node.children:
        _mark_not_common(child)


def _as_mapping(model: nn.Module, mapping: Any) -> Any:
    """A :class:`CommonStructureMap` from ``None`` (the model's own), a map or a dict."""
    from ..core.structure import CommonStructureMap

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


# --------------------------------------------------------------------------------- drawing
def _module_tree_class() -> type:
    """``ModuleTree``, a :class:`rich.tree.Tree` subclass, created on first use so that this
    module (used by the interactive picker too) does not need rich to be imported."""
    global _MODULE_TREE
    if _MODULE_TREE is None:
        from rich.tree import Tree

        class ModuleTree(Tree):
            """A rich tree node that remembers the :class:`StructureNode` it draws.

            ``module_name`` is the displayed name (``"0-11"``, ``"query,key,value"``),
            ``info`` the class name, ``node`` the structure; parameter lines (with
            ``expand_params``) have ``is_param_node`` set and ``node`` ``None``.
            """

            def __init__(self, label: Any, node: Optional[StructureNode] = None, **kwargs: Any):
                super().__init__(label, **kwargs)
                self.node = node
                self.module_name = node.display_name if node is not None else None
                self.info = node.type_name if node is not None else None
                self.is_param_node = node is None

        ModuleTree.__module__ = __name__
        ModuleTree.__qualname__ = "ModuleTree"
        _MODULE_TREE = ModuleTree
    return _MODULE_TREE


_MODULE_TREE: Optional[type] = None


def __getattr__(name: str) -> Any:
    if name == "ModuleTree":
        return _module_tree_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Visualization:
    """Draws the structure of a (big) model: folded repeated blocks, merged identical
    siblings, parameter shapes and whether they are frozen, trainable or delta parameters.

    Args:
        plm: any ``torch.nn.Module``; a delta-modified model shows its delta layers.

    Colours are attributes, change them on the instance: ``trainable_color`` (default
    cyan), ``frozen_color`` (grey50), ``delta_color`` (magenta, parameters inside delta
    layers), ``type_color`` (green), ``duplicate_color`` (red, names of folded/merged
    nodes), ``not_common_color`` (bright_black, outside the common structure).
    """

    type_color = "green"
    trainable_color = "cyan"
    frozen_color = "grey50"
    delta_color = "magenta"
    duplicate_color = "red"
    name_color = "default"
    not_common_color = "bright_black"
    virtual_color = "yellow"

    def __init__(self, plm: nn.Module):
        if not isinstance(plm, nn.Module):
            raise TypeError(f"Visualization needs a torch.nn.Module, got {type(plm).__name__}")
        self.plm = plm
        self.root_tree: Any = None
        self.structure: Optional[StructureNode] = None

    def build(self, rootname: str = "root", keep_non_params: bool = False, common_structure: bool = False,
              mapping: Any = None, only_common: bool = False, skip_deltas: bool = False) -> StructureNode:
        """The folded structure (no drawing); arguments as in :meth:`structure_graph`."""
        if common_structure or only_common or mapping is not None:
            builder = _CommonBuilder(self.plm, _as_mapping(self.plm, mapping), keep_non_params, only_common)
            return builder.build(rootname)
        return build_structure(self.plm, rootname, keep_non_params, skip_deltas)

    def structure_graph(self, rootname: str = "root", expand_params: bool = False,
                        keep_non_params: bool = False, common_structure: bool = False,
                        mapping: Any = None, only_common: bool = False, printTree: bool = True) -> Any:
        """Draw the model's tree (and print it if ``printTree``).

        Args:
            rootname: label of the root node.
            expand_params: one line per parameter instead of listing them after the module.
            keep_non_params: also show modules without parameters (dropout, activations).
            common_structure: name modules by the common structure (``attn.q``, ``ff.w1``);
                modules outside it are drawn grey. Needs a supported architecture or
                ``mapping``.
            mapping: a :class:`~opendelta.core.structure.CommonStructureMap` or a
                dict ``{module name with {i}: common name}``; implies ``common_structure``.
            only_common: leave out modules outside the common structure; implies
                ``common_structure``.
            printTree: print the tree to the terminal.

        Returns:
            the root ``ModuleTree`` (a :class:`rich.tree.Tree`); also kept as
            ``self.root_tree`` for :meth:`export_svg` / :meth:`export_html`.

        Raises:
            KeyError: ``common_structure`` on an architecture without a map and no ``mapping``.
        """
        self.structure = self.build(rootname, keep_non_params, common_structure, mapping, only_common)
        self.root_tree = self.draw(self.structure, expand_params)
        if printTree:
            from rich.console import Console

            Console().print(self.root_tree)
        return self.root_tree

    # -------------------------------------------------------------------------- drawing
    def _param_style(self, state: str) -> str:
        return {FROZEN: self.frozen_color, TRAINABLE: self.trainable_color, DELTA: self.delta_color}[state]

    def label(self, node: StructureNode, expand_params: bool = False) -> Any:
        """The rich ``Text`` of one node: names, ``(Type)`` and (unless expanded) parameters."""
        from rich.text import Text

        text = Text()
        if not node.common:
            name_style = self.not_common_color
        elif len(node.names) > 1:
            name_style = self.duplicate_color
        else:
            name_style = self.name_color
        text.append(node.display_name, style=name_style)
        if node.type_name is None:
            text.append(" (virtual)", style=self.virtual_color)
        else:
            text.append(f" ({node.type_name})", style=self.not_common_color if not node.common else self.type_color)
        if not expand_params:
            for p in node.params:
                text.append(" ")
                text.append(p.label, style=self._param_style(p.state))
        return text

    def draw(self, structure: StructureNode, expand_params: bool = False) -> Any:
        """The ``ModuleTree`` drawing of a :class:`StructureNode` (the root's type is omitted)."""
        from rich.text import Text

        root_label = Text(structure.display_name)
        if not expand_params:
            for p in structure.params:
                root_label.append(" ")
                root_label.append(p.label, style=self._param_style(p.state))
        root = _module_tree_class()(root_label, structure, guide_style="tree.line")
        stack = [(root, structure)]
        while stack:
            tree, node = stack.pop()
            if expand_params:
                for p in node.params:
                    tree.children.append(_module_tree_class()(Text(p.label, style=self._param_style(p.state))))
            for child in node.children:
                sub = _module_tree_class()(self.label(child, expand_params), child, guide_style="tree.line")
                tree.children.append(sub)
                stack.append((sub, child))
        return root

    # -------------------------------------------------------------------------- export
    def _recorded(self, width: int) -> Any:
        from rich.console import Console

        if self.root_tree is None:
            self.structure_graph(printTree=False)
        console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True,
                          color_system="truecolor")
        console.print(self.root_tree)
        return console

    def export_text(self, width: int = 120) -> str:
        """The last drawn tree as plain text (drawn with defaults first if needed)."""
        return self._recorded(width).export_text()

    def export_svg(self, path: Optional[str] = None, title: str = "opendelta", width: int = 120) -> str:
        """The last drawn tree as an SVG document; written to ``path`` when given."""
        svg = self._recorded(width).export_svg(title=title)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(svg)
        return svg

    def export_html(self, path: Optional[str] = None, width: int = 120) -> str:
        """The last drawn tree as a standalone HTML page; written to ``path`` when given."""
        html = self._recorded(width).export_html(inline_styles=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(html)
        return html


__all__ = ["Visualization", "StructureNode", "ParamInfo", "build_structure", "compact_names", "fold",
           "FROZEN", "TRAINABLE", "DELTA"]
