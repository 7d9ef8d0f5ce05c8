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

The folded structure is built by :mod:`opendelta.tools.structure_tree` (plain Python,
linear in the number of modules, ``meta`` models included) and, for the common-structure
view, :mod:`opendelta.tools.common_tree`; this module only draws it with :mod:`rich`.
"""
from __future__ import annotations

import io
from typing import Any, Optional

from torch import nn

from .common_tree import CommonTreeBuilder, as_mapping
from .structure_tree import (DELTA, FROZEN, TRAINABLE, ParamInfo, StructureNode, build_structure,
                             compact_names, fold)


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
            builder = CommonTreeBuilder(self.plm, as_mapping(self.plm, mapping), keep_non_params, only_common)
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

    def build_common_tree(self, module: nn.Module, mapping: Any, tree: Any = None, query: str = "",
                          key_to_root: str = "", keep_non_params: bool = False,
                          only_common: bool = False) -> Any:
        """Draw ``module`` under common-structure names (``encoder.block.0.attn.q``) into
        ``tree``.

        Modules outside the common structure are drawn grey (left out with
        ``only_common``); levels of the common structure that no module has are virtual
        nodes. ``structure_graph(common_structure=True)`` draws the whole model this way.

        Args:
            module: the backbone, or one of its submodules.
            mapping: a :class:`~opendelta.core.structure.CommonStructureMap`, a dict
                ``{module name with {i}: common name}``, or ``None`` for the map of the
                visualized model's architecture.
            tree: a ``ModuleTree`` (e.g. from :meth:`structure_graph`) to add the drawn
                nodes to; default a new tree whose root is named after ``module``'s class.
            query, key_to_root: where ``module`` sits in the visualized model, as pieces of
                its dotted name (``key_to_root="bert.encoder", query="layer.0"``): its
                submodules are named as in the whole model. Default: ``module`` is the
                model itself.
            keep_non_params: also show modules without parameters.
            only_common: leave out modules outside the common structure.

        Returns:
            ``tree`` with the nodes added (or the new tree). The structure drawn is kept as
            ``self.structure``.

        Raises:
            KeyError: ``mapping`` is ``None`` and the model's architecture has no map.
        """
        prefix = ".".join(p for p in (key_to_root.strip("."), query.strip(".")) if p)
        builder = CommonTreeBuilder(module, as_mapping(self.plm, mapping), keep_non_params, only_common,
                                    prefix=prefix)
        self.structure = builder.build(type(module).__name__ if tree is None else
                                       getattr(tree, "module_name", None) or "root")
        drawn = self.draw(self.structure)
        if tree is None:
            self.root_tree = drawn
            return drawn
        tree.children.extend(drawn.children)
        return tree

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
