"""DeltaBase: finds modules by name, inserts delta layers, freezes, detaches and attaches.

A delta model never edits the backbone's code. It registers :class:`DeltaLayer` children
on the modules it modifies and hooks them in through PyTorch's forward hooks (see
:mod:`opendelta.core.layers`). The backbone stays an ordinary ``nn.Module``: it can be
deep-copied, pickled, compiled and wrapped by DDP or FSDP, deltas included.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .config import BaseDeltaConfig
from .dispatch import attach_layer, detach_layer, is_delta_parameter_name
from .layers import DeltaLayer
from .merging import MergeMixin
from ..io.checkpoint import SaveLoadMixin
from .addressing import (closest_names, endswith_in, is_child_key,
                                          is_regex_key, strip_regex_marker)
from .structure import CommonStructureMap
from .shapes import Sizes, probe_sizes, static_sizes

SUPPORTED_BACKENDS = ("hf",)
_STATE_DICT_HANDLE = "_opendelta_state_dict_handle"


def _keep_trainable_only(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                         local_metadata: Any) -> None:
    """State-dict post-hook: drop every entry of ``module`` that is not a trainable parameter.

    Evaluated at call time from ``requires_grad``, so it is right whatever was unfrozen
    later and whatever wraps the module (``nn.Sequential``, DDP's ``module.`` prefix).
    """
    trainable = {prefix + name for name, p in module.named_parameters(remove_duplicate=False)
                 if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
        del state_dict[key]


def set_trainable_state_dict(module: nn.Module, enabled: bool = True) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters (or undo it)."""
    handle = module.__dict__.pop(_STATE_DICT_HANDLE, None)
    if handle is not None:
        handle.remove()
    if enabled:
        module.__dict__[_STATE_DICT_HANDLE] = module.register_state_dict_post_hook(_keep_trainable_only)


def _legacy_common_key(key: str) -> Tuple[str, bool]:
    """Original OpenDelta marked common names with ``@`` (``attn@.q@``)."""
    return (key.replace("@", ""), True) if "@" in key else (key, False)


class DeltaBase(SaveLoadMixin, MergeMixin, nn.Module):
    """Base class of all delta models.

    Subclasses set the class attributes below and implement :meth:`add_delta`; their
    hyperparameters live in ``config_class`` (a :class:`BaseDeltaConfig` dataclass) and are
    accepted as keyword arguments of the constructor.

    Args:
        backbone_model: the model to modify, in place.
        modified_modules: keys naming the modules to modify: a plain key matches names
            ending with it on a segment boundary, a ``[r]`` key is a regular expression
            matching a tail of the name. ``None``: the method's default targets.
        exclude_modules: names (or ``[r]`` patterns matched from the start) of modules
            never modified; alone, they are subtracted from the default targets.
        unfrozen_modules: what :meth:`freeze_module` leaves trainable, default
            ``["deltas"]``.
        common_structure: ``modified_modules`` are common-structure names (``attn.q``);
            implied when ``modified_modules`` is ``None``.
        interactive_modify: pick the modules in a web page (``True`` or a port number).
        backend: training engine; ``"hf"`` (plain PyTorch / transformers).
        delta_dtype: dtype of the new delta parameters, e.g. ``torch.float32`` to keep
            trainable deltas in full precision on a bf16/fp16 backbone (run the forward
            under ``torch.autocast``); default ``None``: each target's own dtype.
        name: name of this delta, used to route examples to it; default the method's.
        **hyperparameters: fields of ``config_class``.

    Raises:
        ValueError: a key matches no module (the message lists the closest names), an
            impossible hyperparameter, an unsupported backend.
    """

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[Type[BaseDeltaConfig]] = BaseDeltaConfig
    #: default targets, in common-structure names; unmatched entries are skipped.
    default_modified_modules: ClassVar[List[str]] = []
    default_exclude_modules: ClassVar[List[str]] = []
    default_unfrozen_modules: ClassVar[List[str]] = ["deltas"]
    #: attribute name of the delta layers on the modules they modify.
    layer_name: ClassVar[str] = "delta"

    def __init__(self, backbone_model: nn.Module, modified_modules: Optional[Sequence[str]] = None,
                 exclude_modules: Optional[Sequence[str]] = None,
                 unfrozen_modules: Optional[Sequence[str]] = None,
                 common_structure: Optional[bool] = None,
                 interactive_modify: Union[bool, int] = False, backend: str = "hf",
                 name: Optional[str] = None, config: Optional[BaseDeltaConfig] = None,
                 delta_dtype: Optional["torch.dtype"] = None, **hyperparameters: Any):
        super().__init__()
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, got {type(backbone_model).__name__}")
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"backend {backend!r} is not supported; supported: {', '.join(SUPPORTED_BACKENDS)}. "
                "For large models use PyTorch's own engines with the 'hf' backend: "
                "DistributedDataParallel, FSDP2 (torch.distributed.fsdp.fully_shard), "
                "Accelerate or DeepSpeed.")
        unknown = set(hyperparameters) - set(self.config_class.hyperparameter_names())
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {sorted(unknown)}; "
                            f"its hyperparameters are {self.config_class.hyperparameter_names()}")
        if config is None:
            config = self.config_class(**hyperparameters)
        elif hyperparameters:
            config = config.copy(**hyperparameters)
        # Keep the backbone out of this module's children (it is not ours to save or move).
        self.__dict__["backbone_model"] = backbone_model
        self.backend = backend
        self.name = name or self.delta_type
        if delta_dtype is not None and not getattr(delta_dtype, "is_floating_point", False):
            raise ValueError(f"delta_dtype must be a floating torch.dtype such as torch.float32, "
                             f"got {delta_dtype!r}")
        self.delta_dtype = delta_dtype

        if interactive_modify and modified_modules is not None:
            raise ValueError("pass either modified_modules or interactive_modify, not both")
        if interactive_modify:
            from ..tools.interactive import interactive

            port = None if interactive_modify is True else int(interactive_modify)
            modified_modules = interactive(backbone_model, port=port)
            common_structure = False

        uses_defaults = modified_modules is None
        if uses_defaults:
            keys = list(self.default_modified_modules)
            common_structure = True
        else:
            if isinstance(modified_modules, str):
                raise TypeError(f"modified_modules must be a list of names, not the string "
                                f"{modified_modules!r}; write [{modified_modules!r}]")
            keys = []
            for key in modified_modules:
                key, legacy = _legacy_common_key(key)
                keys.append(key)
                common_structure = common_structure or legacy
        excludes = list(exclude_modules) if exclude_modules is not None else list(self.default_exclude_modules)
        excludes = [_legacy_common_key(e)[0] for e in excludes]

        self.config = config.copy(
            modified_modules=None if uses_defaults else keys,
            exclude_modules=excludes,
            unfrozen_modules=list(unfrozen_modules) if unfrozen_modules is not None
            else list(self.default_unfrozen_modules),
            common_structure=bool(common_structure),
            backbone_class=type(backbone_model).__name__,
            backbone_checkpoint_name=getattr(getattr(backbone_model, "config", None), "_name_or_path", None)
            or config.backbone_checkpoint_name,
        )
        self.common_structure = bool(common_structure)
        self.structure_mapping = CommonStructureMap(backbone_model) if self.common_structure else None
        self.modified_modules = keys
        self.exclude_modules = excludes
        self.unfrozen_modules = self.config.unfrozen_modules
        #: (host module name, child name, layer) for every layer this delta inserted.
        self._layers: List[Tuple[str, str, DeltaLayer]] = []
        self._hosts: Dict[str, nn.Module] = {}
        self._attached = True
        self._sets_state_dict = False

        targets = self.resolve_targets(keys, uses_defaults)
        self.layer_attr = self._free_layer_name(targets)
        try:
            self.add_all_deltas(targets)
        except BaseException:
            # Never leave a half-modified backbone behind.
            for host_name, _, layer in reversed(self._layers):
                detach_layer(self._hosts[host_name], layer)
            self._layers.clear()
            raise

    # ------------------------------------------------------------------ configuration
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Show the method's hyperparameters in help() and IDEs.
        base = inspect.signature(DeltaBase.__init__)
        params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
        config_fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=config_fields[n].default)
                 for n in cls.config_class.hyperparameter_names()]
        cls.__signature__ = base.replace(parameters=params + extra)

    @property
    def delta_config(self) -> BaseDeltaConfig:
        return self.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} is a delta model: it has modified the backbone model in place "
            "and cannot run by itself. Call the backbone model (the one passed as backbone_model) "
            "instead.")

    @classmethod
    def from_config(cls, config: Union[BaseDeltaConfig, Dict[str, Any]], backbone_model: nn.Module,
                    **overrides: Any) -> "DeltaBase":
        """Build a delta model from a config object or dict; keyword ``overrides`` win."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        config = config.copy(**{k: v for k, v in overrides.items()
                                if k in cls.config_class.field_names()})
        rest = {k: v for k, v in overrides.items() if k not in cls.config_class.field_names()}
        return cls(backbone_model, modified_modules=config.modified_modules,
                   exclude_modules=config.exclude_modules, unfrozen_modules=config.unfrozen_modules,
                   common_structure=config.common_structure, config=config, **rest)

    # ------------------------------------------------------------------ addressing
    def find_key(self, key: str, target_list: Sequence[str]) -> bool:
        """Whether module name ``key`` matches ``target_list`` (translated to its common
        name first when this delta uses common structure)."""
        if self.structure_mapping is not None:
            key = self.structure_mapping.transform(key)
            if not key:
                return False
        return endswith_in(key, list(target_list))

    def _is_excluded(self, name: str, common: Optional[str]) -> bool:
        for key in self.exclude_modules:
            for candidate in (name, common):
                if candidate is None:
                    continue
                if is_regex_key(key):
                    if re.match(strip_regex_marker(key), candidate):
                        return True
                elif is_child_key(candidate, [key]):
                    return True
        return False

    def _candidate_modules(self) -> Iterator[Tuple[str, nn.Module]]:
        """Named modules of the backbone, without delta layers and what is inside them."""
        stack: List[Tuple[str, nn.Module]] = [("", self.backbone_model)]
        while stack:
            name, module = stack.pop()
            yield name, module
            children = [(f"{name}.{n}" if name else n, c) for n, c in module._modules.items()
                        if c is not None and not isinstance(c, DeltaLayer)]
            stack.extend(reversed(children))

    def resolve_targets(self, keys: Sequence[str], uses_defaults: bool = False) -> List[str]:
        """Full names of the modules matched by ``keys`` and not excluded, in model order.

        Raises:
            ValueError: a user key matched no module, or the defaults matched nothing.
        """
        mapping = self.structure_mapping
        hits = {key: 0 for key in keys}
        excluded_hits = {key: 0 for key in keys}
        names, targets, seen = [], [], set()
        for name, module in self._candidate_modules():
            if id(module) in seen:
                continue
            names.append(name)
            common = mapping.transform(name) if mapping is not None else None
            key_name = common if mapping is not None else name
            if not key_name:
                continue
            matched = [k for k in keys if endswith_in(key_name, [k])]
            if not matched:
                continue
            if self._is_excluded(name, common):
                for k in matched:
                    excluded_hits[k] += 1
                continue
            for k in matched:
                hits[k] += 1
            seen.add(id(module))
            targets.append(name)
        if uses_defaults:
            if not targets:
                raise ValueError(
                    f"{type(self).__name__}'s default targets {list(keys)} match no module of "
                    f"{type(self.backbone_model).__name__} (after excluding {self.exclude_modules}); "
                    "pass modified_modules explicitly")
            return targets
        for key, count in hits.items():
            if count:
                continue
            if excluded_hits[key]:
                raise ValueError(f"modified_modules entry {key!r} only matches excluded modules "
                                 f"(exclude_modules={self.exclude_modules})")
            pool = ([mapping.transform(n) for n in names if mapping.transform(n)]
                    if mapping is not None else names)
            close = closest_names(key, pool)
            hint = f"; closest module names: {close}" if close else ""
            space = "common-structure names" if mapping is not None else "module names"
            raise ValueError(f"modified_modules entry {key!r} matches no module of "
                             f"{type(self.backbone_model).__name__} ({space}){hint}")
        return targets

    def _free_layer_name(self, targets: Sequence[str]) -> str:
        """``layer_name``, or ``layer_name_1``, ... : the first name that no module of the
        backbone uses for a child or attribute, so that one delta has one name everywhere."""
        modules = [m for _, m in self._candidate_modules()]
        candidate, i = self.layer_name, 0
        while any(candidate in m._modules or candidate in m._parameters or candidate in m.__dict__
                  for m in modules):
            i += 1
            candidate = f"{self.layer_name}_{i}"
        return candidate

    # ------------------------------------------------------------------ building
    def add_all_deltas(self, targets: Sequence[str]) -> None:
        modules = dict(self.backbone_model.named_modules())
        for name in targets:
            self.add_delta(name, modules[name])

    def add_delta(self, name: str, module: nn.Module) -> None:
        """Create this method's layer(s) for the module called ``name`` and insert them
        with :meth:`insert_layer`."""
        raise NotImplementedError

    def insert_layer(self, host_name: str, layer: DeltaLayer, child_name: Optional[str] = None) -> None:
        """Register ``layer`` on the module called ``host_name`` and hook it in."""
        host = self.backbone_model.get_submodule(host_name) if host_name else self.backbone_model
        child_name = child_name or self.layer_attr
        layer.delta_name = self.name  # a plain str: deepcopy / pickle keep it; route() reads it
        attach_layer(host, child_name, layer)
        self._layers.append((host_name, child_name, layer))
        self._hosts[host_name] = host

    def module_sizes(self, name: str, module: nn.Module) -> Sizes:
        """``(in, out)`` features of a target, from the module, else by a dummy forward."""
        sizes = static_sizes(module)
        if sizes is None:
            sizes = probe_sizes(self.backbone_model, [name])[name]
        return sizes

    def factory_kwargs(self, module: nn.Module) -> Dict[str, Any]:
        """``device`` and ``dtype`` for new deltas on ``module``: those of its first floating
        parameter, the dtype overridden by ``delta_dtype`` when given."""
        dtype = getattr(self, "delta_dtype", None)
        for p in module.parameters():
            if p.is_floating_point():
                return {"device": p.device, "dtype": dtype or p.dtype}
        return {"dtype": dtype} if dtype is not None else {}

    # ------------------------------------------------------------------ attach / detach
    @property
    def is_attached(self) -> bool:
        return self._attached

    def _check_module(self, module: Optional[nn.Module]) -> None:
        if module is not None and module is not self.backbone_model:
            raise ValueError("this delta model was built on another module; pass its backbone or None")

    def detach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """Take the delta out: the backbone computes exactly what it did before.

        The layers are kept by this object, so :meth:`attach` puts them back unchanged.
        """
        self._check_module(module)
        if not self._attached:
            return
        self._prepare_detach()  # a merged delta is unmerged first (see opendelta.core.merging)
        for host_name, _, layer in self._layers:
            detach_layer(self._hosts[host_name], layer)
        self._attached = False
        if reset_state_dict and self._sets_state_dict:
            set_trainable_state_dict(self.backbone_model, False)

    def attach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """Put a detached delta back, in the same place and order as before."""
        self._check_module(module)
        if self._attached:
            return
        for host_name, child_name, layer in self._layers:
            attach_layer(self._hosts[host_name], child_name, layer)
        self._attached = True
        self._finish_attach()  # re-merges what detach() unmerged (see opendelta.core.merging)
        if reset_state_dict and self._sets_state_dict:
            set_trainable_state_dict(self.backbone_model, True)

    # ------------------------------------------------------------------ parameters
    def delta_layers(self) -> List[Tuple[str, DeltaLayer]]:
        """``(full child name, layer)`` of every layer of this delta."""
        out, seen = [], set()
        for host_name, child_name, layer in self._layers:
            if id(layer) not in seen:
                seen.add(id(layer))
                out.append((f"{host_name}.{child_name}" if host_name else child_name, layer))
        return out

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        """This delta's parameters, named as in the backbone."""
        seen = set()
        for layer_name, layer in self.delta_layers():
            for n, p in layer.named_parameters(remove_duplicate=remove_duplicate):
                if remove_duplicate and id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{prefix}{layer_name}.{n}"), p

    def num_delta_parameters(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    # ------------------------------------------------------------------ freezing
    def freeze_module(self, module: Optional[nn.Module] = None, exclude: Optional[Sequence[str]] = None,
                      set_state_dict: bool = True) -> None:
        """Freeze every parameter except delta parameters and the modules in ``exclude``.

        Args:
            module: the module to freeze; default the backbone.
            exclude: what stays trainable: ``"deltas"`` means all delta parameters; other
                keys follow name-based addressing (a module or parameter name ending with
                the key on a segment boundary, ``[r]`` regular expressions, and common
                names when this delta uses common structure). Default ``unfrozen_modules``.
            set_state_dict: make ``module.state_dict()`` hold only trainable parameters.

        Raises:
            ValueError: a key of ``exclude`` (other than ``"deltas"``) matches nothing.
        """
        module = self.backbone_model if module is None else module
        exclude = list(self.unfrozen_modules if exclude is None else exclude)
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a list, not the string {exclude!r}")
        keep_deltas = "deltas" in exclude
        keys = [k for k in exclude if k != "deltas"]
        mapping = self.structure_mapping or CommonStructureMap.load(self.backbone_model)
        hits = {k: 0 for k in keys}
        for name, param in module.named_parameters():
            if is_delta_parameter_name(module, name):
                param.requires_grad_(keep_deltas)
                continue
            matched = self._exclusion_matches(name, keys, mapping if module is self.backbone_model else None)
            for k in matched:
                hits[k] += 1
            param.requires_grad_(bool(matched))
        missing = [k for k, n in hits.items() if n == 0]
        if missing:
            names = [n for n, _ in module.named_modules() if n]
            hint = {k: closest_names(k, names) for k in missing}
            raise ValueError(f"freeze_module exclude entries {missing} match no module or parameter; "
                             f"closest names: {hint}")
        self._sets_state_dict = set_state_dict
        set_trainable_state_dict(module, set_state_dict)

    @staticmethod
    def _exclusion_matches(param_name: str, keys: Sequence[str],
                           mapping: Optional[CommonStructureMap]) -> List[str]:
        parts = param_name.split(".")
        out = []
        for key in keys:
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if endswith_in(prefix, [key]):
                    out.append(key)
                    break
                common = mapping.transform(prefix) if mapping is not None and i < len(parts) else None
                if common and endswith_in(common, [key]):
                    out.append(key)
                    break
        return out

    # ------------------------------------------------------------------ reporting
    def log(self, module: Optional[nn.Module] = None, delta_ratio: bool = True,
            trainable_ratio: bool = True, visualization: bool = True, cuda_memory: bool = True) -> None:
        """Print the model tree (if ``visualization``) and parameter counts and ratios."""
        from ..tools.inspect import log_model

        log_model(self.backbone_model if module is None else module, delta_ratio=delta_ratio,
                  trainable_ratio=trainable_ratio, visualization=visualization, cuda_memory=cuda_memory)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (f"{type(self).__name__}(name={self.name!r}, {len(self._layers)} layers on "
                f"{type(self.backbone_model).__name__}, {state})")
