"""Activation functions by name (the names OpenDelta configs use)."""
from __future__ import annotations

from torch import nn

from ..core.fields import Rule, text

_ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
    "identity": nn.Identity,
}


def activation_rule() -> Rule:
    """The declared rule of a ``non_linearity`` field: a known name, case-insensitive."""
    return text(choices=sorted(_ACTIVATIONS), case_insensitive=True)


def check_activation(name: str) -> None:
    if name.lower() not in _ACTIVATIONS:
        raise ValueError(f"unknown non_linearity {name!r}; choose one of {sorted(_ACTIVATIONS)}")


def get_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (case-insensitive), e.g. ``"gelu_new"``."""
    check_activation(name)
    return _ACTIVATIONS[name.lower()]()
