"""Parameter statistics of a model and of an optimizer: totals, trainable, delta, memory.

``DeltaBase.log`` prints them; :func:`inspect_module_statistics` and
:func:`inspect_optimizer_statistics` return them as dicts for programs and tests.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..core.dispatch import is_delta_parameter_name

#: how many parameter names a warning lists before "... and N more".
_NAMES_SHOWN = 8


def inspect_module_statistics(model: nn.Module) -> Dict[str, Any]:
    """Counts and ratios of ``model``'s parameters (shared parameters counted once).

    Returns a dict with ``total_parameters`` (all, deltas included), ``trainable_parameters``,
    ``delta_parameters`` (inside delta layers), ``backbone_parameters`` (the rest),
    ``trainable_ratio`` and ``delta_ratio`` (over *all* parameters, as OpenDelta's
    ``log()`` reports them: ``Trainable Ratio: 262144/1316020224=0.019919%``), and
    ``trainable_ratio_of_backbone`` and ``delta_ratio_of_backbone`` (over the backbone's
    own parameters). Counts are numbers of elements, not of tensors.
    """
    total = trainable = delta = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
        if is_delta_parameter_name(model, name):
            delta += n
    backbone = total - delta
    return {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "delta_parameters": delta,
        "backbone_parameters": backbone,
        "trainable_ratio": trainable / total if total else 0.0,
        "delta_ratio": delta / total if total else 0.0,
        "trainable_ratio_of_backbone": trainable / backbone if backbone else 0.0,
        "delta_ratio_of_backbone": delta / backbone if backbone else 0.0,
    }


def cuda_memory_by_device() -> Dict[str, Dict[str, float]]:
    """Memory on each CUDA device in GiB: ``{"cuda:0": {"allocated": .., "reserved": ..,
    "max_allocated": ..}}`` (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    gib = 2 ** 30
    return {f"cuda:{i}": {"allocated": torch.cuda.memory_allocated(i) / gib,
                          "reserved": torch.cuda.memory_reserved(i) / gib,
                          "max_allocated": torch.cuda.max_memory_allocated(i) / gib}
            for i in range(torch.cuda.device_count())}


def parameter_devices(model: nn.Module) -> Dict[str, int]:
    """Number of parameters (elements) of ``model`` on each device, e.g. ``{"cuda:0": 110_000}``."""
    out: Dict[str, int] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + p.numel()
    return out


def format_module_statistics(stats: Dict[str, Any], delta_ratio: bool = True,
                             trainable_ratio: bool = True) -> List[str]:
    """The lines :func:`log_model` prints for ``stats`` from :func:`inspect_module_statistics`:
    OpenDelta's ``Trainable Ratio: t/total=x%`` and ``Delta Parameter Ratio: d/total=y%``
    (both over all parameters, six decimals), then the counts."""
    total = stats["total_parameters"]
    lines = []
    if trainable_ratio:
        lines.append(f"Trainable Ratio: {stats['trainable_parameters']}/{total}="
                     f"{100 * stats['trainable_ratio']:.6f}%")
    if delta_ratio:
        lines.append(f"Delta Parameter Ratio: {stats['delta_parameters']}/{total}="
                     f"{100 * stats['delta_ratio']:.6f}%")
    lines.append(f"Total parameters: {total:,} (backbone {stats['backbone_parameters']:,} "
                 f"+ delta {stats['delta_parameters']:,})")
    return lines


def log_model(model: nn.Module, delta_ratio: bool = True, trainable_ratio: bool = True,
              visualization: bool = True, cuda_memory: bool = True) -> Dict[str, Any]:
    """Print the model tree (if ``visualization``; needs ``rich``), its parameter counts and
    ratios, and (if ``cuda_memory`` and on GPU) the memory of every CUDA device.

    Returns:
        :func:`inspect_module_statistics`'s dict, plus ``"cuda_memory"`` (GiB per device,
        see :func:`cuda_memory_by_device`) when ``cuda_memory`` is set.
    """
    if visualization:
        if importlib.util.find_spec("rich") is None:
            print("(install rich to see the model tree: pip install rich)")
        else:
            from .visualization import Visualization

            Visualization(model).structure_graph()
    stats = inspect_module_statistics(model)
    lines = format_module_statistics(stats, delta_ratio, trainable_ratio)
    if cuda_memory:
        memory = cuda_memory_by_device()
        stats["cuda_memory"] = memory
        on_device = parameter_devices(model)
        for device, gib in memory.items():
            lines.append(f"Memory on {device}: {gib['allocated']:.3f} GiB allocated, "
                         f"{gib['reserved']:.3f} GiB reserved, peak {gib['max_allocated']:.3f} GiB; "
                         f"model parameters there: {on_device.get(device, 0):,}")
    print("\n".join(lines))
    return stats


# ---------------------------------------------------------------------------- optimizer
def _shown(names: List[str]) -> str:
    more = len(names) - _NAMES_SHOWN
    return ", ".join(names[:_NAMES_SHOWN]) + (f", ... and {more} more" if more > 0 else "")


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None,
                                 verbose: bool = True) -> Dict[str, Any]:
    """What ``optimizer`` updates, over all its parameter groups, checked against ``model``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        model: the model being trained; needed to name parameters and to find trainable
            parameters missing from the optimizer.
        verbose: print a one-line summary per group and in total.

    Returns:
        a dict with ``param_groups`` (per group: ``index``, ``tensors``, ``parameters``,
        ``updated_parameters``, ``lr``, ``weight_decay``), and over all groups ``tensors``,
        ``parameters`` (elements held), ``updated_parameters`` (elements that require
        grad, i.e. that the optimizer can update), ``frozen_in_optimizer`` (names of held
        parameters with ``requires_grad=False``), ``missing_trainable`` (names of
        trainable parameters of ``model`` the optimizer does not hold; empty without
        ``model``) and ``not_in_model`` (held tensors that are not ``model``'s, 0 without it).

    Warns:
        UserWarning: frozen parameters are in the optimizer (they get no gradient, so they
            are never updated), or trainable parameters of ``model`` are missing (they get
            gradients that are never applied; typically the optimizer was built before the
            delta was added or before ``freeze_module``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    names: Dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
    groups, held, frozen = [], set(), []
    total = updated = 0
    for gi, group in enumerate(optimizer.param_groups):
        g_total = g_updated = g_tensors = 0
        for pi, p in enumerate(group["params"]):
            if id(p) in held:  # torch forbids it across groups; be safe within one
                continue
            held.add(id(p))
            g_tensors += 1
            g_total += p.numel()
            if p.requires_grad:
                g_updated += p.numel()
            else:
                frozen.append(names.get(id(p), f"param_groups[{gi}]['params'][{pi}] {list(p.shape)}"))
        groups.append({"index": gi, "tensors": g_tensors, "parameters": g_total,
                       "updated_parameters": g_updated, "lr": group.get("lr"),
                       "weight_decay": group.get("weight_decay")})
        total += g_total
        updated += g_updated
    missing = []
    not_in_model = 0
    if model is not None:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        not_in_model = sum(1 for i in held if i not in names)
    stats = {"param_groups": groups, "tensors": len(held), "parameters": total,
             "updated_parameters": updated, "frozen_in_optimizer": frozen,
             "missing_trainable": missing, "not_in_model": not_in_model}
    if frozen:
        warnings.warn(
            f"{len(frozen)} frozen parameter tensor(s) (requires_grad=False) are in the optimizer and "
            f"will never be updated: {_shown(frozen)}. Build the optimizer from "
            "[p for p in model.parameters() if p.requires_grad] after freeze_module().", stacklevel=2)
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter tensor(s) of the model are not in the optimizer, so "
            f"their gradients are never applied: {_shown(missing)}. Create the optimizer after adding "
            "the delta and calling freeze_module().", stacklevel=2)
    if verbose:
        for g in groups:
            print(f"Optimizer group {g['index']}: {g['tensors']} tensors, {g['updated_parameters']:,} of "
                  f"{g['parameters']:,} parameters updated (lr={g['lr']}, weight_decay={g['weight_decay']})")
        print(f"Optimizer {type(optimizer).__name__}: {len(groups)} group(s), {len(held)} tensors, "
              f"updates {updated:,} parameters")
    return stats


__all__ = ["inspect_module_statistics", "inspect_optimizer_statistics", "log_model",
           "cuda_memory_by_device", "parameter_devices", "format_module_statistics"]
