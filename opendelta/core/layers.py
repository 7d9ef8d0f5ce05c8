"""The modules that deltas insert into a backbone, and how they are hooked in.

A :class:`DeltaLayer` is registered as a child of the module it modifies (its *host*), so
its parameters get names such as ``...query.lora.lora_A`` and travel with the backbone
through ``deepcopy``, ``torch.save``, ``.to()``, DDP and FSDP. The host's forward is never
replaced: one forward pre-hook and one forward hook per host (module-level functions,
registered with ``with_kwargs=True``) run the host's attached delta layers in order.

Order on one host, as documented by OpenDelta: layers acting *after* the host (and parallel
ones) run in the order they were added; layers acting *before* it run last-added first.
"""
from __future__ import annotations

import inspect
import itertools
from contextvars import ContextVar
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

_SEQUENCE = itertools.count()

#: attribute on a host module: the child names of its attached delta layers, in insertion
#: order. Names rather than modules, so that shallow replicas (``nn.DataParallel``) resolve
#: their own copies.
HOST_LAYERS = "_opendelta_layers"
#: attribute on a host module holding the handles of the two dispatch hooks.
HOST_HANDLES = "_opendelta_hook_handles"
#: attributes on a host module: child names of the layers its pre-hook / post-hook run, in
#: run order, precomputed by :func:`refresh_hooks` so the hot path does no filtering or sorting.
#: Merged layers (folded into the host's weights) are left out.
HOST_PRE = "_opendelta_pre_layers"
HOST_POST = "_opendelta_post_layers"
#: the per-example routing in force (an :class:`opendelta.route.Routing`), set by
#: :func:`opendelta.route`; ``None``: every attached delta runs on every example.
ROUTING: ContextVar[Any] = ContextVar("opendelta_routing", default=None)
#: number of ``route`` blocks open in any thread. The hot path tests this plain int first:
#: cheaper than the ContextVar, and traceable by ``torch.compile`` (ContextVar.get is not).
ROUTING_BLOCKS = 0


class DeltaLayer(nn.Module):
    """Base class of every module a delta inserts into a backbone.

    Subclasses override :meth:`pre_forward` (set ``uses_pre_hook = True``) to change the
    host's inputs, and/or :meth:`post_forward` (``uses_post_hook = True``) to change its
    output. Both receive the host, its positional and keyword arguments.
    """

    uses_pre_hook: bool = False
    uses_post_hook: bool = True
    #: name of the delta model that inserted this layer (``DeltaBase.name``, set by
    #: ``DeltaBase.insert_layer``); :func:`opendelta.route` selects layers by it.
    delta_name: Optional[str] = None
    #: whether :func:`opendelta.route` may run this layer on a subset of the batch rows.
    #: Layers that change the sequence length (prefixes, soft prompts) set it to False.
    supports_routing: bool = True

    def __init__(self) -> None:
        super().__init__()
        # Global creation order; fixes the run order among layers sharing a host.
        self.sequence_number = next(_SEQUENCE)

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
                    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        """Return new ``(args, kwargs)`` for the host, or ``None`` to keep them."""
        return None

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: Any) -> Any:
        """Return the host's (possibly modified) output."""
        return output

    def forward(self, *args, **kwargs):  # pragma: no cover - explained error
        raise RuntimeError(
            f"{type(self).__name__} is a delta layer: it runs through hooks on the module it "
            "modifies. Call the backbone model instead.")


class OutputAdapterLayer(DeltaLayer):
    """A layer that transforms its host's hidden-state output with :meth:`adapt`.

    The host's output may be a tensor or a tuple whose first element is the hidden states;
    only those are changed. Adapter, LowRankAdapter and Compacter layers are of this kind.
    """

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden] -> [..., hidden]``."""
        raise NotImplementedError

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: Any) -> Any:
        return replace_primary_tensor(output, self.adapt(primary_tensor(output)))


# --------------------------------------------------------------------------- hidden states
def primary_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor inside a module output: the tensor itself or element 0."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(
        f"cannot find the hidden states in a module output of type {type(value).__name__}; "
        "target a module that returns a tensor or a tuple whose first element is one")


def replace_primary_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its hidden-state tensor (see :func:`primary_tensor`) replaced."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def primary_input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
    """The hidden-state input of a module call: first positional tensor or ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "hidden_state", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise TypeError("cannot find the hidden-state input of the module call: it has no positional "
                    "tensor and no 'hidden_states' keyword")


def replace_primary_input(args: Tuple[Any, ...], kwargs: Dict[str, Any], tensor: torch.Tensor
                          ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    if args and isinstance(args[0], torch.Tensor):
        return (tensor, *args[1:]), kwargs
    for key in ("hidden_states", "hidden_state", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: tensor}
    raise TypeError("cannot find the hidden-state input of the module call")


_POSITIONAL_NAMES: Dict[type, Tuple[str, ...]] = {}


def call_as_kwargs(host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """All arguments of a call of ``host`` by name, the positional ones named after the
    parameters of its class's ``forward`` (read once per class, not per call).

    A pre-hook that needs arguments by name returns ``((), call_as_kwargs(...))``.
    """
    if not args:
        return dict(kwargs)
    cls = type(host)
    names = _POSITIONAL_NAMES.get(cls)
    if names is None:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
        if any(p.kind is p.POSITIONAL_ONLY for p in params):
            raise TypeError(f"{cls.__name__}.forward has positional-only parameters; a delta cannot "
                            "pass them by name")
        names = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        _POSITIONAL_NAMES[cls] = names
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}.forward got {len(args)} positional arguments; it takes {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


# --------------------------------------------------------------------------- dispatch hooks
# The two hooks below run on every forward of every modified module: they read precomputed
# name tuples and do nothing else unless a routing is in force (one global int test).
def _run_pre_hooks(host: nn.Module, args, kwargs):
    if ROUTING_BLOCKS:
        routing = ROUTING.get()
        if routing is not None:
            from ..route import routed_pre_hooks

            return routed_pre_hooks(host, host.__dict__[HOST_PRE], args, kwargs, routing)
    changed = False
    children = host._modules
    # Already in run order: last added first for layers acting before the host.
    for name in host.__dict__[HOST_PRE]:
        result = children[name].pre_forward(host, args, kwargs)
        if result is not None:
            args, kwargs = result
            changed = True
    return (args, kwargs) if changed else None


def _run_post_hooks(host: nn.Module, args, kwargs, output):
    if ROUTING_BLOCKS:
        routing = ROUTING.get()
        if routing is not None:
            from ..route import routed_post_hooks

            return routed_post_hooks(host, host.__dict__[HOST_POST], args, kwargs, output, routing)
    children = host._modules
    for name in host.__dict__[HOST_POST]:
        output = children[name].post_forward(host, args, kwargs, output)
    return output


def refresh_hooks(host: nn.Module) -> None:
    """(Re)register the dispatch hooks of ``host`` to match its attached, unmerged layers
    (called after attaching, detaching, merging or unmerging a layer)."""
    for handle in getattr(host, HOST_HANDLES, ()):
        handle.remove()
    names = host.__dict__.get(HOST_LAYERS, ())
    if not names:
        for attr in (HOST_LAYERS, HOST_HANDLES, HOST_PRE, HOST_POST):
            if attr in host.__dict__:
                delattr(host, attr)
        return
    active = [(n, host._modules[n]) for n in names if not getattr(host._modules[n], "merged", False)]
    pre = tuple(n for n, layer in reversed(active) if layer.uses_pre_hook)
    post = tuple(n for n, layer in active if layer.uses_post_hook)
    host.__dict__[HOST_PRE], host.__dict__[HOST_POST] = pre, post
    handles = []
    if pre:
        handles.append(host.register_forward_pre_hook(_run_pre_hooks, with_kwargs=True))
    if post:
        handles.append(host.register_forward_hook(_run_post_hooks, with_kwargs=True))
    host.__dict__[HOST_HANDLES] = tuple(handles)


def attach_layer(host: nn.Module, name: str, layer: DeltaLayer) -> None:
    """Register ``layer`` as child ``name`` of ``host`` and hook it into the host's forward.

    Layers of a host are kept in creation order (children and hooks alike), so detaching
    and re-attaching a layer puts it back exactly where it was.
    """
    existing = host._modules.get(name)
    if existing is not None and existing is not layer:
        raise ValueError(f"module {type(host).__name__} already has a child named {name!r}")
    names = {id(l): n for n, l in host._modules.items() if isinstance(l, DeltaLayer)}
    names[id(layer)] = name
    layers = [l for l in attached_layers(host) if l is not layer] + [layer]
    layers.sort(key=lambda l: l.sequence_number)
    # Re-add delta children in creation order after the host's own children.
    for l in layers:
        host._modules.pop(names[id(l)], None)
    for l in layers:
        host._modules[names[id(l)]] = l
    host.__dict__[HOST_LAYERS] = tuple(names[id(l)] for l in layers)
    refresh_hooks(host)


def detach_layer(host: nn.Module, layer: DeltaLayer) -> None:
    """Remove ``layer`` from ``host``: child and hook; the host is as before it was added."""
    removed = [name for name, child in host._modules.items() if child is layer]
    for name in removed:
        del host._modules[name]
    host.__dict__[HOST_LAYERS] = tuple(n for n in host.__dict__.get(HOST_LAYERS, ()) if n not in removed)
    refresh_hooks(host)


def attached_layers(host: nn.Module) -> Tuple[DeltaLayer, ...]:
    """The delta layers attached to ``host``, in insertion order."""
    return tuple(host._modules[n] for n in host.__dict__.get(HOST_LAYERS, ()))


def iter_delta_layers(model: nn.Module, prefix: str = "") -> Iterator[Tuple[str, DeltaLayer]]:
    """``(name, layer)`` for every delta layer inside ``model``, not descending into them."""
    for name, child in model._modules.items():
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, DeltaLayer):
            yield full, child
        else:
            yield from iter_delta_layers(child, full)


def is_delta_parameter_name(model: nn.Module, name: str) -> bool:
    """True if the parameter called ``name`` in ``model`` belongs to a delta layer."""
    module = model
    for part in name.split(".")[:-1]:
        module = module._modules.get(part) if module is not None else None
        if isinstance(module, DeltaLayer):
            return True
    return False
