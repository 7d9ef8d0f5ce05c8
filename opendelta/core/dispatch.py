"""How delta layers are hooked into their host, in which order they run, and the per-call
state that travels through one forward pass.

Each modified module (*host*) gets at most one forward pre-hook and one forward hook,
both module-level functions registered with ``with_kwargs=True``; they run the host's
attached, unmerged layers. Everything the hooks need lives on the host:

* ``_opendelta_layers``: child names of its attached layers, in run order;
* ``_opendelta_next_slot``: the slot the next new layer gets. A layer keeps its slot
  (``DeltaLayer.host_slot``) while detached, so re-attaching puts it back where it was,
  and a layer added later, even after ``torch.save`` / ``torch.load`` in another process,
  runs after every layer already there;
* ``_opendelta_pre_layers`` / ``_opendelta_post_layers``: the run lists of the two hooks,
  precomputed by :func:`refresh_hooks` so the hot path does no filtering or sorting.

Order, as documented by OpenDelta: layers acting *after* the host (and parallel ones) run
in the order they were added; layers acting *before* it run last-added first.

Routing (:mod:`opendelta.route`) is the one switch of this module: inside
:func:`routing_block` the hooks hand the call to the routing object in force (its
``pre_hooks`` / ``post_hooks`` methods); outside, they test one plain int and go on.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Any, Dict, Iterator, List, Optional, Tuple

from torch import nn

from .layers import DeltaLayer

HOST_LAYERS = "_opendelta_layers"
HOST_HANDLES = "_opendelta_hook_handles"
HOST_PRE = "_opendelta_pre_layers"
HOST_POST = "_opendelta_post_layers"
HOST_NEXT_SLOT = "_opendelta_next_slot"


# --------------------------------------------------------------------------- the routing switch
class _RoutingSwitch:
    """The routing in force (per thread / task, a ContextVar) and the number of open
    routing blocks in the process. The hot path tests the plain int first: cheaper than the
    ContextVar and traceable by ``torch.compile`` (a ContextVar read is not)."""

    def __init__(self) -> None:
        self.current: ContextVar[Any] = ContextVar("opendelta_routing", default=None)
        self.open_blocks = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def block(self, routing: Any) -> Iterator[Any]:
        with self._lock:
            self.open_blocks += 1
        token = self.current.set(routing)
        try:
            yield routing
        finally:
            self.current.reset(token)
            with self._lock:
                self.open_blocks -= 1


#: the only routing switch of the library; written through :func:`routing_block` only.
ROUTING_SWITCH = _RoutingSwitch()


def routing_block(routing: Any) -> "contextlib.AbstractContextManager[Any]":
    """Make ``routing`` (an object with ``pre_hooks`` / ``post_hooks`` methods, see
    :class:`opendelta.route.Routing`) the routing of the forward passes in the block."""
    return ROUTING_SWITCH.block(routing)


def current_routing() -> Any:
    """The routing object in force in this thread / task, or ``None``."""
    return ROUTING_SWITCH.current.get()


# --------------------------------------------------------------------------- per-call values
#: owner id -> stack of values pushed during the forward pass in progress (per thread / task).
_CALL_VALUES: ContextVar[Optional[Dict[int, List[Any]]]] = ContextVar("opendelta_call_values", default=None)
_MISSING = object()


def push_call_value(owner: nn.Module, value: Any) -> None:
    """Hand ``value`` from one hook to a later one of the same forward pass.

    The value is kept per thread and asyncio task (never on the module), so concurrent
    forwards of one model never see each other's values. Values of one owner form a
    stack: nested or re-entrant calls pop what they pushed.
    """
    values = _CALL_VALUES.get()
    if values is None:
        values = {}
        _CALL_VALUES.set(values)
    values.setdefault(id(owner), []).append(value)


def peek_call_value(owner: nn.Module, default: Any = None) -> Any:
    """The last value pushed by ``owner`` in this forward pass, or ``default``."""
    stack = (_CALL_VALUES.get() or {}).get(id(owner))
    return stack[-1] if stack else default


def pop_call_value(owner: nn.Module, default: Any = _MISSING) -> Any:
    """Remove and return the last value pushed by ``owner``; ``default`` if there is none
    (``KeyError`` when no default is given)."""
    values = _CALL_VALUES.get() or {}
    stack = values.get(id(owner))
    if not stack:
        if default is _MISSING:
            raise KeyError(f"no value pushed by {type(owner).__name__} in this forward pass")
        return default
    value = stack.pop()
    if not stack:
        del values[id(owner)]
    return value


# --------------------------------------------------------------------------- dispatch hooks
# The two hooks below run on every forward of every modified module: they read precomputed
# name tuples and do nothing else unless a routing is in force (one int test).
def _run_pre_hooks(host: nn.Module, args, kwargs):
    if ROUTING_SWITCH.open_blocks:
        routing = ROUTING_SWITCH.current.get()
        if routing is not None:
            return routing.pre_hooks(host, host.__dict__[HOST_PRE], args, kwargs)
    changed = False
    children: Dict[str, Any] = host._modules
    # Already in run order: last added first for layers acting before the host.
    for name in host.__dict__[HOST_PRE]:
        result = children[name].pre_forward(host, args, kwargs)
        if result is not None:
            args, kwargs = result
            changed = True
    return (args, kwargs) if changed else None


def _run_post_hooks(host: nn.Module, args, kwargs, output):
    if ROUTING_SWITCH.open_blocks:
        routing = ROUTING_SWITCH.current.get()
        if routing is not None:
            return routing.post_hooks(host, host.__dict__[HOST_POST], args, kwargs, output)
    children: Dict[str, Any] = host._modules
    for name in host.__dict__[HOST_POST]:
        output = children[name].post_forward(host, args, kwargs, output)
    return output


def refresh_hooks(host: nn.Module) -> None:
    """(Re)register the dispatch hooks of ``host`` to match its attached, unmerged layers
    (called after attaching, detaching, merging or unmerging a layer)."""
    for handle in host.__dict__.get(HOST_HANDLES, ()):
        handle.remove()
    names = host.__dict__.get(HOST_LAYERS, ())
    if not names:
        for attr in (HOST_LAYERS, HOST_HANDLES, HOST_PRE, HOST_POST):
            host.__dict__.pop(attr, None)
        return
    children: Dict[str, Any] = host._modules
    active = [(n, children[n]) for n in names if not getattr(children[n], "merged", False)]
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

    A layer new to the host gets the host's next slot, so it runs after every layer already
    there; a layer re-attached keeps its slot, so it goes back exactly where it was.
    """
    existing = host._modules.get(name)
    if layer.replaces_child:  # the layer stands in for the child it replaces
        if existing is not layer.__dict__["original"] and existing is not layer:
            raise ValueError(f"module {type(host).__name__}'s child {name!r} is no longer the module "
                             "this delta replaced")
        host._modules[name] = layer
        return
    if existing is not None and existing is not layer:
        raise ValueError(f"module {type(host).__name__} already has a child named {name!r}")
    if layer.host_slot is None:
        slot = host.__dict__.get(HOST_NEXT_SLOT, 0)
        layer.host_slot = slot
        host.__dict__[HOST_NEXT_SLOT] = slot + 1
    else:  # keep the counter ahead of every slot in use (a layer moved from a copy)
        host.__dict__[HOST_NEXT_SLOT] = max(host.__dict__.get(HOST_NEXT_SLOT, 0), layer.host_slot + 1)
    names = {id(child): n for n, child in host._modules.items() if isinstance(child, DeltaLayer)}
    names[id(layer)] = name
    layers = [child for child in attached_layers(host) if child is not layer] + [layer]
    layers.sort(key=lambda child: child.host_slot or 0)
    # Re-add delta children in run order after the host's own children.
    for child in layers:
        host._modules.pop(names[id(child)], None)
    for child in layers:
        host._modules[names[id(child)]] = child
    host.__dict__[HOST_LAYERS] = tuple(names[id(child)] for child in layers)
    refresh_hooks(host)


def detach_layer(host: nn.Module, layer: DeltaLayer) -> None:
    """Remove ``layer`` from ``host``: child and hook; the host is as before it was added
    (but for its slot counter, which only ever grows)."""
    removed = [name for name, child in host._modules.items() if child is layer]
    if layer.replaces_child:
        for name in removed:
            host._modules[name] = layer.__dict__["original"]
        return
    for name in removed:
        del host._modules[name]
    host.__dict__[HOST_LAYERS] = tuple(n for n in host.__dict__.get(HOST_LAYERS, ()) if n not in removed)
    refresh_hooks(host)


def attached_layers(host: nn.Module) -> Tuple[DeltaLayer, ...]:
    """The delta layers attached to ``host``, in run order."""
    children: Dict[str, Any] = host._modules
    return tuple(children[n] for n in host.__dict__.get(HOST_LAYERS, ()))


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
    module: Optional[nn.Module] = model
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        module = module._modules.get(part) if module is not None else None
        if isinstance(module, DeltaLayer):
            owns = getattr(module, "owns_parameter", None)
            return True if owns is None else owns(".".join(parts[i + 1:]))
    return False
