"""Shared assertions for the test-suite."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def outputs(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or first output) under ``no_grad``, for exact comparisons."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def perturb(delta, std: float = 0.1, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter of ``delta`` so it visibly changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def trainable_names(model: nn.Module):
    return {n for n, p in model.named_parameters() if p.requires_grad}
