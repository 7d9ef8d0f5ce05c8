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

How it works (:mod:`opendelta.route_dispatch`): the dispatch hooks of every modified module
group its layers by delta name. LoRA and the adapter family (Adapter, LowRankAdapter,
Compacter, ParallelAdapter) run through batched kernels (:mod:`opendelta.batched_routing`):
each row's factors are gathered from the deltas' parameters and all rows are computed with
batched matrix products, a constant number of tensor operations per module however many
deltas are routed (the BGMV scheme of Punica / S-LoRA). Other layers (BitFit, user layers,
layers with ``batched_routing = False``) run per delta on that delta's rows
(``index_select`` on dimension 0), written back with one ``index_copy`` / ``index_add``.
There is never a Python loop over examples. Memory: each batched call gathers its rows'
factors, ``P * r * (in + out)`` elements for P routed rows through LoRAs of rank r (8 MiB
for 64 rows, r = 16, in = out = 1024, in float32), freed after the call, however many
deltas are attached; nothing is cached between calls (see :mod:`opendelta.routing_stacks`).

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
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .core.dispatch import current_routing, iter_delta_layers, routing_block
from .route_dispatch import MIXED, routed_post_hooks, routed_pre_hooks

__all__ = ["route", "current_routes", "Routing", "RowPlan"]


class RowPlan(NamedTuple):
    """The rows a batched kernel serves (see :meth:`Routing.plan`).

    Attributes:
        rows: their batch indices (int64), or ``None`` for every row in batch order.
        slots: ``[P]`` int64, the delta (index into the plan's names) of each row.
        slot_list: the same as a list.
        sizes: the number of rows of each name.
    """

    rows: Optional[torch.Tensor]
    slots: torch.Tensor
    slot_list: List[int]
    sizes: List[int]


class Routing:
    """The routes in force: one delta name (or ``None``) per batch row.

    ``size`` is ``None`` when a single name was given for the whole batch.
    """

    __slots__ = ("routes", "size", "uniform", "_rows", "_tensors", "_plans", "matched", "calls")

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
            self.uniform = routes[0] if all(r == routes[0] for r in routes) else MIXED
        rows: Dict[str, List[int]] = {}
        for i, r in enumerate(self.routes):
            if r is not None:
                rows.setdefault(r, []).append(i)
        self._rows = rows
        self._tensors: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        self._plans: Dict[Tuple[Any, ...], RowPlan] = {}
        #: names that met at least one of their layers, and the number of routed hook calls.
        self.matched: set = set()
        self.calls = 0

    @property
    def names(self) -> List[str]:
        return list(self._rows)

    @property
    def routed_names(self) -> Dict[str, List[int]]:
        """Name -> its rows (batch indices), for the names at least one row uses."""
        return self._rows

    def selects(self, name: Optional[str]) -> Optional[bool]:
        """Whether every row (True), no row (False) or only some rows (None) use ``name``."""
        if self.uniform is MIXED:
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

    def plan(self, names: Tuple[str, ...], device: torch.device, grouped: bool = False) -> RowPlan:
        """The rows routed to any of ``names`` and the index of each row's name: in batch
        order, or (``grouped``) name by name, each name's rows in batch order. Computed once
        per routing (every module of the model asks the same)."""
        key = (names, device, grouped)
        plan = self._plans.get(key)
        if plan is None:
            if grouped:
                order = [i for name in names for i in self._rows[name]]
                slot_list = [s for s, name in enumerate(names) for _ in self._rows[name]]
            else:
                position = {name: s for s, name in enumerate(names)}
                order = [i for i, r in enumerate(self.routes) if r in position]
                slot_list = [position[self.routes[i]] for i in order]
            rows = None if order == list(range(len(self.routes))) else torch.tensor(order, device=device)
            plan = self._plans[key] = RowPlan(rows, torch.tensor(slot_list, device=device), slot_list,
                                              [len(self._rows[name]) for name in names])
        return plan


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
