"""Per-row factors of the deltas of one module, for the batched routing kernels.

:mod:`opendelta.batched_routing` needs, for every routed row, the factors of that row's
delta: LoRA's ``A^T`` ``[in, r]`` and ``B^T`` ``[r, out]``, a bottleneck's ``W_down``
``[in, b]``, ``b_down`` ``[b]``, ``W_up`` ``[b, out]``, ``b_up`` ``[out]`` (LowRankAdapter's
and Compacter's matrices are products of their parameters, computed for the U deltas at
once). :func:`row_factors` returns them stacked per row, ``[P, ...]``:

* **one delta**: its factors ``expand``-ed (views, no copy);
* **gradients needed** (training): the U deltas' factors are stacked and indexed per row,
  so that backward is one ``index_add`` into the stack, split back to the parameters;
* **no gradients** (inference): LoRA rows are copied straight from the parameters (one
  ``stack``), or, when rows share few deltas (U <= P / 2), the U deltas are stacked in the
  layout the matrix products read fastest and indexed per row.

**Built from the parameters on every call**, never cached: an optimizer step (fused ones
included, which do not move the tensors' version counters), a ``load_state_dict`` or any
write through ``.data`` is seen by the next call. (A cache keyed by version counters was
measured: no faster within the noise of the shared benchmark machine, twice the memory, and
stale after a fused optimizer step.)

Memory per call and module (P rows, U distinct deltas among them): LoRA ``P * r * (in + out)``
elements (plus ``U * r * (in + out)`` for the stack), a bottleneck of width ``b``
``P * b * (in + out)`` (plus the same for U); e.g. 64 rows, r = 16, in = out = 1024: 2.1 M
elements, 8 MiB in float32, however many deltas are attached. Freed after the call
(in training, kept for backward like any activation).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .methods.low_rank_adapter import LowRankLinear

__all__ = ["row_factors", "stacked_factors"]

Factors = Tuple[Optional[torch.Tensor], ...]


def _projection_stack(projs: Sequence[Any]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[U, in, out]`` weights and ``[U, out]`` biases (or ``None``) of projections of one type."""
    first = projs[0]
    if type(first) is nn.Linear:
        weight = torch.stack([p.weight for p in projs]).transpose(1, 2)
        return weight, torch.stack([p.bias for p in projs]) if first.bias is not None else None
    if type(first) is LowRankLinear:
        weight = torch.bmm(torch.stack([p.W_left for p in projs]), torch.stack([p.W_right for p in projs]))
    else:  # PHMLinear: sum_i kron(rule_i, W_i), with a leading delta dimension
        weight = _phm_weights(projs)
    return weight, torch.stack([p.b for p in projs]) if first.b is not None else None


def _factor(projs: Sequence[Any], name: str, left: str, right: str) -> torch.Tensor:
    """``[U, n, rows, cols]``: the parameter ``name`` of each PHM projection, or the product
    of its factorised ``left`` @ ``right``."""
    if name in projs[0]._parameters:
        return torch.stack([p._parameters[name] for p in projs])
    a = torch.stack([p._parameters[left] for p in projs])
    b = torch.stack([p._parameters[right] for p in projs])
    return torch.matmul(a, b)


def _phm_weights(projs: Sequence[Any]) -> torch.Tensor:
    rule = _factor(projs, "phm_rule", "phm_rule_left", "phm_rule_right")  # [U, n, n, n]
    if not projs[0].learn_phm:
        rule = rule.detach()
    blocks = _factor(projs, "W", "W_left", "W_right")  # [U, n, in/n, out/n]
    u, n, a, c = rule.shape
    _, _, k, p = blocks.shape
    # As compacter.kronecker_sum, with a leading delta dimension: outer products, then the
    # n terms summed.
    return torch.einsum("ubil,ubjm->ubijlm", rule, blocks).reshape(u, n, a * k, c * p).sum(1)


def stacked_factors(kind: str, layers: Sequence[Any]) -> Factors:
    """The factors of ``layers`` (one batch key), stacked: LoRA ``(A^T [U, in, r],
    B^T [U, r, out])``; bottlenecks ``(W_down [U, in, b], b_down [U, b] | None,
    W_up [U, b, out], b_up [U, out] | None)``. Differentiable; may be strided views."""
    if kind == "lora":
        return (torch.stack([layer._parameters["lora_A"] for layer in layers]).transpose(1, 2),
                torch.stack([layer._parameters["lora_B"] for layer in layers]).transpose(1, 2))
    parts = [layer.parts() for layer in layers]
    return (*_projection_stack([p[0] for p in parts]), *_projection_stack([p[2] for p in parts]))


def _parameters(kind: str, layer: Any) -> List[torch.Tensor]:
    """The parameters the factors of ``layer`` are computed from."""
    if kind == "lora":
        return [layer._parameters["lora_A"], layer._parameters["lora_B"]]
    down, _, up = layer.parts()
    return [p for proj in (down, up) for p in proj._parameters.values() if p is not None]


def _lora_rows(layers: Sequence[Any], slots: torch.Tensor, slot_list: Sequence[int]) -> Factors:
    """Inference: per-row ``A^T`` and ``B^T`` copied from the parameters."""
    A = [layer._parameters["lora_A"] for layer in layers]
    B = [layer._parameters["lora_B"] for layer in layers]
    if 2 * len(layers) <= len(slot_list):
        # Few deltas, many rows: stack them once, transposed into the layout the matrix
        # products read fastest (a small copy), then copy whole rows.
        return (torch.stack(A).transpose(1, 2).contiguous().index_select(0, slots),
                torch.stack(B).transpose(1, 2).contiguous().index_select(0, slots))
    return (torch.stack([A[s] for s in slot_list]).transpose(1, 2),
            torch.stack([B[s] for s in slot_list]).transpose(1, 2))


def row_factors(key: Any, layers: Sequence[Any], slots: torch.Tensor, slot_list: Sequence[int]) -> Factors:
    """The factors of each row's delta, ``[P, ...]`` (row ``i`` uses ``layers[slots[i]]``),
    for the layers of batch key ``key`` (``key[0]`` is the kind)."""
    kind = key[0]
    if len(layers) == 1:  # one delta: views, no copy
        return tuple(None if t is None else t.expand(len(slot_list), *t.shape[1:])
                     for t in stacked_factors(kind, layers))
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for layer in layers
                                                 for p in _parameters(kind, layer))
    if kind == "lora" and not needs_grad:
        return _lora_rows(layers, slots, slot_list)
    return tuple(None if t is None else t.index_select(0, slots) for t in stacked_factors(kind, layers))
