"""Exchange parameter LoRA (fused MoE experts) with PEFT's ``target_parameters`` LoRA format.

PEFT (``LoraConfig(target_parameters=[...])``) wraps the module owning each targeted parameter
in a ``ParamWrapper``; several targeted parameters of one module nest, the parameter
registered last outermost. Its adapter files therefore hold, for a module ``m`` with
targeted parameters ``p_1 .. p_n`` (registration order)::

    base_model.model.m.lora_A.weight                      p_n      [E * r, in]
    base_model.model.m.base_layer.lora_A.weight           p_(n-1)
    base_model.model.m.base_layer.base_layer.lora_A...    p_(n-2)  ...

``lora_A.weight`` ``[E * r, in]`` is expert-major (row ``e * r + j``); ``lora_B.weight``
``[out, r * E]`` is rank-major (column ``j * E + e``). The update of expert ``e`` is
``B_e @ A_e * alpha / r`` with ``A_e`` ``[r, in]`` and ``B_e`` ``[out, r]``, where
``(in, out)`` is ``(d2, d1)`` for a parameter ``[E, d1, d2]`` (``(d1, d2)`` if its module is
``is_transposed``), exactly :class:`~opendelta.methods.parameter_lora.ParameterFactors`. A
2-D parameter ``[out, in]`` is one expert. Module targets (``target_modules``) use the plain
LoRA keys of :mod:`opendelta.io.peft`.

* :func:`save_peft_parameter_lora` writes a :class:`~opendelta.ParameterLoraModel` as such an
  adapter directory, which ``peft.PeftModel.from_pretrained`` loads;
* :func:`load_peft_parameter_lora` builds a :class:`~opendelta.ParameterLoraModel` from one.

The layout is that of peft 0.21 (tested with 0.21.2); earlier releases laid the expert
factors of ``target_parameters`` out differently.
"""
from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.registry import get_delta_class
from ..core.targets import candidate_modules
from .files import CheckpointError, peft_weights_file, read_peft_adapter, read_weights, write_peft_adapter
from .state import trainable_backbone_tensors

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

#: prefix of every key in a PEFT adapter file (as in :mod:`opendelta.io.peft`, which may delegate here).
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<which>A|B)\.weight$")
#: adapter_config.json options whose non-default values parameter LoRA cannot reproduce.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layer_replication": None, "use_qalora": False,
                "trainable_token_indices": None, "alora_invocation_tokens": None, "fan_in_fan_out": False}


def _targeted(module: nn.Module, module_name: str, keys: List[str]) -> List[str]:
    """Parameters of ``module`` (registration order) that PEFT's ``target_parameters`` match."""
    out = []
    for name in module._parameters:
        full = f"{module_name}.{name}" if module_name else name
        if any(full == k or full.endswith("." + k) for k in keys):
            out.append(name)
    return out


def _to_peft(factors: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Our ``lora_A`` / ``lora_B`` as PEFT's ``lora_A.weight`` / ``lora_B.weight``."""
    a, b = factors.lora_A.detach(), factors.lora_B.detach()
    if a.dim() == 2:
        return a, b
    experts, r, in_features = a.shape
    return a.reshape(experts * r, in_features), b.permute(1, 2, 0).reshape(b.shape[1], r * experts)


def _from_peft(a: torch.Tensor, b: torch.Tensor, experts: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    if experts is None:
        return a, b
    r = a.shape[0] // experts
    return a.reshape(experts, r, a.shape[1]), b.reshape(b.shape[0], r, experts).permute(2, 0, 1)


def save_peft_parameter_lora(delta: "DeltaBase", directory: Union[str, "os.PathLike[str]"],
                             base_model_name_or_path: Optional[str] = None) -> str:
    """Write a :class:`~opendelta.ParameterLoraModel` as a PEFT LoRA adapter directory with
    ``target_parameters`` (atomically). Returns the absolute path of the directory."""
    if delta.delta_type != "parameter_lora":
        raise TypeError(f"save_peft_parameter_lora writes ParameterLoraModel deltas, not {delta.delta_type!r}")
    tensors: Dict[str, torch.Tensor] = {}
    modules: List[str] = []
    parameters: List[str] = []
    for host_name, _, layer in delta.layer_entries():
        if not hasattr(layer, "factors"):  # a module LoRA layer
            modules.append(host_name)
            tensors[f"{PREFIX}{host_name}.lora_A.weight"] = layer.lora_A.detach()
            tensors[f"{PREFIX}{host_name}.lora_B.weight"] = layer.lora_B.detach()
            continue
        host = delta.host_module(host_name)
        order = [n for n in host._parameters if n in layer.names]
        for name, factors in layer.factors().items():
            parameters.append(f"{host_name}.{name}")
            nest = ".base_layer" * (len(order) - 1 - order.index(name))
            a, b = _to_peft(factors)
            tensors[f"{PREFIX}{host_name}{nest}.lora_A.weight"] = a
            tensors[f"{PREFIX}{host_name}{nest}.lora_B.weight"] = b
    trainable = trainable_backbone_tensors(delta)
    heads = sorted({name.rpartition(".")[0] for name in trainable})
    for head in heads:
        for pname, param in delta.backbone_model.get_submodule(head).named_parameters():
            tensors[f"{PREFIX}{head}.{pname}"] = param
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    cfg = delta.config
    name = base_model_name_or_path or getattr(getattr(delta.backbone_model, "config", None), "name_or_path", None)
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": name or None,
        "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        # PEFT needs target_modules set; an empty list targets no module.
        "target_modules": modules, "target_parameters": parameters, "fan_in_fan_out": False, "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": heads or None, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    return write_peft_adapter(directory, adapter_config, tensors)


def _check_config(config: Dict[str, Any], source: str) -> Tuple[int, float]:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA")
    for option, default in _UNSUPPORTED.items():
        if config.get(option, default) not in (default, None, False, [], {}):
            raise CheckpointError(f"{source}: {option}={config[option]!r} is not supported by parameter LoRA")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{source}: trained biases and per-module ranks (rank_pattern / alpha_pattern) "
                              "are not supported")
    if float(config.get("lora_dropout") or 0.0) and config.get("target_parameters"):
        raise CheckpointError(f"{source}: lora_dropout with target_parameters is not a valid PEFT adapter")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    return r, alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def load_peft_parameter_lora(directory: Union[str, "os.PathLike[str]"], backbone_model: nn.Module) -> "DeltaBase":
    """Build a :class:`~opendelta.ParameterLoraModel` on ``backbone_model`` from a PEFT LoRA
    adapter directory (with ``target_parameters``; module targets load too).

    Raises:
        CheckpointError: not a LoRA adapter, an unsupported option, keys or shapes that do not
            fit the backbone. The backbone is unchanged after a failure.
    """
    config, source = read_peft_adapter(directory)
    r, alpha = _check_config(config, source)
    file = peft_weights_file(directory)
    raw, _ = read_weights(file)
    keys = list(config.get("target_parameters") or [])
    modules = dict(candidate_modules(backbone_model))
    state: Dict[str, torch.Tensor] = {}
    module_targets: List[str] = []
    parameter_targets: List[str] = []
    shapes: Dict[str, Optional[int]] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _KEY.match(name)
        if not match:
            if "lora_" in name:
                raise CheckpointError(f"{file}: {key!r} is a LoRA tensor parameter LoRA cannot load")
            state[name.replace(".modules_to_save.default.", ".")] = value
            continue
        module_name, which = match.group("module"), match.group("which")
        depth = match.group("nest").count(".base_layer")
        module = modules.get(module_name)
        targeted = _targeted(module, module_name, keys) if module is not None else []
        if not targeted:
            if depth or module is None:
                raise CheckpointError(f"{file}: {key!r} names no module of {type(backbone_model).__name__} "
                                      "(or no parameter matching target_parameters)")
            if module_name not in module_targets:
                module_targets.append(module_name)
            state[f"{module_name}.lora.lora_{which}"] = value
            continue
        if depth >= len(targeted):
            raise CheckpointError(f"{file}: {key!r} is nested deeper than the {len(targeted)} targeted parameters of "
                                  f"{module_name!r}")
        param_name = targeted[len(targeted) - 1 - depth]
        full = f"{module_name}.{param_name}"
        if full not in parameter_targets:
            parameter_targets.append(full)
        param = module._parameters[param_name]
        shapes[full] = int(param.shape[0]) if param.dim() == 3 else None
        state[f"{full}::{which}"] = value
    if not module_targets and not parameter_targets:
        raise CheckpointError(f"{file} holds no LoRA weights")
    heads = sorted({n.rpartition(".")[0] for n in state if "::" not in n and ".lora." not in n})
    try:
        delta = get_delta_class("parameter_lora")(
            backbone_model, modified_modules=module_targets, target_parameters=parameter_targets,
            unfrozen_modules=["deltas", *heads], lora_r=r, lora_alpha=alpha,
            lora_dropout=float(config.get("lora_dropout") or 0.0))
    except Exception as err:
        raise CheckpointError(f"{source}: cannot build the parameter LoRA delta: {err}") from err
    for full in parameter_targets:
        module_name, _, param_name = full.rpartition(".")
        try:
            a, b = _from_peft(state.pop(f"{full}::A"), state.pop(f"{full}::B"), shapes[full])
        except KeyError as err:
            delta.detach()
            raise CheckpointError(f"{file}: lora_A or lora_B of {full!r} is missing") from err
        state[f"{module_name}.lora.{param_name}.lora_A"] = a
        state[f"{module_name}.lora.{param_name}.lora_B"] = b
    try:
        delta.load_delta_state_dict(state, strict=True, source=file)
    except Exception:
        delta.detach()
        raise
    return delta


__all__ = ["save_peft_parameter_lora", "load_peft_parameter_lora"]
