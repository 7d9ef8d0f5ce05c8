"""Helpers of ``from_finetuned``: which config and class a checkpoint asks for, and the
backbone-hash check."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..core.config import BaseDeltaConfig
from ..core.registry import get_delta_class
from .files import PEFT_CONFIG_NAME, STRUCTURE_HASH_KEY, BackboneHashWarning, CheckpointError
from .hashing import gen_model_hash, has_meta_parameters, is_comparable_hash

logger = logging.getLogger(__name__)


def _same_type(a: str, b: str) -> bool:
    return a.lower().replace("-", "_") == b.lower().replace("-", "_")


def _own_class(cls: type, delta_type: str) -> bool:
    """``cls`` itself describes ``delta_type`` (a user's method need not be registered)."""
    own = getattr(cls, "delta_type", "")
    return bool(own) and _same_type(own, delta_type)


def build_config(cls: type, config: Union[BaseDeltaConfig, Dict[str, Any]], source: str) -> BaseDeltaConfig:
    if isinstance(config, BaseDeltaConfig):
        return config
    delta_type = config.get("delta_type")
    if delta_type is None:
        delta_type = getattr(cls, "delta_type", "") or None
    if delta_type is not None and not isinstance(delta_type, str):
        raise CheckpointError(f"{source}: delta_type must be a string naming the method (e.g. 'lora'), "
                              f"got {delta_type!r} ({type(delta_type).__name__})")
    if not delta_type:
        raise CheckpointError(f"{source} has no 'delta_type': it cannot tell which delta to build")
    if _own_class(cls, delta_type):
        delta_class: Any = cls
    else:
        try:
            delta_class = get_delta_class(delta_type)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from err
    try:
        return delta_class.config_class.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source} holds an invalid {delta_type} config: {err}") from err


def class_for(cls: type, config: BaseDeltaConfig, source: str) -> type:
    if _own_class(cls, config.delta_type):
        return cls
    try:
        delta_class = get_delta_class(config.delta_type)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    if getattr(cls, "delta_type", "") and not issubclass(delta_class, cls) and not issubclass(cls, delta_class):
        raise CheckpointError(f"{source} holds a {config.delta_type!r} delta, not a {cls.delta_type!r} "
                              f"one: load it with {delta_class.__name__}.from_finetuned or "
                              "AutoDeltaModel.from_finetuned")
    return cls if getattr(cls, "delta_type", "") and issubclass(cls, delta_class) else delta_class


def lora_class_for(cls: type, peft_config: Optional[Dict[str, Any]] = None) -> type:
    """The class that loads a PEFT adapter directory for ``cls.from_finetuned``: LoRA, IA3
    (``peft_type`` IA3) or parameter LoRA (``target_parameters``).

    Raises:
        CheckpointError: ``cls`` is another method than the adapter's.
    """
    config = peft_config or {}
    if str(config.get("peft_type", "")).upper() == "IA3":
        wanted, label = get_delta_class("ia3"), "IA3"
    elif config.get("target_parameters"):
        wanted, label = get_delta_class("parameter_lora"), "LoRA-on-parameters"
    else:
        wanted, label = get_delta_class("lora"), "LoRA"
    if getattr(cls, "delta_type", "") and not issubclass(cls, wanted):
        raise CheckpointError(f"the directory holds a PEFT {label} adapter ({PEFT_CONFIG_NAME}); load it "
                              f"with {wanted.__name__}.from_finetuned or AutoDeltaModel.from_finetuned")
    return cls if getattr(cls, "delta_type", "") else wanted


def check_backbone_hash(backbone: nn.Module, config: BaseDeltaConfig, tensors: Dict[str, torch.Tensor],
                         strict: bool, source: str) -> None:
    saved = config.backbone_hash
    structure_saved = config.extra.get(STRUCTURE_HASH_KEY)
    if saved is not None and not is_comparable_hash(saved):
        logger.info("%s: backbone_hash %s was written by OpenDelta 0.3.x (another recipe); "
                    "not compared", source, saved)
        return
    structure_now = gen_model_hash(backbone, with_parameters=False)
    if has_meta_parameters(backbone) or (structure_saved and structure_saved != structure_now):
        # Values cannot (meta device) or need not (another structure) be compared.
        saved, current = structure_saved, structure_now
        what = "structure (module tree, parameter shapes or dtypes)"
    else:
        backbone_keys = set(dict(backbone.named_parameters()))
        skip = [k for k in tensors if k in backbone_keys]
        current = gen_model_hash(backbone, skip_parameters=skip) if saved else None
        what = "parameters"
    if not saved or saved == current:
        return
    message = (f"the backbone's {what} differ from those the delta in {source} was trained on: "
               f"saved hash {saved}, this backbone's {current}. Outputs may not be what was "
               "trained. Pass check_hash=False to silence this check, strict_hash=True to make it "
               "an error.")
    if strict:
        raise CheckpointError(message)
    warnings.warn(message, BackboneHashWarning, stacklevel=3)


#: config.json key recording ``delta_dtype`` (e.g. ``"float32"``).
DELTA_DTYPE_KEY = "delta_dtype"


def with_saved_dtype(config: BaseDeltaConfig, overrides: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``overrides`` plus the ``delta_dtype`` the checkpoint recorded (unless overridden)."""
    name = config.extra.get(DELTA_DTYPE_KEY)
    if name is None or "delta_dtype" in overrides:
        return overrides
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{source}: delta_dtype {name!r} is not a floating torch dtype")
    return {**overrides, "delta_dtype": dtype}
