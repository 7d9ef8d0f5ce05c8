"""The documented way to write your own delta method (OpenDelta manual 1.14.2 / 1.20.2).

A method subclasses :class:`~opendelta.DeltaBase`; its ``__init__`` calls
``DeltaBase.__init__(self, backbone_model, modified_modules=..., ...)``, stores its own
arguments, then ``self.add_all_delta_to_backbone(self.backbone_model,
self.modified_modules)``. That calls :meth:`ExtensionMixin.update_module` for every module
the keys match; ``update_module`` finds the module with :meth:`~ExtensionMixin.find_module`
and applies one of three operations to it:

* :meth:`~ExtensionMixin.insert_sequential_module`: ``m.pre_forward(*args, **kwargs)``
  returns new ``(args, kwargs)`` for the module, ``m.post_forward(output)`` its new output
  (either may be absent);
* :meth:`~ExtensionMixin.insert_parallel_module`: ``m(*args, **kwargs)`` is added to the
  module's output;
* :meth:`~ExtensionMixin.replace_module`: the module is replaced by a new one.

Nothing rebinds ``forward``: the user's module is wrapped in a :class:`UserDeltaLayer`
that shares its parameters, buffers and children (so names stay
``<module>.<delta_name>.<its parameter>``) and runs through the same hooks as the built-in
methods. A method written this way gets every mechanic of the library: ``freeze_module``,
trainable-only ``state_dict``, ``log()``, exact ``detach``/``attach`` (a replaced module
gets its original object back), several deltas per module, ``deepcopy``/pickling,
``save_finetuned``/``from_finetuned`` and per-example routing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .dispatch import current_routing
from .freezing import set_trainable_state_dict
from .layers import DeltaLayer, LayerEntry, primary_tensor, replace_primary_tensor
from .protocol import DeltaModelProtocol
from .targets import candidate_modules

METHODS = ("sequential", "parallel")


def _module_name(delta: DeltaModelProtocol, module: nn.Module) -> str:
    for name, candidate in candidate_modules(delta.backbone_model):
        if candidate is module:
            return name
    raise ValueError(f"the {type(module).__name__} given is not a module of this delta's backbone "
                     f"({type(delta.backbone_model).__name__})")


class UserDeltaLayer(DeltaLayer):
    """A delta layer around a user's module, sharing its parameters, buffers and children.

    The user's module is kept by reference (``self.module``, not a child) and keeps its
    own ``forward``, ``pre_forward`` and ``post_forward``; ``train()``/``eval()`` reach it.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if isinstance(module, DeltaLayer):
            raise TypeError(f"{type(module).__name__} is already a delta layer; insert it with "
                            "DeltaBase.insert_layer instead")
        self.__dict__["module"] = module
        # One set of tensors under one name: these dicts *are* the user module's.
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._modules = module._modules
        self._non_persistent_buffers_set = module._non_persistent_buffers_set

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("module")
            if module is None:
                raise
            return getattr(module, name)

    def train(self, mode: bool = True) -> "UserDeltaLayer":
        super().train(mode)
        self.__dict__["module"].training = mode
        return self

    def extra_repr(self) -> str:
        return f"wraps={type(self.__dict__['module']).__name__}"


class SequentialUserLayer(UserDeltaLayer):
    """``insert_sequential_module``: the user's ``pre_forward`` / ``post_forward``."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.uses_pre_hook = callable(getattr(module, "pre_forward", None))
        self.uses_post_hook = callable(getattr(module, "post_forward", None))
        if not (self.uses_pre_hook or self.uses_post_hook):
            raise TypeError(f"{type(module).__name__} has neither pre_forward nor post_forward; a "
                            "sequential delta module needs at least one of them")

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        result = self.__dict__["module"].pre_forward(*args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise TypeError(f"{type(self.__dict__['module']).__name__}.pre_forward must return "
                            f"(args, kwargs), got {type(result).__name__}")
        new_args, new_kwargs = result
        return tuple(new_args), new_kwargs

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        return self.__dict__["module"].post_forward(output)


class ParallelUserLayer(UserDeltaLayer):
    """``insert_parallel_module``: ``module(*args, **kwargs)`` is added to the host's output
    (to its hidden states when the output is a tuple)."""

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        hidden = primary_tensor(output)
        return replace_primary_tensor(output, hidden + self.__dict__["module"](*args, **kwargs))


class ReplacementLayer(UserDeltaLayer):
    """``replace_module``: stands in its parent for the original module, and runs the
    user's new module instead. Parameters reached through the original module (a new
    module that wraps it) stay backbone parameters."""

    replaces_child = True
    uses_post_hook = False

    def __init__(self, module: nn.Module, original: nn.Module):
        super().__init__(module)
        self.__dict__["original"] = original

    def owns_parameter(self, name: str) -> bool:
        original = {id(p) for p in self.__dict__["original"].parameters()}
        return id(self.get_parameter(name)) not in original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = current_routing()
        if routing is not None:
            selected = routing.selects(self.delta_name)
            if selected is None:
                raise ValueError(f"the replaced module of delta {self.delta_name!r} cannot run on "
                                 "a subset of the batch; route the whole batch to one name")
            if not selected:
                return self.__dict__["original"](*args, **kwargs)
        return self.__dict__["module"](*args, **kwargs)


class ExtensionMixin:
    """The documented extension API of :class:`~opendelta.DeltaBase`."""

    def add_all_delta_to_backbone(self: DeltaModelProtocol, backbone: nn.Module,
                                  modified_modules: Sequence[str]) -> nn.Module:
        """Call :meth:`update_module` for every module of ``backbone`` that
        ``modified_modules`` matches (and no exclude key excludes); all or nothing.

        Returns:
            the modified backbone.
        """
        if backbone is not self.backbone_model:
            raise ValueError("add_all_delta_to_backbone must be given this delta's backbone_model")
        # The manual's pattern keeps the hyperparameters as attributes named like the config's
        # fields (``self.rank = rank``): they are what this delta is built with.
        stored = {n: self.__dict__[n] for n in type(self.config).hyperparameter_names() if n in self.__dict__}
        if stored:
            self.config = self.config.copy(**stored)
        targets = self.resolve_targets(list(modified_modules), uses_defaults=self.config.modified_modules is None)
        with self.transaction():
            for key in targets:
                self.update_module(backbone, key)
        return backbone

    def update_module(self, module: nn.Module, key: str) -> None:
        """Modify the submodule of ``module`` called ``key`` (implemented by each method,
        typically with :meth:`find_module` and one of the three insert/replace operations)."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_module(module, key)")

    def modify_module(self, module: nn.Module) -> None:
        """Modify the parameters inside ``module`` (for methods that need it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement modify_module")

    def find_module(self, root_module: nn.Module, key: str) -> Tuple[nn.Module, str, nn.Module]:
        """``(parent module, child name, module)`` of the submodule of ``root_module`` called
        ``key``; for ``key == ""``: ``(root_module, "", root_module)``.

        Raises:
            ValueError: no such submodule; the message names the missing part.
        """
        if key == "":
            return root_module, "", root_module
        parts = key.split(".")
        parent = root_module
        for i, part in enumerate(parts[:-1]):
            child = parent._modules.get(part)
            if child is None:
                raise ValueError(f"{type(root_module).__name__} has no submodule {'.'.join(parts[:i + 1])!r}")
            parent = child
        module = parent._modules.get(parts[-1])
        if module is None:
            raise ValueError(f"{type(root_module).__name__} has no submodule {key!r}")
        return parent, parts[-1], module


    def insert_module(self: DeltaModelProtocol, module: nn.Module, method: str = "sequential",
                      delta_module: Optional[nn.Module] = None, delta_name: str = "delta", strict: bool = False,
                      _delta_info: Optional[Dict[str, Any]] = None) -> LayerEntry:
        """Insert ``delta_module`` into ``module``'s computation (``method``: ``"sequential"``
        or ``"parallel"``, see the module docs) as its child ``delta_name``.

        Args:
            strict: refuse to modify a module that already hosts delta layers.
            _delta_info: accepted for the documented signature; re-attaching is
                :meth:`attach`'s job here, so it must be ``None``.

        Raises:
            ValueError: unknown ``method``; ``module`` is not in the backbone; its child
                ``delta_name`` exists; ``strict`` and ``module`` is already modified.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if delta_module is None:
            raise ValueError("delta_module is required: the module to insert")
        if _delta_info is not None:
            raise ValueError("_delta_info is not used by opendelta: detach() and attach() keep the "
                             "inserted modules themselves")
        host_name = _module_name(self, module)
        if strict and any(isinstance(c, DeltaLayer) for c in module._modules.values()):
            raise ValueError(f"{host_name!r} already hosts a delta (strict=True)")
        if delta_name in module._modules or delta_name in module._parameters or delta_name in module.__dict__:
            raise ValueError(f"{host_name!r} already has an attribute or child {delta_name!r}; "
                             "choose another delta_name")
        layer = SequentialUserLayer(delta_module) if method == "sequential" else ParallelUserLayer(delta_module)
        return self.insert_layer(host_name, layer, delta_name)

    def insert_sequential_module(self: DeltaModelProtocol, module: nn.Module, delta_module: Optional[nn.Module] = None,
                                 delta_name: str = "delta", strict: bool = False,
                                 _delta_info: Optional[Dict[str, Any]] = None) -> LayerEntry:
        """Run ``delta_module.pre_forward`` before and/or ``delta_module.post_forward`` after
        ``module``. See :meth:`insert_module`."""
        return ExtensionMixin.insert_module(self, module, "sequential", delta_module, delta_name, strict, _delta_info)

    def insert_parallel_module(self: DeltaModelProtocol, module: nn.Module, delta_module: Optional[nn.Module] = None,
                               delta_name: str = "delta", strict: bool = False,
                               _delta_info: Optional[Dict[str, Any]] = None) -> LayerEntry:
        """Add ``delta_module(*args, **kwargs)`` (the arguments ``module`` got) to
        ``module``'s output. See :meth:`insert_module`."""
        return ExtensionMixin.insert_module(self, module, "parallel", delta_module, delta_name, strict, _delta_info)

    def replace_module(self: DeltaModelProtocol, parent_module: nn.Module, child_name: str, child_module: nn.Module,
                       new_module: nn.Module, delta_name: str = "delta") -> LayerEntry:
        """Put ``new_module`` in ``parent_module`` in place of its child ``child_name``
        (``child_module``); ``detach()`` puts ``child_module`` back, the same object.

        ``new_module`` may hold ``child_module`` (a wrapper): the original's parameters stay
        backbone parameters. ``delta_name`` names the delta in error messages.
        """
        if parent_module._modules.get(child_name) is not child_module:
            raise ValueError(f"{child_module.__class__.__name__} is not the child {child_name!r} of the "
                             f"{type(parent_module).__name__} given")
        parent_name = _module_name(self, parent_module)
        layer = ReplacementLayer(new_module, child_module)
        layer.__dict__["replacement_name"] = delta_name
        return self.insert_layer(parent_name, layer, child_name)

    def set_active_state_dict(self: DeltaModelProtocol, module: nn.Module) -> None:
        """Make ``module.state_dict()`` return only its trainable parameters (what
        ``freeze_module(set_state_dict=True)`` does)."""
        set_trainable_state_dict(module, True)
        if module is self.backbone_model:
            self.lifecycle.filters_state_dict = True


def delta_state_tensors(layer: DeltaLayer) -> Dict[str, Any]:
    """The tensors of ``layer`` that belong to the delta (all of them, except what a
    :class:`ReplacementLayer` reaches through the module it replaced)."""
    tensors = layer.state_dict(keep_vars=True)
    owns = getattr(layer, "owns_parameter", None)
    if owns is None:
        return tensors
    params = dict(layer.named_parameters())
    return {k: v for k, v in tensors.items() if k not in params or owns(k)}


__all__: List[str] = ["ExtensionMixin", "UserDeltaLayer", "SequentialUserLayer", "ParallelUserLayer",
                      "ReplacementLayer", "delta_state_tensors"]
