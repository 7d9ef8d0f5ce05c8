"""Snapshots of everything a failed call must leave unchanged, for the robustness, transaction
and property tests: a model's parameters, buffers, ``requires_grad`` flags, hooks,
``state_dict`` keys and module tree; a delta's attached/merged state and layers; the files
of a checkpoint directory (and the hidden siblings of its parent)."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn


def model_state(model: nn.Module) -> Dict[str, Any]:
    """What a failed call must not change in ``model`` (compare with :func:`assert_same`)."""
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._state_dict_hooks),
                      len(m._load_state_dict_post_hooks)) for n, m in model.named_modules()},
        "state_dict_keys": list(model.state_dict().keys()),
        "tree": [(n, type(m).__name__) for n, m in model.named_modules(remove_duplicate=False)],
    }


def delta_state(delta: Any) -> Dict[str, Any]:
    """What a failed call must not change in a delta model."""
    return {
        "attached": delta.is_attached,
        "merged": [bool(getattr(e.layer, "merged", False)) for e in delta.layer_entries()],
        "layers": [(e.host_name, e.child_name, id(e.layer)) for e in delta.layer_entries()],
        "parameters": {n: p.detach().clone() for n, p in delta.named_parameters()},
    }


def directory_state(path: "os.PathLike[str] | str") -> Dict[str, Any]:
    """Every file under ``path`` (relative name -> bytes) and the entries of its parent."""
    path = os.fspath(path)
    files: Dict[str, bytes] = {}
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for name in names:
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, path)] = f.read()
    parent = os.path.dirname(os.path.abspath(path))
    return {"files": files, "parent": sorted(os.listdir(parent)) if os.path.isdir(parent) else []}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            (a.device.type == "meta" or torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def differences(before: Dict[str, Any], after: Dict[str, Any]) -> list:
    """The top-level keys (and, for dicts of tensors, the entries) that differ."""
    out = []
    for key in before:
        if _same(before[key], after.get(key)):
            continue
        if isinstance(before[key], dict) and isinstance(after.get(key), dict):
            keys = set(before[key]) | set(after[key])
            changed = sorted(k for k in keys if not _same(before[key].get(k), after[key].get(k)))
            out.append((key, changed[:5]))
        else:
            out.append(key)
    return out


def assert_same(before: Dict[str, Any], after: Dict[str, Any], what: Optional[str] = None) -> None:
    """Assert that two snapshots are equal, bit for bit; the message lists what changed."""
    changed = differences(before, after)
    assert not changed, f"{what or 'state'} changed: {changed}"
