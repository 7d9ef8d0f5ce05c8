"""The tensors of a delta checkpoint: which they are, their canonical names, and loading
them strictly.

Parameter names are those inside the backbone (``bert.encoder.layer.0.attention.self.query
.lora.lora_A``) with the method's canonical child name (``lora``), even when this delta
lives under ``lora_1`` because the module already hosted another LoRA: a checkpoint loads
onto any fresh copy of the backbone. Uses only the delta model's declared interface
(``layer_entries()``, ``layer_attr``, ``backbone_model``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
from torch import nn

from ..core.extension import delta_state_tensors
from ..core.merging import merged_backbone_tensors, refresh_merged
from .files import CheckpointError, _short_list
from .hashing import backbone_parameters

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase


def canonical_prefixes(delta: "DeltaBase") -> Dict[str, str]:
    """Actual child prefix -> canonical prefix of every layer of ``delta``."""
    out = {}
    canonical_child = type(delta).layer_name
    for host_name, child_name, _ in delta.layer_entries():
        actual = f"{host_name}.{child_name}" if host_name else child_name
        child = canonical_child if child_name == delta.layer_attr else child_name
        out[actual] = f"{host_name}.{child}" if host_name else child
    return out


def rename_prefix(key: str, prefixes: Dict[str, str]) -> str:
    for actual, canonical in prefixes.items():
        if key.startswith(actual + "."):
            return canonical + key[len(actual):]
    return key


def delta_tensors(delta: "DeltaBase") -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``delta``, under canonical names."""
    prefixes = canonical_prefixes(delta)
    out: Dict[str, torch.Tensor] = {}
    for layer_prefix, layer in delta.delta_layers():
        canonical = prefixes.get(layer_prefix, layer_prefix)
        for name, tensor in delta_state_tensors(layer).items():
            out.setdefault(f"{canonical}.{name}", tensor)
    return out


def trainable_backbone_tensors(delta: "DeltaBase") -> Dict[str, torch.Tensor]:
    """Backbone (non-delta) parameters left trainable, if the backbone was frozen at all.

    With nothing frozen (``freeze_module`` never called) the backbone is not saved: a
    delta checkpoint never turns into a copy of the whole model.
    """
    params = list(backbone_parameters(delta.backbone_model))
    if all(p.requires_grad for _, p in params):
        return {}
    return {name: p for name, p in params if p.requires_grad}


def load_delta_tensors(delta: "DeltaBase", state_dict: Dict[str, torch.Tensor], strict: bool = True,
                   source: str = "state_dict", allow_missing_buffers: bool = False) -> None:
    """Copy ``state_dict`` (canonical delta names and backbone parameter names) into this
    delta and the backbone. Everything is checked before anything is written.

    Raises:
        CheckpointError: (strict) missing delta tensors or unexpected keys; wrong shapes
            (always). The message names ``source`` and the keys.
    """
    targets = delta_tensors(delta)
    backbone = delta.backbone_model
    backbone_params = dict(backbone.named_parameters())
    persistent_buffers = {k for k, v in targets.items() if not isinstance(v, nn.Parameter)}

    plan: List[Tuple[str, torch.Tensor, torch.Tensor]] = []
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        target = targets.get(key)
        if target is None:
            target = backbone_params.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        plan.append((key, target, value))
    missing = [k for k in targets if k not in state_dict
               and not (allow_missing_buffers and k in persistent_buffers)]
    on_meta = [key for key, target, _ in plan if target.device.type == "meta"]
    problems = []
    if on_meta:
        problems.append(f"{_short_list(on_meta)} are on the meta device and cannot hold values "
                        "(materialise the backbone first, e.g. with to_empty() and its weights)")
    if mismatched:
        problems.append(f"shape mismatch for {_short_list(mismatched)}")
    if strict and missing:
        problems.append(f"missing delta tensors {_short_list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys (neither this {delta.delta_type} delta's nor backbone "
                        f"parameters) {_short_list(unexpected)}")
    merged = merged_backbone_tensors(backbone)
    into_merged = [key for key, target, _ in plan if id(target) in merged]
    if into_merged:
        problems.append(f"{_short_list(into_merged)} hold merged delta updates (modules "
                        f"{_short_list(sorted({merged[id(t)] for _, t, _ in plan if id(t) in merged}))}); "
                        "unmerge the deltas merged there before loading backbone parameters into them")
    if problems:
        raise CheckpointError(f"{source} does not fit this {type(delta).__name__} on "
                              f"{type(backbone).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for _, target, value in plan:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    # A merged delta follows its loaded values (see opendelta.core.merging).
    refresh_merged(delta)
