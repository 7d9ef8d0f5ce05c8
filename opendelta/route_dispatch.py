"""The dispatch hooks' work under :func:`opendelta.route` (called through the methods
``pre_hooks`` / ``post_hooks`` of :class:`opendelta.route.Routing`).

A uniform routing (one name for the whole batch) runs the chosen delta's layers on the
whole call. A mixed one groups a host's layers by delta name; groups whose layers all have
a batched kernel (:mod:`opendelta.batched_routing`: LoRA, the adapter family) run
together, a constant number of tensor operations whatever the number of deltas; the other
groups (BitFit, user layers, layers opting out with ``batched_routing = False``) each run
on their rows (``index_select``), written back with one ``index_copy`` / ``index_add``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from .batched_routing import groups_rows, post_batch_key, post_update, pre_batch_key, pre_push
from .core.layers import DeltaLayer, primary_tensor, replace_primary_tensor

__all__ = ["MIXED", "routed_pre_hooks", "routed_post_hooks"]

#: ``Routing.uniform`` when the rows use different deltas.
MIXED = object()


def _grouped(host: nn.Module, names: Sequence[str], routing: Any) -> Iterator[Tuple[str, List[DeltaLayer]]]:
    """The host's layers of the deltas some row is routed to, grouped by delta name, each
    group in run order (marked as matched)."""
    groups: Dict[str, List[DeltaLayer]] = {}
    routed = routing.routed_names
    children = host._modules
    for n in names:
        layer = children[n]
        name = layer.delta_name
        if name is None:
            raise ValueError(f"delta layer {n!r} ({type(layer).__name__}) on {type(host).__name__} "
                             "has no delta name, so it cannot be routed; insert it through a "
                             "DeltaBase (which sets delta_name) or detach it while routing")
        if name in routed:
            groups.setdefault(name, []).append(layer)
    routing.matched.update(groups)
    return iter(groups.items())


def _check_batch(host: nn.Module, tensor: torch.Tensor, routing: Any, what: str) -> None:
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


def _uniform_layers(host: nn.Module, names: Sequence[str], routing: Any) -> List[DeltaLayer]:
    target = routing.uniform
    layers = [host._modules[n] for n in names]
    for layer in layers:
        if layer.delta_name is None:
            list(_grouped(host, names, routing))  # raises the explained error
    chosen = [layer for layer in layers if target is not None and layer.delta_name == target]
    if chosen:
        routing.matched.add(target)
    return chosen


def _stages(groups: List[Tuple[str, List[DeltaLayer], List[Any]]], j: int
            ) -> Dict[Any, Tuple[List[str], List[DeltaLayer]]]:
    """Batch key -> (names, layers) of the ``j``-th layer of each group."""
    kinds: Dict[Any, Tuple[List[str], List[DeltaLayer]]] = {}
    for name, layers, keys in groups:
        if j < len(layers):
            entry = kinds.setdefault(keys[j], ([], []))
            entry[0].append(name)
            entry[1].append(layers[j])
    return kinds


def _batched_post(groups: List[Tuple[str, List[DeltaLayer], List[Any]]], args: Tuple[Any, ...],
                  kwargs: Dict[str, Any], hidden: torch.Tensor, routing: Any) -> torch.Tensor:
    """The hidden states after the batchable groups (rows disjoint): layer ``j`` of every
    group at stage ``j``, each batch key in one kernel call (:mod:`opendelta.batched_routing`)."""
    current = hidden
    for j in range(max(len(layers) for _, layers, _ in groups)):
        plans = [(key, layers, routing.plan(tuple(names), hidden.device, groups_rows(key)))
                 for key, (names, layers) in _stages(groups, j).items()]
        if len(plans) == 1 and plans[0][2].rows is None:  # one kernel for every row
            current = post_update(*plans[0], args, kwargs, current, fuse=True)
            continue
        new = current
        for key, layers, plan in plans:  # every kernel reads the stage's input
            update = post_update(key, layers, plan, args, kwargs, current, fuse=False)
            new = new + update if plan.rows is None else new.index_add(0, plan.rows, update)
        current = new
    return current


def routed_post_hooks(host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                      kwargs: Dict[str, Any], output: Any, routing: Any) -> Any:
    """Post-hook dispatch under routing: each group of layers sees only its rows; groups
    whose layers all have batched kernels run together."""
    routing.calls += 1
    if routing.uniform is not MIXED:
        if routing.size is not None:
            _check_batch(host, primary_tensor(output), routing, "output")
        for layer in _uniform_layers(host, names, routing):
            output = layer.post_forward(host, args, kwargs, output)
        return output
    hidden = primary_tensor(output)
    _check_batch(host, hidden, routing, "output")
    size = routing.size
    batched: List[Tuple[str, List[DeltaLayer], List[Any]]] = []
    copy_rows, copy_parts, add_rows, add_parts = [], [], [], []
    for name, layers in _grouped(host, names, routing):
        _check_routable(host, name, layers)
        keys = [post_batch_key(layer) for layer in layers]
        if None not in keys:
            batched.append((name, layers, keys))
            continue
        rows = routing.rows(name, hidden.device)
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
    result = _batched_post(batched, args, kwargs, hidden, routing) if batched else hidden
    if not copy_parts and not add_parts:
        return output if result is hidden else replace_primary_tensor(output, result)
    # One copy of the host's output (it may be saved for backward or be someone's view;
    # a result of the batched kernels is new), then each group's rows written in place.
    if result is hidden:
        result = hidden.clone()
    for rows, part in zip(copy_rows, copy_parts):
        result.index_copy_(0, rows, part)
    for rows, part in zip(add_rows, add_parts):
        result.index_add_(0, rows, part)
    return replace_primary_tensor(output, result)


def routed_pre_hooks(host: nn.Module, names: Sequence[str], args: Tuple[Any, ...],
                     kwargs: Dict[str, Any], routing: Any):
    """Pre-hook dispatch under routing: each group changes only its rows of the inputs."""
    routing.calls += 1
    if routing.uniform is not MIXED:
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
    batched: List[Tuple[str, List[DeltaLayer], List[Any]]] = []
    for name, layers in _grouped(host, names, routing):
        _check_routable(host, name, layers)
        keys = [pre_batch_key(layer) for layer in layers]
        if None not in keys:  # layers that leave the inputs as they are (ParallelAdapter)
            batched.append((name, layers, keys))
            continue
        rows = routing.rows(name, device)
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
    for j in range(max((len(layers) for _, layers, _ in batched), default=0)):
        for key, (group_names, group_layers) in _stages(batched, j).items():
            pre_push(key, group_layers, routing.plan(tuple(group_names), device, groups_rows(key)), args, kwargs)
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
