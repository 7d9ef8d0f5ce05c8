"""Checks and helpers for building a delta model: constructor arguments, the original
library's ``@`` key markers, the signature shown by ``help()``, and ``from_config``."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import BaseDeltaConfig
from .shapes import tensor_options

SUPPORTED_BACKENDS = ("hf",)


def check_arguments(owner: type, backbone_model: Any, backend: str, hyperparameters: Dict[str, Any],
                    delta_dtype: Optional[torch.dtype], name: Optional[str]) -> None:
    """Raise the documented errors for bad constructor arguments of ``owner``."""
    if not isinstance(backbone_model, nn.Module):
        raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"backend {backend!r} is not supported; supported: {', '.join(SUPPORTED_BACKENDS)}. "
            "For large models use PyTorch's own engines with the 'hf' backend: "
            "DistributedDataParallel, FSDP2 (torch.distributed.fsdp.fully_shard), "
            "Accelerate or DeepSpeed.")
    known = owner.config_class.hyperparameter_names()  # type: ignore[attr-defined]
    unknown = set(hyperparameters) - set(known)
    if unknown:
        raise TypeError(f"{owner.__name__} got unexpected argument(s) {sorted(unknown)}; "
                        f"its hyperparameters are {known}")
    if delta_dtype is not None and not getattr(delta_dtype, "is_floating_point", False):
        raise ValueError(f"delta_dtype must be a floating torch.dtype such as torch.float32, got {delta_dtype!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string, got {name!r}")


def split_legacy(keys: Sequence[str]) -> Tuple[List[str], bool]:
    """``keys`` without the original library's ``@`` markers of common-structure names
    (``attn@.q@``), and whether any key had one."""
    stripped = [k.replace("@", "") for k in keys]
    return stripped, any("@" in k for k in keys)


#: the arguments every built-in method takes after its hyperparameters, in the original's order
BASE_ARGUMENTS = ("modified_modules", "exclude_modules", "unfrozen_modules", "common_structure",
                  "interactive_modify", "backend")


def hyperparameter_init(cls: type, base_init: Any) -> Optional[Any]:
    """An ``__init__`` for a built-in method ``cls`` (a dataclass config, no ``__init__`` of
    its own) whose signature is the original library's: ``(backbone_model, <hyperparameters
    in config order>, modified_modules, exclude_modules, unfrozen_modules, common_structure,
    interactive_modify, backend, *, name, config, delta_dtype)``, so that ``help()`` shows
    the hyperparameters and ``LoraModel(model, 16)`` sets ``lora_r`` as it did there.
    ``None`` for classes with their own ``__init__``."""
    config_class: Any = getattr(cls, "config_class", None)
    inherited = getattr(cls, "__init__", None)
    # A hand-written __init__ (here or in a parent below DeltaBase) is the method's own.
    if "__init__" in cls.__dict__ or not (inherited is base_init or getattr(inherited, "_opendelta_generated", False)):
        return None
    if not dataclasses.is_dataclass(config_class):
        return None
    base = inspect.signature(base_init).parameters
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    names = [n for n in config_class.hyperparameter_names() if n in fields]  # type: ignore[union-attr]
    kind = inspect.Parameter
    params = [base["self"], base["backbone_model"]]
    for n in names:
        f = fields[n]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else kind.empty)
        params.append(kind(n, kind.POSITIONAL_OR_KEYWORD, default=default))
    params += [base[n].replace(kind=kind.POSITIONAL_OR_KEYWORD) for n in BASE_ARGUMENTS]
    params += [base[n].replace(kind=kind.KEYWORD_ONLY) for n in base
               if n not in ("self", "backbone_model", *BASE_ARGUMENTS) and base[n].kind is not kind.VAR_KEYWORD]
    signature = inspect.Signature(params)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {unknown}; its hyperparameters "
                            f"are {names}")
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}{str(signature).replace('(self, ', '(', 1)}: {err}") from None
        arguments = dict(bound.arguments)
        arguments.pop("self")
        base_init(self, **arguments)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = base_init.__doc__
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__._opendelta_generated = True  # type: ignore[attr-defined]
    return __init__


def build_from_config(cls: Any, config: Any, backbone_model: nn.Module, kwargs: Dict[str, Any]) -> Any:
    """``cls.from_config``: a built-in method gets the config object; a method written the
    manual's way (its own ``__init__``) gets the config's values by argument name."""
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    if not isinstance(config, BaseDeltaConfig):
        raise TypeError(f"config must be a BaseDeltaConfig or a dict, got {type(config).__name__}")
    fields = set(config.field_names())
    config = config.copy(**{k: v for k, v in kwargs.items() if k in fields})
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    init = vars(cls).get("__init__")
    if cls.builds_in_init() or init is None or getattr(init, "_opendelta_generated", False):
        return cls(backbone_model, modified_modules=config.modified_modules,
                   exclude_modules=config.exclude_modules, unfrozen_modules=config.unfrozen_modules,
                   common_structure=config.common_structure, config=config, **rest)
    accepted = inspect.signature(cls.__init__).parameters
    values = {**config.to_dict(), **rest}
    return cls(backbone_model, **{k: v for k, v in values.items() if k in accepted and k != "backbone_model"})


def new_tensor_options(module: nn.Module, delta_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """``device`` and ``dtype`` for new delta tensors on ``module`` (quantized layers
    included), the dtype overridden by ``delta_dtype`` when given; see
    :func:`opendelta.core.shapes.tensor_options`."""
    return tensor_options(module, delta_dtype)


def backbone_name_or_path(model: nn.Module) -> Optional[str]:
    """The name or path a transformers backbone was loaded from (its config's public
    ``name_or_path``), or ``None``."""
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None)
    if name is None:
        name = getattr(config, "_name_or_path", None)
    return str(name) if name else None
