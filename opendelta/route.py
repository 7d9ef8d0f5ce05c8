"""Per-example routing: one forward over a batch in which every example uses its own delta.

Several deltas can be attached to one backbone at once (each built with its own
``name=``). Inside ``with opendelta.route(routes):`` a forward pass applies, to row ``i``
of the batch, only the deltas whose name is ``routes[i]`` (``None``: no delta at all)::

    sst2 = LoraModel(model, name="sst2")
    mnli = LoraModel(model, name="mnli")
    with opendelta.route(["sst2", "mnli", None, "sst2"]):
        logits = model(**batch).logits            # batch of 4 rows

Outputs and gradients equal those of running each example alone with only its delta
attached: a delta gets gradients only from the rows routed to it, and a delta used by no row
is not part of the graph at all. Works in training and inference, and for ``generate()``
when the routes cover the rows the model sees (``num_beams`` / ``num_return_sequences``
multiply them: repeat each route accordingly).

How it works: the dispatch hooks of every modified module (see
:mod:`opendelta.core.layers`) group their layers by delta name, take the rows of that group
from the module's inputs and output (``index_select`` on dimension 0), run the layers on
those rows only, and write the results back with one ``index_copy`` / ``index_add`` per
module. There is no Python loop over examples, only over the deltas present on a module.
Layers offering ``routed_update`` (LoRA) contribute an additive update, the cheapest form.

Rules and limits:

* Every modified module must see the batch in dimension 0 with ``len(routes)`` rows; a
  module that does not raises a ``ValueError`` naming it.
* Deltas sharing a name are routed together (e.g. a LoRA and a BitFit both named ``"sst2"``
  form one task). Attached deltas named by no route are inactive for the whole call.
* A route naming no attached delta raises ``ValueError`` when the ``with`` block ends (or
  at once, when ``model=`` is given), so a typo never silently runs the bare backbone.
* Layers that change the sequence length (Prefix, SoftPrompt: ``supports_routing = False``)
  or the structure of their host's inputs cannot run on a subset of rows: mixing them with
  other routes raises a clear error. ``route("name")`` (one name for the whole batch) works
  with every layer, since nothing is sliced.
* Merged deltas (:meth:`DeltaBase.merge`) are part of the backbone's weights and apply to
  every example; unmerge them to route them.
* The routing lives in a :class:`contextvars.ContextVar`: nested ``route`` blocks override
  the outer one until they exit; other threads (including ``nn.DataParallel`` replicas) and
  other asyncio tasks do not see it. Without routing, the dispatch hooks compile into one
  graph (``torch.compile(fullgraph=True)``); routed calls are not traceable (eager only).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .core.dispatch import current_routing, iter_delta_layers, routing_block
from .core.layers import DeltaLayer, primary_tensor, replace_primary_tensor

__all__ = ["route", "current_routes", "Routing"]

_MIXED = object()  # Routing.uniform when the rows use different deltas


class Routing:
    """The routes in force: one delta name (or ``None``) per batch row.

    ``size`` is ``None`` when a single name was given for the whole batch.
    """

    __slots__ = ("routes", "size", "uniform", "_rows", "_tensors", "matched", "calls")

    def __init__(self, routes: Union[str, None, Sequence[Optional[str]]]):
        if routes is None or isinstance(routes, str):
            self.routes: Tuple[Optional[str], ...] = (routes,)
            self.size: Optional[int] = None
            self.uniform: Any = routes
        else:
            routes = tuple(routes)
            bad = [r for r in routes if r is not None and not isinstance(r, str)]
            if bad:
                raise TypeError(f"routes must be delta names (str) or None, got {bad[:3]!r}; "
                                "use the name= given to each delta model (its .name)")
            if not routes:
                raise ValueError("routes is empty; give one delta name (or None) per batch row")
            self.routes, self.size = routes, len(routes)
            self.uniform = routes[0] if all(r == routes[0] for r in routes) else _MIXED
        rows: Dict[str, List[int]] = {}
        for i, r in enumerate(self.routes):
            if r is not None:
                rows.setdefault(r, []).append(i)
        self._rows = rows
        self._tensors: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        #: names that met at least one of their layers, and the number of routed hook calls.
        self.matched: set = set()
        self.calls = 0

    @property
    def names(self) -> List[str]:
        return list(self._rows)

    def selects(self, name: Optional[str]) -> Optional[bool]:
        """Whether every row (True), no row (False) or only some rows (None) use ``name``."""
        if self.uniform is _MIXED:
            if name in self._rows:
                return None
            return False
        if self.uniform is not None and self.uniform == name:
            self.matched.add(name)
            return True
        return False

    # The two methods the dispatch hooks call while this routing is in force
    # (see :mod:`opendelta.core.dispatch`).
    def pre_hooks(self, host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                  kwargs: Dict[str, Any]):
        return routed_pre_hooks(host, names, args, kwargs, self)

    def post_hooks(self, host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                   kwargs: Dict[str, Any], output: Any) -> Any:
        return routed_post_hooks(host, names, args, kwargs, output, self)

    def rows(self, name: Optional[str], device: torch.device) -> Optional[torch.Tensor]:
        """Indices (int64, on ``device``) of the rows routed to ``name``; ``None`` if none."""
        if name not in self._rows:
            return None
        key = (name, device)
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors[key] = torch.tensor(self._rows[name], dtype=torch.long, device=device)
        return tensor


@contextlib.contextmanager
def route(routes: Union[str, None, Sequence[Optional[str]]], model: Optional[nn.Module] = None
          ) -> Iterator[Routing]:
    """Route batch rows to deltas by name for the forward passes inside the block.

    Args:
        routes: one delta name (``DeltaBase.name``) or ``None`` per batch row; or a single
            name for the whole batch (any size), which selects that delta among those
            attached without slicing anything.
        model: optional backbone; the names are checked against its attached deltas at once.

    Yields:
        the :class:`Routing` object (``matched`` tells which names met their layers).

    Raises:
        ValueError: a name matches no attached delta (at entry with ``model``, else at exit
            of a block that ran a forward pass); a modified module does not see
            ``len(routes)`` rows in dimension 0; a layer that cannot run on a subset of rows.
    """
    routing = Routing(routes)
    if model is not None:
        attached = {layer.delta_name for _, layer in iter_delta_layers(model)}
        unknown = sorted(set(routing.names) - attached)
        if unknown:
            raise ValueError(f"route names {unknown} match no delta attached to "
                             f"{type(model).__name__}; attached: {sorted(n for n in attached if n)}")
    with routing_block(routing):
        yield routing
    unknown = sorted(set(routing.names) - routing.matched)
    if routing.calls and unknown:
        raise ValueError(f"route names {unknown} matched no attached delta during the forward "
                         f"pass (matched: {sorted(routing.matched)}); check the name= given to "
                         "each delta model")


def current_routes() -> Optional[Tuple[Optional[str], ...]]:
    """The routes of the innermost active :func:`route` block, or ``None``."""
    routing = current_routing()
    return None if routing is None else routing.routes


# --------------------------------------------------------------------------- dispatch
def _grouped(host: nn.Module, names: Sequence[str]) -> Iterator[Tuple[str, List[DeltaLayer]]]:
    """The host's layers grouped by delta name, each group in run order."""
    groups: Dict[str, List[DeltaLayer]] = {}
    for n in names:
        layer = host._modules[n]
        if layer.delta_name is None:
            raise ValueError(f"delta layer {n!r} ({type(layer).__name__}) on {type(host).__name__} "
                             "has no delta name, so it cannot be routed; insert it through a "
                             "DeltaBase (which sets delta_name) or detach it while routing")
        groups.setdefault(layer.delta_name, []).append(layer)
    return iter(groups.items())


def _check_batch(host: nn.Module, tensor: torch.Tensor, routing: Routing, what: str) -> None:
    if routing.size is not None and (tensor.dim() == 0 or tensor.shape[0] != routing.size):
        raise ValueError(
            f"opendelta.route got {routing.size} routes but {type(host).__name__}'s {what} has "
            f"shape {tuple(tensor.shape)}; routing needs every modified module to see the batch "
            f"in dimension 0 with one row per route (repeat routes for beams / returned sequences)")


def _check_routable(host: nn.Module, name: str, layers: Sequence[DeltaLayer]) -> None:
    for layer in layers:
        if not layer.supports_routing:
            raise ValueError(
                f"{type(layer).__name__} of delta {name!r} on {type(host).__name__} cannot run on "
                "a subset of the batch (it changes the sequence length); route the whole batch "
                "to it with opendelta.route(name), or detach it while mixing deltas")


def _slice(value: Any, rows: torch.Tensor, size: int) -> Any:
    # Batch tensors have >= 2 dims; 1-D tensors (cache_position, ...) are left whole.
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == size:
        return value.index_select(0, rows)
    return value


def _slice_call(args: Tuple[Any, ...], kwargs: Dict[str, Any], rows: torch.Tensor, size: int
                ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    return (tuple(_slice(a, rows, size) for a in args),
            {k: _slice(v, rows, size) for k, v in kwargs.items()})


def _uniform_layers(host: nn.Module, names: Sequence[str], routing: Routing) -> List[DeltaLayer]:
    target = routing.uniform
    layers = [host._modules[n] for n in names]
    for layer in layers:
        if layer.delta_name is None:
            list(_grouped(host, names))  # raises the explained error
    chosen = [layer for layer in layers if target is not None and layer.delta_name == target]
    if chosen:
        routing.matched.add(target)
    return chosen


def routed_post_hooks(host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                      kwargs: Dict[str, Any], output: Any, routing: Routing) -> Any:
    """Post-hook dispatch under routing: each group of layers sees only its rows."""
    routing.calls += 1
    if routing.uniform is not _MIXED:
        if routing.size is not None:
            _check_batch(host, primary_tensor(output), routing, "output")
        for layer in _uniform_layers(host, names, routing):
            output = layer.post_forward(host, args, kwargs, output)
        return output
    hidden = primary_tensor(output)
    _check_batch(host, hidden, routing, "output")
    size = routing.size
    copy_rows, copy_parts, add_rows, add_parts = [], [], [], []
    for name, layers in _grouped(host, names):
        rows = routing.rows(name, hidden.device)
        if rows is None:
            continue
        _check_routable(host, name, layers)
        routing.matched.add(name)
        sub_args, sub_kwargs = _slice_call(args, kwargs, rows, size)
        if len(layers) == 1 and hasattr(layers[0], "routed_update"):
            # Additive layer (LoRA): only its update of these rows is computed and added.
            add_rows.append(rows)
            add_parts.append(layers[0].routed_update(host, sub_args, sub_kwargs).to(hidden.dtype))
            continue
        sub_out = replace_primary_tensor(output, hidden.index_select(0, rows))
        for layer in layers:
            sub_out = layer.post_forward(host, sub_args, sub_kwargs, sub_out)
        new = primary_tensor(sub_out)
        if new.shape[1:] != hidden.shape[1:] or new.shape[0] != rows.numel():
            raise ValueError(f"delta {name!r} changes the shape of {type(host).__name__}'s output "
                             f"({tuple(hidden.shape[1:])} -> {tuple(new.shape[1:])} per row), so it "
                             "cannot be routed per example")
        copy_rows.append(rows)
        copy_parts.append(new.to(hidden.dtype))
    if not copy_parts and not add_parts:
        return output
    # One copy of the host's output (it may be saved for backward or be someone's view),
    # then each group's rows written in place: no concatenated temporaries.
    hidden = hidden.clone()
    for rows, part in zip(copy_rows, copy_parts):
        hidden.index_copy_(0, rows, part)
    for rows, part in zip(add_rows, add_parts):
        hidden.index_add_(0, rows, part)
    return replace_primary_tensor(output, hidden)


def routed_pre_hooks(host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                     kwargs: Dict[str, Any], routing: Routing):
    """Pre-hook dispatch under routing: each group changes only its rows of the inputs."""
    routing.calls += 1
    if routing.uniform is not _MIXED:
        changed = False
        for layer in _uniform_layers(host, names, routing):
            result = layer.pre_forward(host, args, kwargs)
            if result is not None:
                args, kwargs = result
                changed = True
        return (args, kwargs) if changed else None
    size = routing.size
    batch = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2]
    if not batch:
        raise ValueError(f"opendelta.route: {type(host).__name__} was called without a batch "
                         "tensor (>= 2 dims), so its rows cannot be routed")
    _check_batch(host, batch[0], routing, "input")
    device = batch[0].device
    # position (int index or keyword) -> [(rows, new rows)]
    updates: Dict[Union[int, str], List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layers in _grouped(host, names):
        rows = routing.rows(name, device)
        if rows is None:
            continue
        _check_routable(host, name, layers)
        routing.matched.add(name)
        sub_args, sub_kwargs = _slice_call(args, kwargs, rows, size)
        new_args, new_kwargs, changed = sub_args, sub_kwargs, False
        for layer in layers:
            result = layer.pre_forward(host, new_args, new_kwargs)
            if result is not None:
                new_args, new_kwargs = result
                changed = True
        if not changed:
            continue
        if len(new_args) != len(sub_args) or set(new_kwargs) != set(sub_kwargs):
            raise ValueError(f"delta {name!r} changes which arguments {type(host).__name__} receives, "
                             "so it cannot be routed per example")
        pairs = [(i, sub_args[i], new_args[i]) for i in range(len(sub_args))]
        pairs += [(k, sub_kwargs[k], new_kwargs[k]) for k in sub_kwargs]
        for key, old, new in pairs:
            if new is old:
                continue
            full = args[key] if isinstance(key, int) else kwargs[key]
            if (not isinstance(new, torch.Tensor) or old is full
                    or new.shape != old.shape):
                raise ValueError(f"delta {name!r} changes the argument {key!r} of "
                                 f"{type(host).__name__} in a way that cannot be routed per "
                                 "example (only per-row changes of batch tensors can)")
            updates.setdefault(key, []).append((rows, new))
    if not updates:
        return None
    args, kwargs = list(args), dict(kwargs)
    for key, parts in updates.items():
        full = args[key] if isinstance(key, int) else kwargs[key]
        new = full.index_copy(0, _cat([r for r, _ in parts]), _cat([v.to(full.dtype) for _, v in parts]))
        if isinstance(key, int):
            args[key] = new
        else:
            kwargs[key] = new
    return tuple(args), kwargs


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
