"""LoRA: a parallel low-rank update ``B @ A @ x * alpha / r`` of Linear and Conv1D layers.

Hu et al., 2021. ``A`` ([r, in]) is Kaiming-uniform initialised and ``B`` ([out, r]) is
zero, so a fresh LoRA leaves every output unchanged. Variants, with PEFT's option names:

* ``use_rslora=True`` (Kalajdzievski, 2023): scaling ``alpha / sqrt(r)`` instead of
  ``alpha / r``.
* ``use_dora=True`` (Liu et al., 2024, weight-decomposed LoRA): the adapted weight
  ``W + s B A`` is split into its direction and a trained magnitude ``m`` (``[out]``, one
  per output feature, starting at the row norms of ``W``): ``y = m / ||W + s B A||_row *
  (W + s B A) x + b``. The norm is treated as a constant in backpropagation (the paper's
  section 4.3, as PEFT does). Merging folds it in exactly; see :class:`DoraLayer`.
* ``init_lora_weights``: ``True``, ``"gaussian"``, ``"pissa"``, ``"olora"`` (or ``False``);
  PiSSA and OLoRA write a residual into the base weight, which ``detach()`` restores bit
  for bit (see :mod:`opendelta.methods.lora_init`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import boolean, integer, number, validated
from ..core.layers import DeltaLayer
from ..core.merging import MergeableLayer, Update
from ..core.quantized_merge import QuantizedMergeMixin, is_quantized
from ..core.registry import registered
from ..core.shapes import is_conv1d_transposed, is_linear_like
from .lora_init import (RESIDUAL_INITS, InitRule, check_residual_host, init_plain, oriented_weight, principal_factors,
                        residual_of, write_oriented)
from .merge_order import TargetMergeMixin, check_unmerge_order


@dataclass
class LoraConfig(BaseDeltaConfig):
    """Args:
        lora_r: rank ``r`` of the update (a positive integer, not a bool). Default 8.
        lora_alpha: scaling numerator (a finite number); the update is multiplied by
            ``lora_alpha / lora_r``. Default 16.
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1). Default 0.
        use_rslora: scale by ``lora_alpha / sqrt(lora_r)`` (rank-stabilised LoRA). Default False.
        use_dora: weight-decomposed LoRA (a trained magnitude per output feature). Default False.
        init_lora_weights: ``True`` (``B = 0``), ``"gaussian"`` (``A ~ N(0, 1/r)``, ``B = 0``),
            ``"pissa"`` / ``"olora"`` (principal directions of the weight, whose residual
            replaces the base weight) or ``False`` (random ``B``, for tests). Default True.
    """

    delta_type = "lora"
    lora_r: int = validated(8, integer(minimum=1))
    lora_alpha: float = validated(16, number())
    lora_dropout: float = validated(0.0, number(minimum=0, maximum=1, exclusive_maximum=True))
    use_rslora: bool = validated(False, boolean())
    use_dora: bool = validated(False, boolean())
    init_lora_weights: Any = validated(True, InitRule())


class LoraLayer(MergeableLayer, DeltaLayer):
    """The low-rank branch of one Linear-like module.

    Shapes: input ``[..., in_features]``; adds ``[..., out_features]`` to the host output.
    Parameters ``lora_A`` ``[r, in_features]`` and ``lora_B`` ``[out_features, r]``.
    Mergeable into the host's weight (``nn.Linear`` ``[out, in]`` or GPT-2's ``Conv1D``
    ``[in, out]``), see :mod:`opendelta.core.merging`.
    """

    #: adds to the host's output: commutes with a merge into the host (see core/merging.py)
    output_additive = True

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, device: Any = None, dtype: Any = None, *, use_rslora: bool = False,
                 init_lora_weights: Any = True):
        super().__init__()
        self.r, self.alpha = r, alpha
        # rsLoRA: alpha / sqrt(r) keeps the update's scale independent of the rank.
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        # No dropout module at p = 0: nothing runs on the hot path.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        # PiSSA / OLoRA start from the host's weight (start_from_principal, called by the model).
        init_plain(self.lora_A, self.lora_B, True if init_lora_weights in RESIDUAL_INITS else init_lora_weights)

    # ------------------------------------------------------------------ PiSSA / OLoRA
    #: non-persistent buffers of a branch with a residual (see :mod:`.lora_init`)
    lora_A_init: torch.Tensor
    lora_B_init: torch.Tensor
    base_weight: torch.Tensor

    @property
    def has_residual(self) -> bool:
        """Whether the host's weight holds a residual (PiSSA / OLoRA) while attached."""
        return "base_weight" in self._buffers

    def start_from_principal(self, host: nn.Module, mode: str) -> None:
        """Set ``A``, ``B`` to the principal factors of the host's weight (``mode`` is
        ``"pissa"`` or ``"olora"``), keep them and a copy of the weight, write the residual."""
        weight = oriented_weight(host)
        lora_A_init, lora_B_init = principal_factors(weight, self.r, self.scaling, mode)
        device, dtype = self.lora_A.device, self.lora_A.dtype
        self.register_buffer("lora_A_init", lora_A_init.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("lora_B_init", lora_B_init.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("base_weight", weight.detach().clone(), persistent=False)
        with torch.no_grad():
            self.lora_A.copy_(self.lora_A_init)
            self.lora_B.copy_(self.lora_B_init)
        self.write_residual(host)

    def write_residual(self, host: nn.Module) -> None:
        """Keep the host's current weight and replace it by its residual
        ``W - scaling * B0 @ A0`` (computed from the kept factors, in fp32)."""
        with torch.no_grad():
            self.base_weight.copy_(oriented_weight(host))
            write_oriented(host, residual_of(self.base_weight, self.lora_A_init, self.lora_B_init, self.scaling))

    def restore_base_weight(self, host: nn.Module) -> None:
        """Put the weight kept by :meth:`write_residual` back, bit for bit."""
        write_oriented(host, self.base_weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B @ A @ x * scaling`` for ``x`` of shape ``[..., in_features]``."""
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        # Scale the rank-r intermediate: the smallest tensor of the branch.
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            # Deltas kept in another dtype (``delta_dtype``) outside autocast: compute in theirs.
            return output + self.delta(x.to(self.lora_A.dtype)).to(output.dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        low_rank = F.linear(x, self.lora_A)  # [..., r]
        if output.dim() >= 2 and low_rank.shape[:-1] == output.shape[:-1] and low_rank.dtype == output.dtype:
            # output + scaling * low_rank @ B^T in one fused kernel: no [..., out] temporary
            # and no separate scaling pass (addmm's alpha; autograd supports it).
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), low_rank.reshape(-1, self.r),
                               self.lora_B.t(), alpha=self.scaling)
            return flat.view(output.shape)
        return output + F.linear(low_rank * self.scaling, self.lora_B)

    def routed_update(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        """What this layer adds to the host's output for the (row-sliced) call: routing
        (:mod:`opendelta.route`) index-adds it to the rows routed to this delta."""
        return self.delta(args[0] if args else next(iter(kwargs.values())))

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``, ``[out_features, in_features]`` (computed in fp32 for
        half-precision weights, then cast back)."""
        A, B = self.lora_A, self.lora_B
        if A.dtype in (torch.float16, torch.bfloat16):
            return (B.float() @ A.float() * self.scaling).to(A.dtype)
        return B @ A * self.scaling

    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        weight = getattr(host, "weight", None)
        expected = (self.lora_A.shape[1], self.lora_B.shape[0])
        if is_conv1d_transposed(host):
            shape = expected
        elif isinstance(host, nn.Linear):
            shape = expected[::-1]
        else:
            return f"LoRA merges into nn.Linear and Conv1D only, not {type(host).__name__}"
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return f"its weight is not a floating-point tensor ({type(weight).__name__})"
        if tuple(weight.shape) != shape:
            return f"its weight has shape {tuple(weight.shape)}, the LoRA update {shape}"
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        with torch.no_grad():
            update = self.delta_weight().to(host.weight.dtype)
        # Conv1D stores its weight as [in, out].
        return [(host.weight, update.t() if is_conv1d_transposed(host) else update)]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}" + (", merged" if self.merged else "")


class DoraLayer(TargetMergeMixin, LoraLayer):
    """Weight-decomposed LoRA of one Linear-like module (``use_dora=True``).

    Shapes: input ``[..., in]``, host output ``[..., out]``; ``lora_A`` ``[r, in]``,
    ``lora_B`` ``[out, r]``, ``lora_magnitude_vector`` ``m`` ``[out]``. With
    ``n = ||W + s B A||`` per output row (``W`` as ``[out, in]``, ``n`` detached) the host's
    output ``W x + b`` becomes ``m / n * (W + s B A) x + b``, computed as PEFT does:
    ``y + (m / n - 1) * W x + m / n * s * B A x``.

    Merging writes ``m / n * (W + s B A)`` into the weight and keeps ``n`` (``[out]``) to
    take it out again; like every product it comes out only while no other delta was merged
    into the weight afterwards (:mod:`opendelta.methods.merge_order`).
    """

    output_additive = False  # rescales the host's output by the weight norm

    #: the update is not ``scaling * B @ A @ x``: routing runs it per delta (its own
    #: ``routed_update``), never in the batched LoRA kernel.
    batched_routing = False

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, device: Any = None, dtype: Any = None, **options: Any):
        super().__init__(in_features, out_features, r, alpha, dropout, device, dtype, **options)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def weight_norm(self, host: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` per output row, ``[out]``, in this layer's dtype, detached."""
        with torch.no_grad():
            weight = oriented_weight(host).to(self.lora_A.dtype)
            return torch.linalg.norm(weight + self.scaling * (self.lora_B @ self.lora_A), dim=1)

    def start_magnitude(self, host: nn.Module) -> None:
        """``m = ||W + s B A||``: the layer starts as plain LoRA (unchanged model at ``B = 0``)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(host))

    def _update(self, host: nn.Module, x: torch.Tensor, output: Optional[torch.Tensor]) -> torch.Tensor:
        """What DoRA adds to the host's output ``W x + b`` (``output``; ``None``: recompute
        ``W x``), in this layer's dtype."""
        weight = oriented_weight(host).to(self.lora_A.dtype)
        if self.lora_dropout is not None and self.training:
            x = self.lora_dropout(x)
            output = None  # W x on the dropped input, as PEFT does
        if output is None:
            base = F.linear(x, weight)
        else:
            bias = getattr(host, "bias", None)
            base = output - bias.to(output.dtype) if isinstance(bias, torch.Tensor) else output
        scale = self.lora_magnitude_vector / self.weight_norm(host)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return (scale - 1) * base + scale * lora

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        dtype = self.lora_A.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return output + self._update(host, x.to(dtype), output.to(dtype)).to(output.dtype)
        return output + self._update(host, x, output).to(output.dtype)

    def routed_update(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        return self._update(host, x.to(self.lora_A.dtype), None)

    # ------------------------------------------------------------------ merging
    def merge(self, host: nn.Module, keep_copy: bool = False, updates: Optional[List[Update]] = None) -> None:
        if not self.merged:  # n at merge time: unmerging divides by m / n again
            self.__dict__["_merge_norm"] = self.weight_norm(host).float()
        super().merge(host, keep_copy, updates)

    def unmerge(self, host: nn.Module) -> None:
        super().unmerge(host)
        self.__dict__.pop("_merge_norm", None)

    def merge_targets(self, host: nn.Module) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """``m / n * (W + s B A)`` in fp32; once merged, the ``W`` it came from (with the
        ``n`` kept at merge time)."""
        weight = oriented_weight(host).detach().float()
        delta = self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        norm = self.__dict__["_merge_norm"] if self.merged else torch.linalg.norm(weight + delta, dim=1)
        factor = (self.lora_magnitude_vector.detach().float() / norm).view(-1, 1)
        target = weight / factor - delta if self.merged else factor * (weight + delta)
        weight_param = cast(nn.Parameter, host.weight)
        return [(weight_param, target.t() if is_conv1d_transposed(host) else target)]


class QuantizedLoraLayer(QuantizedMergeMixin, LoraLayer):
    """LoRA on a quantized Linear (bitsandbytes, torchao): merging dequantizes, adds and
    requantizes, keeping the original weight (see :mod:`opendelta.core.quantized_merge`)."""


@registered()
class LoraModel(DeltaBase):
    """LoRA on Linear and Conv1D modules (default: attention query and value, or GPT-2's
    fused ``c_attn``). Hyperparameters: see :class:`LoraConfig`."""

    delta_type = "lora"
    config_class = LoraConfig
    default_modified_modules = ["attn.q", "attn.v", "attn.qkv"]
    layer_name = "lora"

    def add_delta(self, name: str, module: nn.Module) -> None:
        if not is_linear_like(module):
            raise ValueError(
                f"LoRA applies to Linear and Conv1D modules; {name!r} is a "
                f"{type(module).__name__}. Choose its linear sub-modules instead.")
        in_features, out_features = self.module_sizes(name, module)
        cfg = cast(LoraConfig, self.config)
        variant = cfg.use_dora or cfg.init_lora_weights in RESIDUAL_INITS
        if variant and is_quantized(module):
            raise ValueError(f"use_dora and init_lora_weights='pissa'/'olora' need a floating-point weight; "
                             f"{name!r} is quantized. Use plain LoRA on quantized modules")
        if cfg.init_lora_weights in RESIDUAL_INITS:
            check_residual_host(name, module, cfg.lora_r)
        layer_class = DoraLayer if cfg.use_dora else QuantizedLoraLayer if is_quantized(module) else LoraLayer
        layer = layer_class(in_features, out_features, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                            **self.factory_kwargs(module), use_rslora=cfg.use_rslora,
                            init_lora_weights=cfg.init_lora_weights)
        self.insert_layer(name, layer)

    def add_all_deltas(self, targets: Sequence[str]) -> None:
        """Insert every layer, then start PiSSA / OLoRA from the weights (writing their
        residuals; all or none) and DoRA's magnitudes from the adapted weights."""
        super().add_all_deltas(targets)
        mode = cast(LoraConfig, self.config).init_lora_weights
        pairs = [(self.host_module(e.host_name), cast(LoraLayer, e.layer)) for e in self.layer_entries()]
        if any(layer.lora_A.device.type == "meta" for _, layer in pairs):
            return  # nothing to compute from on the meta device
        if mode in RESIDUAL_INITS:
            done = []
            try:
                for host, layer in pairs:
                    layer.start_from_principal(host, mode)
                    done.append((host, layer))
            except Exception:
                for host, layer in reversed(done):
                    layer.restore_base_weight(host)
                raise
        for host, layer in pairs:
            if isinstance(layer, DoraLayer):
                layer.start_magnitude(host)

    # ------------------------------------------------------------------ residual weights
    def _residual_pairs(self) -> List[Tuple[nn.Module, LoraLayer]]:
        return [(self.host_module(e.host_name), cast(LoraLayer, e.layer)) for e in self.layer_entries()
                if getattr(e.layer, "has_residual", False)]

    def detach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """As :meth:`DeltaBase.detach`; PiSSA / OLoRA also put the original weights back
        (bit for bit: the weights as they were when this delta was attached)."""
        attached = self.lifecycle.attached
        super().detach(module, reset_state_dict)
        if attached:
            for host, layer in reversed(self._residual_pairs()):
                layer.restore_base_weight(host)

    def attach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """As :meth:`DeltaBase.attach`; PiSSA / OLoRA first write their residuals again."""
        if self.lifecycle.attached or self.lifecycle.merged_away:
            return super().attach(module, reset_state_dict)
        pairs = self._residual_pairs()
        for host, layer in pairs:
            layer.write_residual(host)
        try:
            super().attach(module, reset_state_dict)
        except Exception:
            for host, layer in reversed(pairs):
                layer.restore_base_weight(host)
            raise

    def unmerge(self) -> None:
        """As :meth:`DeltaBase.unmerge`; a DoRA merge is a product: it comes out only while
        nothing was merged into its weights after it."""
        check_unmerge_order(self, DoraLayer)
        super().unmerge()

    def config_for_saving(self, skip_parameters: Sequence[str] = ()) -> BaseDeltaConfig:
        """The saved config's backbone hash is that of the original weights (PiSSA and OLoRA
        hold residuals while attached): a fresh backbone loading the checkpoint matches."""
        pairs = [(h, l) for h, l in self._residual_pairs() if not l.merged] if self.lifecycle.attached else []
        current = [oriented_weight(host).detach().clone() for host, _ in pairs]
        for host, layer in pairs:
            layer.restore_base_weight(host)
        try:
            return super().config_for_saving(list(skip_parameters))
        finally:
            for (host, _), weight in zip(pairs, current):
                write_oriented(host, weight)
