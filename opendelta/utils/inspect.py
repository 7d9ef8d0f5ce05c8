"""Parameter statistics of a model: totals, trainable and delta parameters, memory."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..delta_layer import is_delta_parameter_name


def inspect_module_statistics(model: nn.Module) -> Dict[str, Any]:
    """Counts and ratios of ``model``'s parameters (shared parameters counted once).

    Returns a dict with ``total_parameters``, ``trainable_parameters``,
    ``delta_parameters`` (inside delta layers), ``backbone_parameters`` (the rest),
    ``trainable_ratio`` and ``delta_ratio`` (both relative to the backbone's parameters,
    as OpenDelta reports them) and ``trainable_ratio_of_total``.
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
        "trainable_ratio": trainable / backbone if backbone else 0.0,
        "delta_ratio": delta / backbone if backbone else 0.0,
        "trainable_ratio_of_total": trainable / total if total else 0.0,
    }


def cuda_memory_by_device() -> Dict[str, float]:
    """Memory allocated on each CUDA device, in GiB (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())}


def log_model(model: nn.Module, delta_ratio: bool = True, trainable_ratio: bool = True,
              visualization: bool = True, cuda_memory: bool = True) -> Dict[str, Any]:
    """Print the model tree (if ``visualization``) and its parameter statistics."""
    if visualization:
        try:
            from ..utils.visualization import Visualization
        except ImportError:  # rich is optional
            Visualization = None
        if Visualization is not None:
            Visualization(model).structure_graph()
    stats = inspect_module_statistics(model)
    lines = [f"Total parameters: {stats['total_parameters']:,} "
             f"(backbone {stats['backbone_parameters']:,}, delta {stats['delta_parameters']:,})"]
    if trainable_ratio:
        lines.append(f"Trainable parameters: {stats['trainable_parameters']:,} "
                     f"({100 * stats['trainable_ratio']:.4f}% of the backbone)")
    if delta_ratio:
        lines.append(f"Delta parameters: {stats['delta_parameters']:,} "
                     f"({100 * stats['delta_ratio']:.4f}% of the backbone)")
    if cuda_memory:
        for device, gib in cuda_memory_by_device().items():
            lines.append(f"Memory on {device}: {gib:.3f} GiB")
    print("\n".join(lines))
    return stats
