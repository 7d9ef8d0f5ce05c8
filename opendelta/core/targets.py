"""Which modules of a backbone a delta modifies: name-based addressing over the module tree.

A key matches a module whose name (or common-structure name, see
:mod:`opendelta.core.structure`) *ends with* it on a segment boundary; ``[r]`` keys are
regular expressions matching such a tail. Exclude keys remove a module and everything
below it. Delta layers, and what is inside them, are never candidates.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from .addressing import REGEX_PREFIX, closest_names, endswith_in, is_child_key, is_regex_key, strip_regex_marker
from .inference import StructureInferenceError, infer_structure
from .layers import DeltaLayer
from .structure import model_type_of, structure_map_for
from .structure_maps import COMMON_STRUCTURES

logger = logging.getLogger(__name__)


def check_keys(keys: Sequence[str], field: str) -> List[str]:
    """``keys`` as a list of strings whose ``[r]`` patterns compile.

    Raises:
        TypeError: a bare string (``field`` must be a list) or a non-string entry.
        ValueError: an invalid regular expression; the message names the key and ``field``.
    """
    if isinstance(keys, str):
        raise TypeError(f"{field} must be a list of names, not the string {keys!r}; write [{keys!r}]")
    if not isinstance(keys, (list, tuple)):
        raise TypeError(f"{field} must be a list of module names, got {keys!r} ({type(keys).__name__})")
    out = []
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"{field} entries must be strings, got {key!r} ({type(key).__name__})")
        if is_regex_key(key):
            try:
                re.compile(strip_regex_marker(key))
            except re.error as err:
                raise ValueError(f"{field} entry {key!r} is not a valid regular expression ({err}); "
                                 "a '[r]' key is a Python regular expression matched against the "
                                 "tail of a module name") from None
        out.append(key)
    return out


def _backbone_child(child: Optional[nn.Module]) -> Optional[nn.Module]:
    """The backbone module behind a child: itself, the module a replacement stands in for,
    or ``None`` for other delta layers."""
    if isinstance(child, DeltaLayer):
        return child.__dict__.get("original") if child.replaces_child else None
    return child


def candidate_modules(backbone: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Named modules of ``backbone`` in registration order, without delta layers and what
    is inside them; a replaced module (``replace_module``) is seen as the original, under
    its own name: addressing sees the backbone as if no delta were there."""
    stack: List[Tuple[str, nn.Module]] = [("", backbone)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = []
        for n, child in module._modules.items():
            own = _backbone_child(child)
            if own is not None:
                children.append((f"{name}.{n}" if name else n, own))
        stack.extend(reversed(children))


def backbone_module(backbone: nn.Module, name: str) -> nn.Module:
    """The backbone module called ``name`` as :func:`candidate_modules` names it.

    Raises:
        ValueError: no such module.
    """
    module = backbone
    for part in filter(None, name.split(".")):
        child = _backbone_child(module._modules.get(part))
        if child is None:
            raise ValueError(f"{type(backbone).__name__} has no module {name!r}")
        module = child
    return module


def is_excluded(name: str, common: Optional[str], excludes: Sequence[str]) -> bool:
    """Whether module ``name`` (common name ``common``) lies at or below an exclude key."""
    for key in excludes:
        for candidate in (name, common):
            if candidate is None:
                continue
            if is_regex_key(key):
                if re.match(strip_regex_marker(key), candidate):
                    return True
            elif is_child_key(candidate, [key]):
                return True
    return False


def resolve(backbone: nn.Module, keys: Sequence[str], excludes: Sequence[str], mapping: Any,
            uses_defaults: bool = False, owner: str = "DeltaBase",
            skipped: Optional[List[str]] = None, optional: Sequence[str] = ()) -> List[str]:
    """Full names of the modules matched by ``keys`` and not excluded, in model order.

    Args:
        mapping: an object with ``transform(name) -> Optional[str]`` (common-structure names)
            or ``None`` (keys are plain module names).
        uses_defaults: the keys are a method's defaults: unmatched keys are skipped, but
            matching nothing at all raises.
        skipped: if given, a key that only matches excluded modules is appended to it instead
            of raising (configs of the original library carry such overlaps, which it ignored).
        optional: keys that may match nothing (defaults scoped to a tower), as long as some
            key matches.

    Raises:
        ValueError: a key matched no module (the message lists the closest names), or only
            excluded ones; the defaults matched nothing.
    """
    plain = [k for k in keys if k and not is_regex_key(k)]  # tested inline: the hot loop
    regex = [k for k in keys if is_regex_key(k)]
    hits = {key: 0 for key in keys}
    excluded_hits = {key: 0 for key in keys}
    names: List[str] = []
    targets: List[str] = []
    seen = set()
    for name, module in candidate_modules(backbone):
        if id(module) in seen:
            continue
        names.append(name)
        common = mapping.transform(name) if mapping is not None else None
        key_name = common if mapping is not None else name
        if not key_name:
            continue
        matched = [k for k in plain if key_name == k or key_name.endswith("." + k)]
        if regex:
            matched += [k for k in regex if endswith_in(key_name, [k])]
        if not matched:
            continue
        if is_excluded(name, common, excludes):
            for k in matched:
                excluded_hits[k] += 1
            continue
        for k in matched:
            hits[k] += 1
        seen.add(id(module))
        targets.append(name)
    if uses_defaults:
        if not targets:
            raise ValueError(
                f"{owner}'s default targets {list(keys)} match no module of {type(backbone).__name__} "
                f"(after excluding {list(excludes)}); pass modified_modules explicitly")
        return targets
    if optional and not targets:
        raise ValueError(f"{owner}'s default targets match no module of the towers named in modified_modules "
                         f"(after excluding {list(excludes)}); pass the module names explicitly")
    for key, count in hits.items():
        if count or key in optional:
            continue
        if excluded_hits[key]:
            if skipped is not None:
                skipped.append(key)
                continue
            raise ValueError(f"modified_modules entry {key!r} only matches excluded modules "
                             f"(exclude_modules={list(excludes)})")
        pool = [c for c in (mapping.transform(n) for n in names) if c] if mapping is not None else names
        close = closest_names(key, pool)
        hint = f"; closest module names: {close}" if close else ""
        space = "common-structure names" if mapping is not None else "module names"
        raise ValueError(f"modified_modules entry {key!r} matches no module of "
                         f"{type(backbone).__name__} ({space}){hint}")
    return targets


def free_child_name(backbone: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name that no module of the
    backbone uses for a child, parameter or attribute, so that one delta has one child name
    everywhere."""
    modules = [m for _, m in candidate_modules(backbone)]
    candidate, i = base, 0
    while any(candidate in m._modules or candidate in m._parameters or candidate in m.__dict__
              for m in modules):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def scoped_defaults(keys: Sequence[str], towers: Dict[str, str],
                    defaults: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The default keys restricted to the towers named in ``keys``, as regular expressions
    over the towers' common names (``a.encoder.block.0.attn.q``); all of them optional."""
    out = []
    for key in keys:
        prefix = re.escape(towers[key]) + r"\.(?:.+\.)?"
        for default in defaults:
            body = strip_regex_marker(default) if is_regex_key(default) else re.escape(default)
            out.append(f"{REGEX_PREFIX}{prefix}(?:{body})")
    return out, list(out)


def unknown_architecture_message(owner: str, model: nn.Module) -> str:
    """Why default targets / common names are unavailable for ``model``, and what to do."""
    searched = sum(1 for _ in candidate_modules(model))
    linears = [n for n, m in candidate_modules(model) if isinstance(m, nn.Linear)][:4]
    example = f" (e.g. {linears})" if linears else ""
    return (f"{owner}: no common structure map for architecture {type(model).__name__!r}, and none of its "
            f"{searched} modules is a known backbone (a module whose config.model_type is one of "
            f"{', '.join(sorted(COMMON_STRUCTURES))}); default targets and common-structure names need one. "
            f"Pass modified_modules with the model's own module names{example} instead.")


def required_structure_map(owner: str, backbone: nn.Module) -> Any:
    """The common-structure map of ``backbone``: its own, one over the known backbones it
    holds, or one inferred from its module types and names (logged as a table); else a
    ValueError saying what was searched, what inference missed, and how to name modules."""
    mapping = structure_map_for(backbone, skip=(DeltaLayer,))
    if mapping is not None:
        return mapping
    try:
        inferred = infer_structure(backbone)
    except StructureInferenceError as err:
        raise ValueError(f"{unknown_architecture_message(owner, backbone)} Inferring the structure from "
                         f"module types and names failed too: {err}") from None
    logger.info("%s: inferred the common structure of %s:\n%s", owner, type(backbone).__name__, inferred.summary())
    return inferred


def tower_keys(backbone: nn.Module, keys: Sequence[str]) -> Dict[str, str]:
    """Keys of ``keys`` that name a known backbone inside a model that is not one itself
    (``{"a": "a"}`` for ``Mymodel(a=bert, b=gpt2)``); empty when none does.

    Raises:
        ValueError: tower names mixed with other keys.
    """
    if model_type_of(backbone) in COMMON_STRUCTURES:
        return {}
    found = {}
    for key in keys:
        try:
            module = backbone_module(backbone, key)
        except ValueError:
            continue
        if module is not backbone and model_type_of(module) in COMMON_STRUCTURES:
            found[key] = key
    if found and len(found) != len(keys):
        raise ValueError(f"modified_modules {list(keys)} mixes tower names {sorted(found)} (each meaning "
                         "that tower's default targets) with other keys; pass only tower names, or only "
                         "module names")
    return found
