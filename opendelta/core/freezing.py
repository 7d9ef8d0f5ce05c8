"""Freezing: which parameters train, and a ``state_dict`` that holds only those.

``freeze_module`` decides every parameter's ``requires_grad`` first and changes nothing
until every key of ``exclude`` is known to match: a failed call leaves the model as it was.
The trainable-only ``state_dict`` is a state-dict post-hook evaluated at call time from
``requires_grad``, so it stays right whatever is unfrozen later and whatever wraps the
module (``nn.Sequential``, DDP's ``module.`` prefix).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from .addressing import closest_names, endswith_in
from .dispatch import is_delta_parameter_name
from .targets import check_keys

_STATE_DICT_HANDLE = "_opendelta_state_dict_handle"
#: the key of ``exclude`` / ``unfrozen_modules`` standing for every delta parameter.
DELTAS = "deltas"


def _keep_trainable_only(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                         local_metadata: Any) -> None:
    """State-dict post-hook: drop every entry of ``module`` that is not a trainable parameter."""
    trainable = {prefix + name for name, p in module.named_parameters(remove_duplicate=False)
                 if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
        del state_dict[key]


def set_trainable_state_dict(module: nn.Module, enabled: bool = True) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters (or undo it)."""
    handle = module.__dict__.pop(_STATE_DICT_HANDLE, None)
    if handle is not None:
        handle.remove()
    if enabled:
        module.__dict__[_STATE_DICT_HANDLE] = module.register_state_dict_post_hook(_keep_trainable_only)


def has_trainable_state_dict(module: nn.Module) -> bool:
    return _STATE_DICT_HANDLE in module.__dict__


def exclusion_matches(param_name: str, keys: Sequence[str], mapping: Any) -> List[str]:
    """The keys of ``keys`` naming a module (or the parameter itself) that holds
    ``param_name``; with ``mapping``, common-structure names of the modules count too."""
    parts = param_name.split(".")
    out = []
    for key in keys:
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if endswith_in(prefix, [key]):
                out.append(key)
                break
            common = mapping.transform(prefix) if mapping is not None and i < len(parts) else None
            if common and endswith_in(common, [key]):
                out.append(key)
                break
    return out


def normalise_exclude(exclude: Any, field: str = "exclude") -> List[str]:
    """``exclude`` as a list of keys: a bare string is one key."""
    if isinstance(exclude, str):
        return [exclude]
    return check_keys(list(exclude), field)


def freeze(module: nn.Module, exclude: Sequence[str], mapping: Any = None,
           set_state_dict: bool = True) -> None:
    """Freeze every parameter of ``module`` except delta parameters (when ``"deltas"`` is in
    ``exclude``) and those below the modules named by the other keys.

    Raises:
        ValueError: a key (other than ``"deltas"``) matches no module or parameter; nothing
            was changed.
    """
    exclude = normalise_exclude(exclude)
    keep_deltas = DELTAS in exclude
    keys = [k for k in exclude if k != DELTAS]
    hits = {k: 0 for k in keys}
    plan = []
    for name, param in module.named_parameters():
        if is_delta_parameter_name(module, name):
            plan.append((param, keep_deltas))
            continue
        matched = exclusion_matches(name, keys, mapping)
        for k in matched:
            hits[k] += 1
        plan.append((param, bool(matched)))
    missing = [k for k, n in hits.items() if n == 0]
    if missing:
        names = [n for n, _ in module.named_modules() if n]
        hint = {k: closest_names(k, names) for k in missing}
        raise ValueError(f"freeze_module exclude entries {missing} match no module or parameter "
                         f"(nothing was frozen); closest names: {hint}")
    for param, trainable in plan:
        param.requires_grad_(trainable)
    set_trainable_state_dict(module, set_state_dict)


def covering_modules(unfrozen: Optional[Sequence[str]], param_names: Sequence[str]) -> List[str]:
    """``unfrozen`` (default ``["deltas"]``) extended with the module of each parameter of
    ``param_names`` that no key of it covers yet."""
    out = list(unfrozen or [DELTAS])
    for param_name in param_names:
        keys = [k for k in out if k != DELTAS]
        if not exclusion_matches(param_name, keys, None):
            out.append(param_name.rpartition(".")[0] or param_name)
    return out
