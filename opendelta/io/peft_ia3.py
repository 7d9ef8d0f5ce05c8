"""Exchange IA3 deltas with PEFT (``huggingface/peft``) without depending on it.

PEFT's IA3 adapter directory holds ``adapter_config.json`` (``peft_type: "IA3"``,
``target_modules``, ``feedforward_modules``, ``fan_in_fan_out``, ``modules_to_save``) and
``adapter_model.safetensors`` with one key per targeted module,
``base_model.model.<module>.ia3_l``: shape ``[out_features, 1]`` where the output is
scaled, ``[1, in_features]`` where the input is (feed-forward modules). Our
:class:`~opendelta.methods.ia3.IA3Layer` holds the same vector flat (``ia3_l``,
``[features]``) and computes the same products, so the conversion is a reshape.

* :func:`save_peft_ia3` writes an IA3 delta (and backbone parameters left trainable, as
  ``modules_to_save``) as a PEFT adapter that ``peft.PeftModel.from_pretrained`` loads.
* :func:`load_peft_ia3` builds an :class:`~opendelta.methods.ia3.IA3Model` from a PEFT IA3
  adapter directory (``AutoDeltaModel.from_finetuned`` reaches it through
  :func:`opendelta.io.peft.load_peft_lora` for ``peft_type: "IA3"``).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..core.shapes import is_conv1d_transposed
from .files import CheckpointError, peft_weights_file, read_peft_adapter, read_weights, write_peft_adapter
from .state import trainable_backbone_tensors

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

PREFIX = "base_model.model."
_IA3_KEY = re.compile(r"^(?P<host>.+)\.ia3_l(?:\.weight)?$")


def _origin(backbone: nn.Module) -> Optional[str]:
    """The backbone config's ``name_or_path`` (where it was loaded from), or ``None``."""
    config = getattr(backbone, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def save_peft_ia3(delta: "DeltaBase", directory: Union[str, "os.PathLike[str]"],
                  base_model_name_or_path: Optional[str] = None) -> str:
    """Write an IA3 delta as a PEFT IA3 adapter directory (atomically).

    Args:
        delta: an :class:`~opendelta.methods.ia3.IA3Model`.
        directory: where to write ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model_name_or_path: recorded for PEFT; default the backbone's
            ``config.name_or_path``.

    Returns:
        the absolute path of the directory.

    Raises:
        TypeError: ``delta`` is not an IA3 delta.
        CheckpointError: tensors on the meta device.
    """
    if delta.delta_type != "ia3":
        raise TypeError(f"save_peft_ia3 writes IA3 deltas; this is a {delta.delta_type!r} delta "
                        "(LoRA: opendelta.save_peft_lora)")
    backbone = delta.backbone_model
    hosts: List[str] = []
    feedforward: List[str] = []
    tensors: Dict[str, torch.Tensor] = {}
    conv1d = False
    for host_name, _, layer in delta.layer_entries():
        host = backbone.get_submodule(host_name) if host_name else backbone
        conv1d = conv1d or is_conv1d_transposed(host)
        hosts.append(host_name)
        vector: torch.Tensor = layer.ia3_l  # type: ignore[assignment]
        if layer.is_feedforward:
            feedforward.append(host_name)
            tensors[f"{PREFIX}{host_name}.ia3_l"] = vector.view(1, -1)
        else:
            tensors[f"{PREFIX}{host_name}.ia3_l"] = vector.view(-1, 1)
    trainable = trainable_backbone_tensors(delta)
    modules_to_save = sorted({name.rpartition(".")[0] for name in trainable})
    for module_name in modules_to_save:
        for pname, param in backbone.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = param
    meta = [k for k, v in tensors.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"cannot export tensors on the meta device ({meta[:3]}...)")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    adapter_config = {
        "peft_type": "IA3", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or _origin(backbone),
        # Full module names: PEFT matches a target equal to the name or ending with ".target",
        # and a feed-forward module ending with an entry.
        "target_modules": hosts, "feedforward_modules": feedforward, "fan_in_fan_out": conv1d,
        "modules_to_save": modules_to_save or None, "init_ia3_weights": True, "exclude_modules": None,
    }
    return write_peft_adapter(directory, adapter_config, tensors)


def _is_feedforward(host: str, rule: Any) -> bool:
    """PEFT's test: a list matches a name ending with one of its entries; a string is a
    regular expression the whole name must match."""
    if rule is None:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, host) is not None
    return any(host.endswith(str(entry)) for entry in rule)


def load_peft_ia3(directory: Union[str, "os.PathLike[str]"], backbone_model: nn.Module,
                  delta_class: Optional[type] = None) -> "DeltaBase":
    """Build an IA3 delta on ``backbone_model`` from a PEFT IA3 adapter directory.

    Which modules scale their input is read from ``feedforward_modules`` (PEFT's rule) and
    checked against each vector's shape. Modules PEFT trained whole (``modules_to_save``)
    are loaded into the backbone and stay trainable under ``freeze_module()``.

    Raises:
        CheckpointError: not an IA3 adapter, no IA3 weights, a vector whose shape does not
            fit its module, keys that do not fit the backbone. The backbone is unchanged
            after a failure.
    """
    config, source = read_peft_adapter(directory)
    if str(config.get("peft_type", "")).upper() != "IA3":
        raise CheckpointError(f"{source}: peft_type {config.get('peft_type')!r} is not IA3")
    file = peft_weights_file(directory)
    raw, _ = read_weights(file)
    vectors: Dict[str, torch.Tensor] = {}
    backbone_tensors: Dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _IA3_KEY.match(name)
        if match:
            vectors[match.group("host")] = value
        else:
            backbone_tensors[name.replace(".modules_to_save.default.", ".")] = value
    if not vectors:
        raise CheckpointError(f"{file} holds no IA3 weights (no '*.ia3_l' keys)")
    hosts = list(vectors)
    feedforward = [h for h in hosts if _is_feedforward(h, config.get("feedforward_modules"))]
    for host, value in vectors.items():
        is_ff = host in feedforward
        if value.dim() != 2 or value.shape[0 if is_ff else 1] != 1:
            wanted = "[1, in_features] (a feed-forward module: its input is scaled)" if is_ff \
                else "[out_features, 1] (its output is scaled)"
            raise CheckpointError(f"{file}: {host}.ia3_l has shape {tuple(value.shape)}; PEFT's IA3 "
                                  f"vector of this module must be {wanted}")
    if delta_class is None:
        from ..core.registry import get_delta_class

        delta_class = get_delta_class("ia3")
    heads = sorted({name.rpartition(".")[0] for name in backbone_tensors})
    try:
        delta = delta_class(backbone_model, modified_modules=hosts, feedforward_modules=feedforward or [],
                            unfrozen_modules=["deltas", *heads])
    except Exception as err:  # the failed construction took out what it inserted
        raise CheckpointError(f"{source}: cannot build the IA3 delta on "
                              f"{type(backbone_model).__name__}: {err}") from err
    child = type(delta).layer_name
    state = dict(backbone_tensors)
    state.update({f"{host}.{child}.ia3_l": value.reshape(-1) for host, value in vectors.items()})
    try:
        delta.load_delta_state_dict(state, strict=True, source=file)
    except Exception:
        delta.detach()
        raise
    return delta


__all__ = ["load_peft_ia3", "save_peft_ia3"]
