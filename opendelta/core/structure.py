"""Translate between a backbone's own module names and the common structure names.

Besides the modules listed in :mod:`opendelta.core.structure_maps`, the containers of the
layer stacks get their common names too, derived from the maps (never listed by hand):
``encoder.layer.{i}`` -> ``encoder.block.{i}`` implies ``bert.encoder`` -> ``encoder`` and
``bert.encoder.layer`` -> ``encoder.block``, as in the OpenDelta manual; GPT-2's
``h.{i}`` -> ``decoder.block.{i}`` implies ``transformer.h`` -> ``decoder.block``.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

from torch import nn

from .structure_maps import COMMON_STRUCTURES, StructureMap

#: ``(index, compiled pattern, common name)``: the index keeps the map's priority order.
_Rule = Tuple[int, "re.Pattern[str]", str]
_INDEX = "{i}"


def model_type_of(model: nn.Module) -> Optional[str]:
    """``config.model_type`` of a transformers model (``None`` for a plain module)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _compile(original: str) -> "re.Pattern[str]":
    body = re.escape(original).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(r"(?:.*\.)?" + body)


def container_names(mapping: StructureMap) -> StructureMap:
    """Common names of the modules that hold the layer stacks, derived from ``mapping``.

    For a rule ``A.{i}...`` -> ``C.{i}...`` the stack container ``A`` is called ``C``, and
    the prefixes of ``A`` get the prefixes of ``C`` aligned from the end (``encoder.layer``
    -> ``encoder.block`` gives ``encoder`` -> ``encoder``; ``h`` -> ``decoder.block`` gives
    nothing more). Names the map lists itself, and names that would get two different
    common names, are left out.
    """
    derived: Dict[str, Optional[str]] = {}
    for original, common in mapping.items():
        if _INDEX not in original or _INDEX not in common:
            continue
        stack = original.split("." + _INDEX)[0].split(".")
        target = common.split("." + _INDEX)[0].split(".")
        if not stack[0] or not target[0]:
            continue
        pairs = [(".".join(stack), ".".join(target))]
        for cut in range(1, min(len(stack), len(target))):
            pairs.append((".".join(stack[:-cut]), ".".join(target[:-cut])))
        for name, value in pairs:
            if name in mapping:
                continue
            if derived.get(name, value) != value:
                derived[name] = None  # ambiguous: two rules disagree
            else:
                derived[name] = value
    return {name: value for name, value in derived.items() if value is not None}


class CommonStructureMap:
    """Maps module names of a supported architecture to OpenDelta's common names.

    ``CommonStructureMap(bert).transform("bert.encoder.layer.0.attention.self.query")``
    returns ``"encoder.block.0.attn.q"``, ``transform("bert.encoder.layer")`` returns
    ``"encoder.block"``; names without a common counterpart give ``None``.

    Raises:
        KeyError: the backbone's architecture has no map; the message lists those that do.
    """

    def __init__(self, backbone_model: nn.Module | str, mapping: Optional[StructureMap] = None):
        self.model_type: Optional[str]
        if mapping is None:
            model_type = backbone_model if isinstance(backbone_model, str) else model_type_of(backbone_model)
            if model_type not in COMMON_STRUCTURES:
                name = model_type or type(backbone_model).__name__
                raise KeyError(
                    f"no common structure map for architecture {name!r}; supported: "
                    f"{', '.join(sorted(COMMON_STRUCTURES))}. Pass modified_modules with the "
                    f"model's own module names instead.")
            mapping = COMMON_STRUCTURES[model_type]
            self.model_type = model_type
        else:
            self.model_type = None
        self.mapping = mapping
        rules = {**mapping, **container_names(mapping)}
        # Rules bucketed by the last segment they can match (a literal, or any index), so
        # that a name is tried against a handful of patterns, not the whole map.
        self._by_last: Dict[str, List[_Rule]] = {}
        self._by_index: List[_Rule] = []
        self._anywhere: List[_Rule] = []  # last segment partly an index, e.g. "layer_{i}"
        for index, (original, common) in enumerate(rules.items()):
            rule = (index, _compile(original), common)
            last = original.rsplit(".", 1)[-1]
            if last == _INDEX:
                self._by_index.append(rule)
            elif _INDEX in last:
                self._anywhere.append(rule)
            else:
                self._by_last.setdefault(last, []).append(rule)
        self._cache: Dict[str, Optional[str]] = {}

    @classmethod
    def load(cls, backbone_model: nn.Module) -> Optional["CommonStructureMap"]:
        """The map of ``backbone_model``'s architecture, or ``None`` if there is none."""
        try:
            return cls(backbone_model)
        except KeyError:
            return None

    def transform(self, org_key: str, strict: bool = False, warning: bool = False) -> Optional[str]:
        """The common name of the module called ``org_key`` in the backbone.

        Args:
            org_key: full dotted module name, e.g. ``"model.layers.3.self_attn.q_proj"``.
            strict: raise ``KeyError`` instead of returning ``None`` for unmapped names.
            warning: warn (``UserWarning``) when ``org_key`` has no common name.
        """
        try:
            common = self._cache[org_key]
        except KeyError:
            common = self._cache[org_key] = self._transform(org_key)
        if common is None:
            if strict:
                raise KeyError(f"module {org_key!r} has no common structure name")
            if warning:
                warnings.warn(f"module {org_key!r} has no common structure name", stacklevel=2)
        return common

    def _transform(self, name: str) -> Optional[str]:
        last = name.rsplit(".", 1)[-1]
        rules = self._by_last.get(last, [])
        extra = (self._by_index if last.isdigit() else []) + self._anywhere
        if extra:
            rules = sorted(rules + extra, key=lambda rule: rule[0])
        for _, pattern, common in rules:
            match = pattern.fullmatch(name)
            if match:
                return common.replace(_INDEX, match.group("i")) if _INDEX in common else common
        return None


class TowerStructureMap:
    """Common names for a model that is not itself a known architecture but holds known
    backbones (*towers*): a user's two-tower retriever ``Mymodel(a=bert, b=gpt2)``.

    Each tower's modules get its own map's common names under the tower's path:
    ``transform("a.encoder.layer.0.attention.self.query")`` is
    ``"a.encoder.block.0.attn.q"``, so common keys (``attn.q``) reach every tower and a
    tower's path restricts them to it.

    Args:
        towers: tower path -> its :class:`CommonStructureMap`.
    """

    def __init__(self, towers: Dict[str, CommonStructureMap]):
        if not towers:
            raise ValueError("TowerStructureMap needs at least one tower")
        # Longest path first, so nested paths resolve to the innermost tower.
        self.towers = dict(sorted(towers.items(), key=lambda kv: -len(kv[0])))
        self._cache: Dict[str, Optional[str]] = {}

    @property
    def model_types(self) -> Dict[str, Optional[str]]:
        """Tower path -> ``model_type`` of its architecture."""
        return {path: mapping.model_type for path, mapping in self.towers.items()}

    def tower_of(self, name: str) -> Optional[str]:
        """The path of the tower holding the module ``name`` (``None``: outside every tower)."""
        return next((p for p in self.towers if name == p or name.startswith(p + ".")), None)

    def transform(self, org_key: str, strict: bool = False, warning: bool = False) -> Optional[str]:
        """The common name of module ``org_key``, prefixed with its tower's path."""
        if org_key not in self._cache:
            tower = self.tower_of(org_key)
            common = None
            if tower is not None and org_key != tower:
                inner = self.towers[tower].transform(org_key[len(tower) + 1:])
                common = f"{tower}.{inner}" if inner else None
            self._cache[org_key] = common
        common = self._cache[org_key]
        if common is None and strict:
            raise KeyError(f"module {org_key!r} has no common structure name")
        if common is None and warning:
            warnings.warn(f"module {org_key!r} has no common structure name", stacklevel=2)
        return common


def find_towers(model: nn.Module, skip: Tuple[type, ...] = ()) -> Dict[str, CommonStructureMap]:
    """The outermost submodules of ``model`` whose ``config.model_type`` has a map, by path
    (modules of the types in ``skip``, e.g. delta layers, are not searched)."""
    towers: Dict[str, CommonStructureMap] = {}
    stack: List[Tuple[str, nn.Module]] = [(n, c) for n, c in model._modules.items() if c is not None]
    while stack:
        name, module = stack.pop()
        if skip and isinstance(module, skip):
            continue
        if model_type_of(module) in COMMON_STRUCTURES:
            towers[name] = CommonStructureMap(module)
            continue
        stack.extend((f"{name}.{n}", c) for n, c in module._modules.items() if c is not None)
    return towers


def structure_map_for(model: nn.Module, skip: Tuple[type, ...] = ()):
    """The common-structure map of ``model``: its architecture's
    :class:`CommonStructureMap`, a :class:`TowerStructureMap` over the known backbones it
    holds, or ``None``."""
    if model_type_of(model) in COMMON_STRUCTURES:
        return CommonStructureMap(model)
    towers = find_towers(model, skip)
    return TowerStructureMap(towers) if towers else None
