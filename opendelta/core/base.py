"""DeltaBase: finds modules by name, inserts delta layers, freezes, detaches and attaches.

A delta model never edits the backbone's code. It registers :class:`DeltaLayer` children
on the modules it modifies and hooks them in through PyTorch's forward hooks (see
:mod:`opendelta.core.dispatch`). The backbone stays an ordinary ``nn.Module``: it can be
deep-copied, pickled, compiled and wrapped by DDP or FSDP, deltas included.

**A delta model is an honest ``nn.Module``: it owns its layers.** Each layer is a child of
its host in the backbone *and* of a small mirror tree inside the delta model, at the same
path (``bert.encoder.layer.0.attention.self.query.lora``). So ``delta.state_dict()``,
``delta.parameters()``, ``delta.to(...)``, ``delta.train()`` / ``eval()`` act on exactly
the delta's layers, attached or not; the backbone is not a child (it is not the delta's to
save or move). We keep ``nn.Module`` rather than a plain object because the original
library's ``DeltaBase`` was one, and users call ``parameters()`` on it for optimizers.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .config import BaseDeltaConfig
from .addressing import endswith_in
from .construction import (SUPPORTED_BACKENDS, backbone_name_or_path, build_from_config, check_arguments,
                           hyperparameter_init, new_tensor_options, split_legacy)
from .dispatch import attach_layer, detach_layer
from .extension import ExtensionMixin
from .freezing import DELTAS, freeze, normalise_exclude, set_trainable_state_dict
from .layer_tree import Transaction, disown_layer, own_layer
from .layers import DeltaLayer, DeltaLifecycle, LayerEntry
from .merging import MergeMixin
from .shapes import Sizes, probe_sizes, static_sizes
from .structure import CommonStructureMap, TowerStructureMap, structure_map_for
from .targets import (backbone_module, candidate_modules, check_keys, free_child_name, required_structure_map, resolve,
                      scoped_defaults, tower_keys)
from ..io.checkpoint import SaveLoadMixin



class DeltaBase(SaveLoadMixin, MergeMixin, ExtensionMixin, nn.Module):
    """Base class of all delta models.

    Built-in methods set the class attributes below and implement :meth:`add_delta` (or
    :meth:`add_all_deltas`); their hyperparameters live in ``config_class`` (a
    :class:`BaseDeltaConfig` dataclass) and are accepted as keyword arguments. Methods
    written the way the OpenDelta manual documents (``update_module`` with
    ``insert_sequential_module`` / ``insert_parallel_module`` / ``replace_module``, see
    :mod:`opendelta.core.extension`) call ``add_all_delta_to_backbone`` themselves.

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
            implied when ``modified_modules`` is ``None`` for built-in methods.
        interactive_modify: pick the modules in a web page (``True`` or a port number).
        backend: training engine; ``"hf"`` (plain PyTorch / transformers).
        delta_dtype: dtype of the new delta parameters, e.g. ``torch.float32`` to keep
            trainable deltas in full precision on a bf16/fp16 backbone; they compute in
            their dtype and return the host's. Default ``None``: each target's own dtype.
        name: name of this delta, used to route examples to it; default the method's.
        config: a config object to build from (keyword hyperparameters override it).
        **hyperparameters: fields of ``config_class``.

    Raises:
        ValueError: a key matches no module (the message lists the closest names), an
            impossible hyperparameter, an unsupported backend.
    """

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[Type[BaseDeltaConfig]] = BaseDeltaConfig
    #: default targets; common-structure names for built-in methods (and keys marked with
    #: ``@``), plain module names otherwise. Unmatched entries are skipped.
    default_modified_modules: ClassVar[List[str]] = []
    default_exclude_modules: ClassVar[List[str]] = []
    default_unfrozen_modules: ClassVar[List[str]] = [DELTAS]
    #: child name of the delta layers on the modules they modify.
    layer_name: ClassVar[str] = "delta"

    # Instance state (declared for readers and type checkers; see DeltaModelProtocol).
    backbone_model: nn.Module
    config: BaseDeltaConfig
    lifecycle: DeltaLifecycle
    name: str
    layer_attr: str
    structure_mapping: Optional[CommonStructureMap]

    def __init__(self, backbone_model: nn.Module, modified_modules: Optional[Sequence[str]] = None,
                 exclude_modules: Optional[Sequence[str]] = None,
                 unfrozen_modules: Optional[Sequence[str]] = None,
                 interactive_modify: Union[bool, int] = False, common_structure: Optional[bool] = None,
                 backend: str = "hf", *, name: Optional[str] = None, config: Optional[BaseDeltaConfig] = None,
                 delta_dtype: Optional[torch.dtype] = None, **hyperparameters: Any):
        super().__init__()
        check_arguments(type(self), backbone_model, backend, hyperparameters, delta_dtype, name)
        if config is None:
            config = self.config_class(**hyperparameters)
        elif hyperparameters:
            config = config.copy(**hyperparameters)
        # Keep the backbone out of this module's children (it is not ours to save or move).
        self.__dict__["backbone_model"] = backbone_model
        self.backend = backend
        self.name = name or self.delta_type or type(self).__name__
        self.delta_dtype = delta_dtype
        self.lifecycle = DeltaLifecycle()
        self._layers: List[LayerEntry] = []
        self._hosts: Dict[str, nn.Module] = {}

        if interactive_modify and modified_modules is not None:
            raise ValueError("pass either modified_modules or interactive_modify, not both")
        if interactive_modify:
            from ..tools.interactive import interactive

            port = None if interactive_modify is True else int(interactive_modify)
            modified_modules = interactive(backbone_model, port=port)
            common_structure = False
        uses_defaults = modified_modules is None
        if modified_modules is None:
            keys, marked = split_legacy(self.default_modified_modules)
            common_structure = marked or (self.builds_in_init() and common_structure is not False)
        else:
            keys, marked = split_legacy(check_keys(modified_modules, "modified_modules"))
            common_structure = bool(common_structure) or marked
        # Keys written the original library's way ("attn@.q@") keep its rule: a key that only
        # matches excluded modules is ignored (our own rule raises, never a silent no-op).
        self._legacy_keys = marked and not uses_defaults
        raw_excludes = self.default_exclude_modules if exclude_modules is None else exclude_modules
        excludes, _ = split_legacy(check_keys(raw_excludes, "exclude_modules"))
        unfrozen = normalise_exclude(self.default_unfrozen_modules if unfrozen_modules is None
                                     else unfrozen_modules, "unfrozen_modules")
        self.config = config.copy(
            modified_modules=None if uses_defaults else keys, exclude_modules=excludes,
            unfrozen_modules=unfrozen, common_structure=bool(common_structure),
            backbone_class=type(backbone_model).__name__,
            backbone_checkpoint_name=backbone_name_or_path(backbone_model)
            or config.backbone_checkpoint_name)
        if not self.config.delta_type and self.delta_type:  # a user's config class names no method
            object.__setattr__(self.config, "delta_type", self.delta_type)  # shadows the ClassVar
        towers = self._tower_keys(keys) if not uses_defaults and self.builds_in_init() else {}
        if towers:  # ["a"]: tower a's default targets (a user model holding known backbones)
            keys, self._optional_keys = scoped_defaults(keys, towers, split_legacy(self.default_modified_modules)[0])
            common_structure = True
        self._target_keys = keys
        self.structure_mapping = self._structure_map() if common_structure else None
        if isinstance(self.structure_mapping, TowerStructureMap):  # recorded with the checkpoint
            self.config.extra["towers"] = {p: t for p, t in sorted(self.structure_mapping.model_types.items())}
        self.layer_attr = free_child_name(backbone_model, self.layer_name)
        if self.builds_in_init():
            targets = self.resolve_targets(keys, uses_defaults)
            with self.transaction():
                self.add_all_deltas(targets)

    # ------------------------------------------------------------------ configuration
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = hyperparameter_init(cls, DeltaBase.__init__)
        if init is not None:  # built-in methods: the original's signature, hyperparameters first
            cls.__init__ = init  # type: ignore[method-assign]

    @classmethod
    def builds_in_init(cls) -> bool:
        """Whether the constructor inserts the layers itself (built-in methods, which
        implement :meth:`add_delta` or :meth:`add_all_deltas`), rather than the subclass
        calling :meth:`add_all_delta_to_backbone` (the manual's way)."""
        return cls.add_delta is not DeltaBase.add_delta or cls.add_all_deltas is not DeltaBase.add_all_deltas

    def _structure_map(self) -> Any:
        return required_structure_map(type(self).__name__, self.backbone_model)

    def _tower_keys(self, keys: Sequence[str]) -> Dict[str, str]:  # overridden by SoftPrompt
        return tower_keys(self.backbone_model, keys)
    @property
    def delta_config(self) -> BaseDeltaConfig:
        return self.config

    # The config is the single source of truth for what the delta was built with.
    @property
    def modified_modules(self) -> List[str]:
        """The keys the targets were resolved from (the defaults when none were given)."""
        return list(self._target_keys)

    @property
    def exclude_modules(self) -> List[str]:
        return list(self.config.exclude_modules or [])

    @property
    def unfrozen_modules(self) -> List[str]:
        return list(self.config.unfrozen_modules or [DELTAS])

    @unfrozen_modules.setter
    def unfrozen_modules(self, value: Sequence[str]) -> None:
        self.config.unfrozen_modules = normalise_exclude(value, "unfrozen_modules")

    @property
    def common_structure(self) -> bool:
        return bool(self.config.common_structure)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} is a delta model: it has modified the backbone model in "
                           "place and cannot run by itself. Call the backbone model (the one passed as "
                           "backbone_model) instead.")

    @classmethod
    def from_config(cls, config: Union[BaseDeltaConfig, Dict[str, Any]], backbone_model: nn.Module,
                    check_hash: bool = True, **kwargs: Any) -> "DeltaBase":
        """Build a delta model from a config object or dict; keyword arguments win.

        ``check_hash`` is accepted for the documented signature; a config has no weights,
        so there is nothing to compare (``from_finetuned`` checks the backbone hash).
        """
        return build_from_config(cls, config, backbone_model, kwargs)

    # ------------------------------------------------------------------ addressing
    def find_key(self, key: str, target_list: Sequence[str]) -> bool:
        """Whether module name ``key`` matches ``target_list`` (translated to its common
        name first when this delta uses common structure)."""
        name: Optional[str] = key
        if self.structure_mapping is not None:
            name = self.structure_mapping.transform(key)
        return bool(name) and endswith_in(str(name), list(target_list))

    def resolve_targets(self, keys: Sequence[str], uses_defaults: bool = False) -> List[str]:
        """Full names of the modules matched by ``keys`` and not excluded, in model order.

        Raises:
            ValueError: a user key matched no module, or the defaults matched nothing.
        """
        skipped: Optional[List[str]] = [] if self._legacy_keys else None
        targets = resolve(self.backbone_model, keys, self.exclude_modules, self.structure_mapping,
                          uses_defaults=uses_defaults, owner=type(self).__name__, skipped=skipped,
                          optional=getattr(self, "_optional_keys", ()))
        if skipped:  # legacy keys with no effect: drop them so a re-save stays loadable
            self._target_keys = [k for k in self._target_keys if k not in skipped]
            if self.config.modified_modules is not None:
                self.config.modified_modules = [k for k in self.config.modified_modules if k not in skipped]
        return targets

    # ------------------------------------------------------------------ building
    def add_all_deltas(self, targets: Sequence[str]) -> None:
        """Insert this method's layers for every target (default: :meth:`add_delta` each)."""
        modules = dict(candidate_modules(self.backbone_model))
        for name in targets:
            self.add_delta(name, modules[name])

    def add_delta(self, name: str, module: nn.Module) -> None:
        """Create this method's layer(s) for the module called ``name`` and insert them
        with :meth:`insert_layer`."""
        raise NotImplementedError(f"{type(self).__name__} implements neither add_delta nor update_module")

    def insert_layer(self, host_name: str, layer: DeltaLayer, child_name: Optional[str] = None) -> LayerEntry:
        """Register ``layer`` on the module called ``host_name`` (``""``: the backbone),
        hook it in, and make it part of this delta model."""
        host = backbone_module(self.backbone_model, host_name)
        child_name = child_name or self.layer_attr
        layer.delta_name = self.name  # a plain str: deepcopy / pickle keep it; route() reads it
        entry = LayerEntry(host_name, child_name, layer)
        if self.lifecycle.attached:
            attach_layer(host, child_name, layer)
        self._layers.append(entry)
        self._hosts[host_name] = host
        own_layer(self, entry)
        return entry

    def remove_layer(self, entry: LayerEntry) -> None:
        """Take one layer out of the backbone and out of this delta model for good."""
        if self.lifecycle.attached:
            detach_layer(self._hosts[entry.host_name], entry.layer)
        self._layers.remove(entry)
        disown_layer(self, entry)

    def transaction(self) -> Transaction:
        """A block that removes the layers it inserted when it raises: a construction that
        fails part-way leaves the backbone as it was."""
        return Transaction(self)

    def module_sizes(self, name: str, module: nn.Module) -> Sizes:
        """``(in, out)`` features of a target, from the module, else by a dummy forward."""
        return static_sizes(module) or probe_sizes(self.backbone_model, [name])[name]

    def factory_kwargs(self, module: nn.Module) -> Dict[str, Any]:
        """``device`` and ``dtype`` for new deltas on ``module`` (see :func:`new_tensor_options`)."""
        return new_tensor_options(module, self.delta_dtype)

    # ------------------------------------------------------------------ the layer tree
    def layer_entries(self) -> Tuple[LayerEntry, ...]:
        """Every layer this delta inserted, in insertion order."""
        return tuple(self._layers)

    def host_module(self, host_name: str) -> nn.Module:
        """The backbone module called ``host_name`` that hosts layers of this delta."""
        return self._hosts[host_name]

    def delta_layers(self) -> List[Tuple[str, DeltaLayer]]:
        """``(full child name in the backbone, layer)`` of every layer of this delta."""
        return [(f"{e.host_name}.{e.child_name}" if e.host_name else e.child_name, e.layer)
                for e in self._layers]

    def num_delta_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ attach / detach
    @property
    def is_attached(self) -> bool:
        return self.lifecycle.attached

    def _check_module(self, module: Optional[nn.Module]) -> None:  # the documented `module` argument
        if module is not None and module is not self.backbone_model:
            raise ValueError("this delta model was built on another module; pass its backbone or None")

    def detach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """Take the delta out: the backbone computes exactly what it did before.

        The layers stay in this delta model, so :meth:`attach` puts them back unchanged.
        A merged delta is unmerged first (see :mod:`opendelta.core.merging`).
        """
        self._check_module(module)
        if not self.lifecycle.attached:
            return
        self._prepare_detach()
        for entry in reversed(self._layers):
            detach_layer(self._hosts[entry.host_name], entry.layer)
        self.lifecycle.attached = False
        if reset_state_dict and self.lifecycle.filters_state_dict:
            set_trainable_state_dict(self.backbone_model, False)

    def attach(self, module: Optional[nn.Module] = None, reset_state_dict: bool = True) -> None:
        """Put a detached delta back, in the same place and order as before; all or nothing.

        Raises:
            ValueError: a host already has another child under one of this delta's names
                (e.g. a delta built on the module while this one was detached); nothing
                was attached.
        """
        self._check_module(module)
        if self.lifecycle.attached:
            return
        self._check_reattachable()
        for entry in self._layers:
            taken = self._hosts[entry.host_name]._modules.get(entry.child_name)
            if taken is not None and taken is not entry.layer and taken is not entry.layer.__dict__.get("original"):
                raise ValueError(
                    f"cannot attach {self.name!r}: {entry.host_name or 'the backbone'!r} now has another "
                    f"child named {entry.child_name!r} ({type(taken).__name__}); detach or remove that "
                    "delta first. Nothing was attached.")
        for entry in self._layers:
            attach_layer(self._hosts[entry.host_name], entry.child_name, entry.layer)
        self.lifecycle.attached = True
        self._finish_attach()
        if reset_state_dict and self.lifecycle.filters_state_dict:
            set_trainable_state_dict(self.backbone_model, True)

    # ------------------------------------------------------------------ freezing
    def freeze_module(self, module: Optional[nn.Module] = None, exclude: Optional[Sequence[str]] = None,
                      set_state_dict: bool = True) -> None:
        """Freeze every parameter except delta parameters and the modules in ``exclude``.

        Args:
            module: the module to freeze; default the backbone.
            exclude: what stays trainable: ``"deltas"`` means all delta parameters; other
                keys follow name-based addressing (a module or parameter name ending with
                the key on a segment boundary, ``[r]`` regular expressions, and common
                names when the backbone's architecture is known). A bare string is one
                key. Default ``unfrozen_modules``.
            set_state_dict: make ``module.state_dict()`` hold only trainable parameters.

        Raises:
            ValueError: a key of ``exclude`` (other than ``"deltas"``) matches nothing;
                nothing was changed.
        """
        target: nn.Module = self.backbone_model if module is None else module
        keys = normalise_exclude(self.unfrozen_modules if exclude is None else exclude)
        mapping = None
        if target is self.backbone_model:
            mapping = self.structure_mapping or structure_map_for(self.backbone_model, skip=(DeltaLayer,))
        freeze(target, keys, mapping, set_state_dict)
        if target is self.backbone_model:
            self.lifecycle.filters_state_dict = set_state_dict

    # ------------------------------------------------------------------ reporting
    def log(self, module: Optional[nn.Module] = None, delta_ratio: bool = True,
            trainable_ratio: bool = True, visualization: bool = True, cuda_memory: bool = True) -> None:
        """Print the model tree (if ``visualization``) and parameter counts and ratios."""
        from ..tools.inspect import log_model

        log_model(self.backbone_model if module is None else module, delta_ratio=delta_ratio,
                  trainable_ratio=trainable_ratio, visualization=visualization, cuda_memory=cuda_memory)

    def extra_repr(self) -> str:
        state = "attached" if self.lifecycle.attached else "detached"
        return (f"name={self.name!r}, {len(self._layers)} layers on "
                f"{type(self.backbone_model).__name__}, {state}")


__all__ = ["DeltaBase", "set_trainable_state_dict", "SUPPORTED_BACKENDS"]
