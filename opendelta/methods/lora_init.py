"""How a LoRA branch starts (PEFT's ``init_lora_weights``), and the residual base weights
that PiSSA and OLoRA leave in the backbone.

* ``True`` (default): ``A`` Kaiming-uniform, ``B = 0``: the model is unchanged.
* ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B = 0``: unchanged too.
* ``False``: ``A`` and ``B`` both Kaiming-uniform (a random, non-zero update; for tests).
* ``"pissa"`` (Meng et al., 2024): the principal singular triplets of the weight,
  ``W ~ U_r S_r V_r^T``; ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` (``s`` the
  LoRA scaling), so that ``s * B @ A`` is the rank-``r`` truncation of ``W``.
* ``"olora"`` (Büyükakyüz, 2024): the first ``r`` columns of ``Q`` and rows of ``R`` of
  ``W = Q R``: ``B = Q_r``, ``A = R_r``, ``s * B @ A`` the projection of ``W`` onto
  ``Q_r``'s span, times ``s``.

For PiSSA and OLoRA the principal part is taken out of the base weight, which holds the
*residual* ``W_res = W - s * B0 @ A0``, so the model is unchanged at the start and the
adapter trains the principal directions. The maths follow PEFT (in fp32, then cast to the
weight's dtype), so an adapter trained by either library fits the other's residual.

A branch with a residual keeps, as non-persistent buffers (never in checkpoints, which
hold ``A`` and ``B`` as for plain LoRA), ``base_weight`` (the original weight, so that
``detach()`` restores it bit for bit; memory: one copy of each modified weight while
attached) and ``lora_A_init`` / ``lora_B_init`` (``A0``, ``B0``: the PEFT export turns the
adapter into a plain rank-``2r`` LoRA of the original weight, ``[A; A0]`` and ``[B, -B0]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..core.fields import ChoiceError, ConfigFieldError, Rule
from ..core.shapes import is_conv1d_transposed

#: the string values of ``init_lora_weights`` (besides ``True`` and ``False``).
INIT_CHOICES = ("gaussian", "pissa", "olora")
#: initialisations that write a residual into the base weight.
RESIDUAL_INITS = ("pissa", "olora")


@dataclass(frozen=True)
class InitRule(Rule):
    """``init_lora_weights``: ``True``, ``False`` or one of :data:`INIT_CHOICES` (a field
    rule of :mod:`opendelta.core.fields`)."""

    kind: str = "init"
    choices: Optional[Tuple[str, ...]] = INIT_CHOICES

    def describe(self) -> str:
        return f"True, False or one of {list(INIT_CHOICES)}"

    def check(self, owner: str, field: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if not isinstance(value, str):
            raise ConfigFieldError(owner, field, value, self.describe())
        if value not in INIT_CHOICES:
            raise ChoiceError(owner, field, value, self.describe() + " (PEFT's pissa_niter_*, loftq, corda, "
                              "eva and orthogonal initialisations are not implemented)")


def oriented_weight(host: nn.Module) -> torch.Tensor:
    """The host's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``), a view."""
    weight: Any = host.weight
    return weight.t() if is_conv1d_transposed(host) else weight


def init_plain(lora_A: torch.Tensor, lora_B: torch.Tensor, mode: Any) -> None:
    """``True`` / ``"gaussian"`` / ``False`` initialisation of ``A`` ``[r, in]`` and ``B``
    ``[out, r]`` (in place)."""
    if lora_A.device.type == "meta":
        return
    with torch.no_grad():
        if mode == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if mode is False:
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(lora_B)


def principal_factors(weight: torch.Tensor, r: int, scaling: float, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A0 [r, in], B0 [out, r])`` in fp32 with ``scaling * B0 @ A0`` the principal part of
    ``weight`` ``[out, in]`` (PiSSA: rank-``r`` SVD truncation; OLoRA: QR projection)."""
    w = weight.detach().to(torch.float32)
    if mode == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s_r = s[:r] / scaling
        return torch.diag(torch.sqrt(s_r)) @ vh[:r], u[:, :r] @ torch.diag(torch.sqrt(s_r))
    if mode == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    raise ValueError(f"no principal factors for init_lora_weights={mode!r}; expected one of {RESIDUAL_INITS}")


def residual_of(original: torch.Tensor, lora_A_init: torch.Tensor, lora_B_init: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``original - scaling * B0 @ A0`` computed in fp32, in ``original``'s dtype (``[out, in]``)."""
    principal = lora_B_init.to(torch.float32) @ lora_A_init.to(torch.float32)
    return (original.to(torch.float32) - scaling * principal).to(original.dtype)


def write_oriented(host: nn.Module, value: torch.Tensor) -> None:
    """Copy ``value`` (``[out, in]``) into the host's weight, whatever its layout."""
    with torch.no_grad():
        oriented_weight(host).copy_(value)


def check_residual_host(name: str, host: nn.Module, r: int) -> None:
    """Raise ``ValueError`` if a residual initialisation cannot run on ``host``."""
    weight = getattr(host, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"init_lora_weights 'pissa' / 'olora' need a float32, float16 or bfloat16 weight; "
                         f"{name!r} has {getattr(weight, 'dtype', type(weight).__name__)}")
    if r > min(weight.shape):
        raise ValueError(f"init_lora_weights 'pissa' / 'olora' take the first r = {r} directions of {name!r}, "
                         f"whose weight {tuple(weight.shape)} has only {min(weight.shape)}; lower lora_r")


__all__ = ["INIT_CHOICES", "RESIDUAL_INITS", "InitRule", "check_residual_host", "init_plain", "oriented_weight",
           "principal_factors", "residual_of", "write_oriented"]
