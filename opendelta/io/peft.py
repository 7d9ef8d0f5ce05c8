"""Exchange LoRA deltas with PEFT (``huggingface/peft``) without depending on it.

PEFT's LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``); the update is ``B @ A @ x * lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), exactly our :class:`~opendelta.delta_models.lora.LoraLayer`. Backbone modules
PEFT trains whole (``modules_to_save``, e.g. a classifier head) are stored under
``base_model.model.<module>.<param>``. GPT-2's ``Conv1D`` stores its weight as
``[in, out]``; PEFT marks it with ``fan_in_fan_out`` (which only matters when merging: its
``lora_A``/``lora_B`` have the same shapes as ours).

* :func:`save_peft_lora` writes a LoRA delta (and the backbone parameters left trainable)
  as a PEFT adapter that ``peft.PeftModel.from_pretrained`` loads.
* :func:`load_peft_lora` builds a :class:`LoraModel` from a PEFT LoRA adapter directory;
  ``AutoDeltaModel.from_finetuned`` and ``LoraModel.from_finetuned`` call it for a
  directory holding ``adapter_config.json`` and no ``config.json``.

rsLoRA, DoRA, PiSSA and OLoRA travel both ways (:mod:`opendelta.io.peft_lora_variants`);
PEFT IA3 adapters load through :mod:`opendelta.io.peft_ia3`. Options our LoRA does not
compute (per-module ranks, LoRA on embeddings, trained biases, ...) are refused with a
message naming the option.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type, Union

import torch
from torch import nn

from ..core.fields import integer, number
from .files import (PEFT_CONFIG_NAME, CheckpointError, peft_weights_file, read_json_object, read_peft_adapter,
                    read_weights, write_peft_adapter)
from ..core.shapes import is_conv1d_transposed
from .state import trainable_backbone_tensors
from .peft_ia3 import load_peft_ia3, save_peft_ia3
from .peft_parameters import load_peft_parameter_lora, save_peft_parameter_lora
from .peft_lora_variants import MAGNITUDE_KEY, export_options, export_tensors, import_options

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<host>.+)\.lora_(?P<which>A|B)\.weight$")
#: adapter_config.json options whose non-default values our LoRA cannot reproduce.
_UNSUPPORTED = {"lora_bias": False, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                "alora_invocation_tokens": None}


def _name_or_path(backbone: nn.Module) -> Optional[str]:
    """Where the backbone was loaded from: its config's public ``name_or_path`` (the private
    ``_name_or_path`` behind it only where a config lacks the property), or ``None``."""
    config = getattr(backbone, "config", None)
    name = getattr(config, "name_or_path", None)
    if name is None:
        name = getattr(config, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def save_peft_lora(delta: "DeltaBase", directory: Union[str, "os.PathLike[str]"],
                   base_model_name_or_path: Optional[str] = None) -> str:
    """Write a LoRA delta as a PEFT adapter directory, as one transaction (see
    :mod:`opendelta.io.transaction`): every checkpoint file already in ``directory`` (a
    ``save_finetuned`` checkpoint's ``config.json`` and ``model.safetensors`` too) is
    replaced, so the directory holds exactly this adapter; other files are kept.

    Args:
        delta: a :class:`LoraModel`.
        directory: where to write ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model_name_or_path: recorded for PEFT; default the backbone's
            ``config.name_or_path`` (where it was loaded from; ``None`` if built from a config).

    Returns:
        the absolute path of the directory.
    """
    if delta.delta_type == "ia3":  # PEFT's IA3 format: see peft_ia3.py
        return save_peft_ia3(delta, directory, base_model_name_or_path)
    if delta.delta_type == "parameter_lora":  # LoRA with target_parameters: see peft_parameters.py
        return save_peft_parameter_lora(delta, directory, base_model_name_or_path)
    if delta.delta_type != "lora":
        raise TypeError(f"only LoRA, IA3 and parameter LoRA deltas have a PEFT format; this is a "
                        f"{delta.delta_type!r} delta")
    backbone = delta.backbone_model
    hosts: List[str] = []
    tensors: Dict[str, torch.Tensor] = {}
    conv1d = False
    for host_name, _, layer in delta.layer_entries():
        host = backbone.get_submodule(host_name) if host_name else backbone
        conv1d = conv1d or is_conv1d_transposed(host)
        hosts.append(host_name)
        for suffix, tensor in export_tensors(layer).items():  # variants: see peft_lora_variants.py
            tensors[f"{PREFIX}{host_name}.{suffix}"] = tensor
    # Backbone modules left trainable travel whole, as PEFT's modules_to_save.
    trainable = trainable_backbone_tensors(delta)
    modules_to_save = sorted({name.rpartition(".")[0] for name in trainable})
    for module_name in modules_to_save:
        module = backbone.get_submodule(module_name)
        for pname, param in module.named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = param
    meta = [k for k, v in tensors.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"cannot export tensors on the meta device ({meta[:3]}...)")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    cfg = delta.config
    name = base_model_name_or_path or _name_or_path(backbone)
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": name or None,
        "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        # Full module names: PEFT matches a target equal to the name or ending with ".target".
        "target_modules": hosts, "fan_in_fan_out": conv1d, "bias": "none",
        "use_rslora": False, "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    adapter_config.update(export_options(cfg))  # rank, alpha and the variant flags
    return write_peft_adapter(directory, adapter_config, tensors)


def read_peft_config(directory: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    return read_json_object(os.path.join(os.fspath(directory), PEFT_CONFIG_NAME),
                            "not a PEFT adapter directory")


def load_peft_lora(directory: Union[str, "os.PathLike[str]"], backbone_model: nn.Module,
                   delta_class: Optional[Type["DeltaBase"]] = None) -> "DeltaBase":
    """Build a LoRA delta on ``backbone_model`` from a PEFT LoRA adapter directory.

    Raises:
        CheckpointError: not a LoRA adapter, an option our LoRA cannot compute, keys that
            do not fit the backbone. The backbone is unchanged after a failure.
    """
    directory = os.fspath(directory)
    config, source = read_peft_adapter(directory)  # after recovery; two formats are refused
    if str(config.get("peft_type", "")).upper() == "IA3":  # PEFT's IA3 adapters: see peft_ia3.py
        return load_peft_ia3(directory, backbone_model)
    if config.get("target_parameters"):  # LoRA on parameters (MoE experts): see peft_parameters.py
        return load_peft_parameter_lora(directory, backbone_model)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA; only "
                              "PEFT LoRA adapters can be loaded")
    for option, default in _UNSUPPORTED.items():
        if config.get(option, default) not in (default, None, False, [], {}):
            raise CheckpointError(f"{source}: {option}={config[option]!r} is not supported by "
                                  "opendelta's LoRA; only plain LoRA adapters load")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: bias={config['bias']!r} is not supported (trained biases); "
                              "only bias='none' adapters load")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{source}: rank_pattern/alpha_pattern (per-module ranks) are not "
                              "supported: opendelta's LoRA has one rank")
    try:  # the same rules as LoraConfig's fields
        integer(minimum=1).check(PEFT_CONFIG_NAME, "r", config.get("r"))
        number().check(PEFT_CONFIG_NAME, "lora_alpha", config.get("lora_alpha", 8))
        number(minimum=0, maximum=1, exclusive_maximum=True).check(PEFT_CONFIG_NAME, "lora_dropout",
                                                                   config.get("lora_dropout", 0.0))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    variant = import_options(config, source)  # use_rslora, use_dora, init_lora_weights
    file = peft_weights_file(directory)
    raw, _ = read_weights(file)

    hosts: List[str] = []
    lora: Dict[str, torch.Tensor] = {}
    backbone_tensors: Dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _LORA_KEY.match(name)
        if variant["use_dora"] and name.endswith("." + MAGNITUDE_KEY):
            lora[f"{name[:-len(MAGNITUDE_KEY) - 1]}.M"] = value
        elif match:
            host = match.group("host")
            if host not in hosts:
                hosts.append(host)
            lora[f"{host}.{match.group('which')}"] = value
        elif "lora_" in name:
            raise CheckpointError(f"{file}: {key!r} is a LoRA tensor opendelta cannot load "
                                  "(LoRA on embeddings, ...)")
        else:
            backbone_tensors[name.replace(".modules_to_save.default.", ".")] = value
    if not hosts:
        raise CheckpointError(f"{file} holds no LoRA weights (no '*.lora_A.weight' keys)")

    if delta_class is None:
        from ..core.registry import get_delta_class

        delta_class = get_delta_class("lora")
    try:
        # PEFT's modules_to_save were trained whole: freeze_module() keeps them trainable.
        heads = sorted({name.rpartition(".")[0] for name in backbone_tensors})
        delta = delta_class(backbone_model, modified_modules=list(hosts), unfrozen_modules=["deltas", *heads],
                            lora_r=r, lora_alpha=alpha, lora_dropout=float(config.get("lora_dropout", 0.0)),
                            **variant)
    except Exception as err:  # the failed construction took out what it inserted
        raise CheckpointError(f"{source}: cannot build the LoRA delta on "
                              f"{type(backbone_model).__name__}: {err}") from err
    state: Dict[str, torch.Tensor] = dict(backbone_tensors)
    child = type(delta).layer_name
    for host in hosts:
        for which in ("A", "B"):
            if f"{host}.{which}" not in lora:
                delta.detach()
                raise CheckpointError(f"{file}: {host}.lora_{which}.weight is missing")
            state[f"{host}.{child}.lora_{which}"] = lora[f"{host}.{which}"]
        if variant["use_dora"] and f"{host}.M" in lora:  # DoRA's magnitude vector
            state[f"{host}.{child}.{MAGNITUDE_KEY}"] = lora[f"{host}.M"]
    try:
        delta.load_delta_state_dict(state, strict=True, source=file)
    except Exception:
        delta.detach()
        raise
    return delta


__all__ = ["load_peft_lora", "read_peft_config", "save_peft_lora"]
