"""LoRA on parameters, not only modules: fused MoE experts, or any parameter a user names.

transformers 5 stores the experts of Mixtral, Qwen3-MoE and the other MoE decoders as 3-D
parameters of one module (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``down_proj``
``[E, H, I]``), which no module-level delta reaches. :class:`ParameterLoraModel` puts LoRA on
named parameters (``target_parameters``, as PEFT's option of that name) and on modules
(``modified_modules``, as :class:`~opendelta.LoraModel`):

* a 3-D parameter ``[E, d1, d2]`` gets, per expert ``e``, its own ``A[e]`` ``[r, in]`` and
  ``B[e]`` ``[out, r]``: ``W[e] += B[e] @ A[e] * alpha / r`` (``[out, in] = [d1, d2]``; for
  experts stored transposed, ``is_transposed`` modules such as GPT-OSS's, ``[in, out]``
  and the transposed update); a 2-D parameter ``[out, in]`` gets one ``A`` / ``B``;
* the update is applied where the model uses the parameter, per expert and only for the
  experts that receive tokens (:mod:`opendelta.methods.low_rank_weights`): no
  ``[E, out, in]`` update is built in a forward pass;
* defaults: attention (``attn.q``, ``attn.v``, fused ``attn.qkv``, latent ``attn.kv``) plus
  the experts' fused parameters (``ff.experts.w13``, ``ff.experts.w2``, see
  :mod:`opendelta.core.structure_maps_moe`);
* merge / unmerge (fold ``B @ A`` into the parameter), save / load, detach / attach,
  ``freeze_module`` and ``opendelta.route(name)`` (one delta for the whole batch; experts see
  tokens, not examples, so rows cannot be routed separately) work as for module deltas.
  PEFT's ``target_parameters`` format: :mod:`opendelta.io.peft_parameters`.

The parameter keeps its name and values: its module's ``_parameters`` holds a
:class:`~opendelta.methods.low_rank_weights.ParameterHandle` sharing its storage while the
delta is attached, and the original parameter object again after ``detach()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.addressing import closest_names, endswith_in
from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.dispatch import attached_layers
from ..core.fields import integer, number, string_list, validated
from ..core.layers import DeltaLayer, LayerEntry
from ..core.merging import MergeableLayer, Update
from ..core.quantized_merge import is_quantized
from ..core.registry import registered
from ..core.shapes import is_linear_like
from ..core.structure_maps_moe import EXPERT_PARAMETERS
from ..core.targets import candidate_modules, check_keys, is_excluded
from .lora import LoraLayer, QuantizedLoraLayer
from .low_rank_weights import ParameterHandle, Term, activate, active_terms, clear, deactivate


@dataclass
class ParameterLoraConfig(BaseDeltaConfig):
    """Args:
        lora_r: rank ``r`` of every update (per expert for 3-D parameters). Default 8.
        lora_alpha: the update is scaled by ``lora_alpha / lora_r``. Default 16.
        lora_dropout: dropout on the input of the *module* LoRA layers, in [0, 1); parameter
            updates act inside their module, where no input can be dropped: it must be 0
            when parameters are targeted (as in PEFT). Default 0.
        target_parameters: keys naming parameters (a key matches a full parameter name, or
            its common-structure name, ending with it on a segment boundary; ``[r]`` keys are
            regular expressions), e.g. ``["experts.gate_up_proj", "experts.down_proj"]``.
            ``None``: the experts' fused parameters when ``modified_modules`` is ``None`` too
            (the defaults), no parameter otherwise.
    """

    delta_type = "parameter_lora"
    lora_r: int = validated(8, integer(minimum=1))
    lora_alpha: float = validated(16, number())
    lora_dropout: float = validated(0.0, number(minimum=0, maximum=1, exclusive_maximum=True))
    target_parameters: Optional[List[str]] = validated(None, string_list())


class ParameterFactors(nn.Module):
    """``lora_A`` ``[E, r, in]`` and ``lora_B`` ``[E, out, r]`` of one parameter (no ``E`` for
    a 2-D parameter); the parameter's update is ``B @ A * scaling`` per expert, transposed
    when the parameter is stored ``[E, in, out]`` (``transposed``)."""

    def __init__(self, shape: Tuple[int, ...], r: int, alpha: float, transposed: bool = False,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"parameter LoRA applies to 2-D and 3-D parameters, not shape {tuple(shape)}")
        *experts, d1, d2 = shape
        out_features, in_features = (d2, d1) if transposed else (d1, d2)
        self.transposed, self.r, self.scaling = transposed, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(*experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(*experts, out_features, r, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":
            for a in self.lora_A.view(-1, r, in_features):  # Kaiming-uniform per expert, as LoRA's A
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def shape(self) -> Tuple[int, ...]:
        """The shape of the parameter (and of its update)."""
        *experts, out_features, _ = self.lora_B.shape
        in_features = self.lora_A.shape[-1]
        return (*experts, in_features, out_features) if self.transposed else (*experts, out_features, in_features)

    def term(self) -> Term:
        """The update as ``left @ right * scaling`` in the parameter's own layout."""
        term = Term(self.lora_B, self.lora_A, self.scaling)
        return term.transposed() if self.transposed else term

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense update, shaped like the parameter (computed in fp32 for half precision)."""
        term = self.term()
        if term.left.dtype in (torch.float16, torch.bfloat16):
            term = Term(term.left.float(), term.right.float(), term.scaling)
        return term.dense(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}" + (", transposed" if self.transposed else "")


class ParameterLoraLayer(MergeableLayer, DeltaLayer):
    """The LoRA factors of the targeted parameters of one module (its *host*), one
    :class:`ParameterFactors` child per parameter name. Its hooks only switch the updates on
    for the host's forward pass; the parameters do the arithmetic (see the module docs)."""

    uses_pre_hook = True
    uses_post_hook = True
    #: experts see tokens, not batch rows: only a whole batch can be routed to this layer.
    supports_routing = False

    def __init__(self, factors: Dict[str, ParameterFactors]):
        super().__init__()
        for name, module in factors.items():
            if hasattr(self, name):
                raise ValueError(f"cannot target a parameter named {name!r} (a name of the layer itself)")
            self.add_module(name, module)
        self.names: Tuple[str, ...] = tuple(factors)

    def factors(self) -> Dict[str, ParameterFactors]:
        return {name: self._modules[name] for name in self.names}  # type: ignore[misc]

    def _handle(self, host: nn.Module, name: str) -> ParameterHandle:
        handle = host._parameters.get(name)
        if not isinstance(handle, ParameterHandle):
            raise RuntimeError(f"{type(host).__name__}.{name} is no longer the parameter this delta acts on (it "
                               "was replaced); detach() and attach() the delta to act on the new one")
        return handle

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        for name, factors in self.factors().items():
            handle = self._handle(host, name)
            # A forward that raised between the hooks left this layer's term behind: drop it.
            if any(getattr(t, "__self__", None) is factors for t in active_terms(handle)):
                clear(handle)
            activate(handle, factors.term)
        return None

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        for name in self.names:
            deactivate(self._handle(host, name))
        return output

    # ------------------------------------------------------------------ merging
    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        for name, factors in self.factors().items():
            param = host._parameters.get(name)
            if param is None or not param.is_floating_point():
                return f"its parameter {name!r} is missing or not floating-point"
            if tuple(param.shape) != factors.shape():
                return f"its parameter {name!r} has shape {tuple(param.shape)}, the update {factors.shape()}"
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        with torch.no_grad():
            return [(host._parameters[name], factors.delta_weight(host._parameters[name].dtype))  # type: ignore[misc]
                    for name, factors in self.factors().items()]

    def extra_repr(self) -> str:
        return f"parameters={list(self.names)}" + (", merged" if self.merged else "")


def _install(host: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        param = host._parameters[name]
        if not isinstance(param, ParameterHandle):
            host._parameters[name] = ParameterHandle.wrap(param)  # type: ignore[arg-type]


def _uninstall_unused(host: nn.Module, names: Sequence[str]) -> None:
    """Put the plain parameters back where no attached layer acts on them any more."""
    used = {n for layer in attached_layers(host) if isinstance(layer, ParameterLoraLayer) for n in layer.names}
    for name in names:
        param = host._parameters.get(name)
        if isinstance(param, ParameterHandle) and name not in used:
            host._parameters[name] = param.unwrap()


@registered(aliases=("lora_parameters", "expert_lora"))
class ParameterLoraModel(DeltaBase):
    """LoRA on named parameters (fused MoE experts) and modules; see the module docs and
    :class:`ParameterLoraConfig`."""

    delta_type = "parameter_lora"
    config_class = ParameterLoraConfig
    default_modified_modules = ["attn.q", "attn.v", "attn.qkv", "attn.kv"]
    layer_name = "lora"

    # ------------------------------------------------------------------ building
    def add_all_deltas(self, targets: Sequence[str]) -> None:
        parameters = self.resolve_parameters()
        clash = sorted(set(targets) & {host for host, _ in parameters})
        if clash:
            raise ValueError(f"modules {clash} are targeted both as modules and through their parameters; "
                             "target each module one way")
        if parameters and self.config.lora_dropout:
            raise ValueError("lora_dropout must be 0 when parameters are targeted (their update acts inside the "
                             "module, where no input can be dropped); set lora_dropout=0")
        modules = dict(candidate_modules(self.backbone_model))
        for name in targets:
            self._add_module_lora(name, modules[name])
        by_host: Dict[str, List[str]] = {}
        for host, param in parameters:
            by_host.setdefault(host, []).append(param)
        for host_name, names in by_host.items():
            host = modules[host_name]
            transposed = bool(getattr(host, "is_transposed", False))
            cfg = self.config
            factors = {}
            for name in names:
                param = host._parameters[name]
                options = {"device": param.device, "dtype": self.delta_dtype or param.dtype}
                factors[name] = ParameterFactors(tuple(param.shape), cfg.lora_r, cfg.lora_alpha,
                                                 transposed and param.dim() == 3, **options)
            self.insert_layer(host_name, ParameterLoraLayer(factors))
            _install(host, names)

    def _add_module_lora(self, name: str, module: nn.Module) -> None:
        """Plain LoRA (:class:`~opendelta.methods.lora.LoraLayer`) on a Linear-like module."""
        if not is_linear_like(module):
            raise ValueError(f"LoRA applies to Linear and Conv1D modules; {name!r} is a {type(module).__name__}. "
                             "Choose its linear sub-modules, or name its parameters in target_parameters.")
        in_features, out_features = self.module_sizes(name, module)
        cfg = self.config
        layer_class = QuantizedLoraLayer if is_quantized(module) else LoraLayer
        self.insert_layer(name, layer_class(in_features, out_features, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                            **self.factory_kwargs(module)))

    def resolve_parameters(self) -> List[Tuple[str, str]]:
        """``(module name, parameter name)`` of every targeted parameter, in model order.

        Raises:
            ValueError: a key of ``target_parameters`` matches no parameter (the message
                lists the closest names), or matches one that is not a 2-D / 3-D float.
        """
        given = self.config.target_parameters
        uses_defaults = given is None
        if given is None:
            keys = list(EXPERT_PARAMETERS) if self.config.modified_modules is None else []
        else:
            keys = check_keys(given, "target_parameters")
        mapping = self.structure_mapping
        hits = {key: 0 for key in keys}
        found: List[Tuple[str, str]] = []
        names: List[str] = []
        for module_name, module in candidate_modules(self.backbone_model):
            for param_name, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{module_name}.{param_name}" if module_name else param_name
                names.append(full)
                common = mapping.transform(full) if mapping is not None else None
                matched = [k for k in keys if endswith_in(full, [k]) or (common and endswith_in(common, [k]))]
                if not matched or is_excluded(full, common, self.exclude_modules):
                    continue
                if param.dim() not in (2, 3) or not param.is_floating_point():
                    raise ValueError(f"target_parameters {matched} match {full!r} of shape {tuple(param.shape)} "
                                     f"({param.dtype}); parameter LoRA needs a 2-D or 3-D floating parameter")
                for key in matched:
                    hits[key] += 1
                found.append((module_name, param_name))
        missing = [k for k, n in hits.items() if not n]
        if missing and not uses_defaults:
            raise ValueError(f"target_parameters entries {missing} match no parameter of "
                             f"{type(self.backbone_model).__name__}; closest parameter names: "
                             f"{closest_names(missing[0], names)}")
        return found

    # ------------------------------------------------------------------ handles follow the layers
    def _parameter_layers(self) -> List[Tuple[nn.Module, ParameterLoraLayer]]:
        return [(self.host_module(e.host_name), e.layer) for e in self.layer_entries()
                if isinstance(e.layer, ParameterLoraLayer)]

    def attach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        super().attach(module, reset_state_dict)
        for host, layer in self._parameter_layers():
            _install(host, layer.names)

    def detach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """Take the delta out: the targeted parameters are the original objects again."""
        super().detach(module, reset_state_dict)
        for host, layer in self._parameter_layers():
            _uninstall_unused(host, layer.names)

    def remove_layer(self, entry: LayerEntry) -> None:
        host = self.host_module(entry.host_name)
        super().remove_layer(entry)
        if isinstance(entry.layer, ParameterLoraLayer):
            _uninstall_unused(host, entry.layer.names)


__all__ = ["ParameterLoraConfig", "ParameterLoraModel", "ParameterLoraLayer", "ParameterFactors"]
