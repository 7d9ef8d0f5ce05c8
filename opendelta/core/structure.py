"""Translate between a backbone's own module names and the common structure names."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from torch import nn

from .structure_maps import COMMON_STRUCTURES, StructureMap


def model_type_of(model: nn.Module) -> Optional[str]:
    """``config.model_type`` of a transformers model (``None`` for a plain module)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _compile(original: str) -> "re.Pattern[str]":
    body = re.escape(original).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(r"(?:.*\.)?" + body)


class CommonStructureMap:
    """Maps module names of a supported architecture to OpenDelta's common names.

    ``CommonStructureMap(bert).transform("bert.encoder.layer.0.attention.self.query")``
    returns ``"encoder.block.0.attn.q"``; names without a common counterpart give ``None``.

    Raises:
        KeyError: the backbone's architecture has no map; the message lists those that do.
    """

    def __init__(self, backbone_model: nn.Module | str, mapping: Optional[StructureMap] = None):
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
        self._rules: List[Tuple["re.Pattern[str]", str]] = [(_compile(o), c) for o, c in mapping.items()]
        self._cache: Dict[str, Optional[str]] = {}

    @classmethod
    def load(cls, backbone_model: nn.Module) -> Optional["CommonStructureMap"]:
        """The map of ``backbone_model``'s architecture, or ``None`` if there is none."""
        try:
            return cls(backbone_model)
        except KeyError:
            return None

    def transform(self, name: str, strict: bool = False) -> Optional[str]:
        """The common name of the module called ``name`` in the backbone.

        Args:
            name: full dotted module name, e.g. ``"model.layers.3.self_attn.q_proj"``.
            strict: raise ``KeyError`` instead of returning ``None`` for unmapped names.
        """
        if name not in self._cache:
            self._cache[name] = self._transform(name)
        common = self._cache[name]
        if common is None and strict:
            raise KeyError(f"module {name!r} has no common structure name")
        return common

    def _transform(self, name: str) -> Optional[str]:
        for pattern, common in self._rules:
            match = pattern.fullmatch(name)
            if match:
                return common.replace("{i}", match.group("i")) if "{i}" in common else common
        return None
