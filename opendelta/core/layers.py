"""Delta layers: the modules that deltas insert into a backbone, and their protocol.

A :class:`DeltaLayer` is registered as a child of the module it modifies (its *host*), so
its parameters get names such as ``...query.lora.lora_A`` and travel with the backbone
through ``deepcopy``, ``torch.save``, ``.to()``, DDP and FSDP. The host's forward is never
replaced: :mod:`opendelta.core.dispatch` hooks the host and runs its layers in order.

The protocol a layer offers (all optional but ``post_forward`` / ``pre_forward``):

* ``pre_forward(host, args, kwargs)`` -> new ``(args, kwargs)`` or ``None``;
* ``post_forward(host, args, kwargs, output)`` -> the new output;
* ``merged`` (bool) and the merge methods of :class:`opendelta.core.merging.MergeableLayer`;
* ``routed_update(host, args, kwargs)``: the additive update of a row-sliced call, read by
  :mod:`opendelta.route`;
* ``supports_routing``: whether the layer may run on a subset of the batch rows.

A layer keeps nothing on ``self`` between its pre- and post-hook: values that must travel
from one hook to another within one forward pass go through
:func:`opendelta.core.dispatch.push_call_value` / ``pop_call_value`` (per thread and task).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn


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
    #: the layer takes the place of its host's child of the same name instead of hooking
    #: into the host (``replace_module``, see :mod:`opendelta.core.extension`).
    replaces_child: bool = False

    #: position among the layers of its host, given by the host when the layer is first
    #: attached (see :func:`opendelta.core.dispatch.attach_layer`); fixes the run order.
    host_slot: Optional[int] = None

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


@functools.lru_cache(maxsize=None)
def positional_names(cls: Any) -> Tuple[str, ...]:
    """Names of the parameters of ``cls.forward`` that can be passed positionally (read
    once per class)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    if any(p.kind is p.POSITIONAL_ONLY for p in params):
        raise TypeError(f"{cls.__name__}.forward has positional-only parameters; a delta cannot "
                        "pass them by name")
    return tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)


def call_as_kwargs(host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """All arguments of a call of ``host`` by name, the positional ones named after the
    parameters of its class's ``forward``.

    A pre-hook that needs arguments by name returns ``((), call_as_kwargs(...))``.
    """
    if not args:
        return dict(kwargs)
    host_class: Any = type(host)
    names = positional_names(host_class)
    if len(args) > len(names):
        raise TypeError(f"{type(host).__name__}.forward got {len(args)} positional arguments; "
                        f"it takes {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


# --------------------------------------------------------------------------- records
class LayerEntry(NamedTuple):
    """One layer a delta model inserted: on the module called ``host_name`` (``""``: the
    backbone itself), as its child ``child_name``."""

    host_name: str
    child_name: str
    layer: DeltaLayer


@dataclass
class DeltaLifecycle:
    """The state of a delta model that is not in its layers (the merge state of each layer
    is on the layer, see :class:`opendelta.core.merging.MergeableLayer`).

    Attributes:
        attached: the layers are in the backbone (children and hooks).
        filters_state_dict: ``freeze_module(set_state_dict=True)`` made the backbone's
            ``state_dict`` trainable-only; detach/attach take the filter out and back.
        merged_away: ``merge_and_detach()`` folded the delta into the backbone for good.
        remerge_on_attach: ``detach()`` unmerged a merged delta; ``attach()`` merges it again.
        merge_keep_copy: the ``keep_copy`` option of the last ``merge()``.
    """

    attached: bool = True
    filters_state_dict: bool = False
    merged_away: bool = False
    remerge_on_attach: bool = False
    merge_keep_copy: bool = False
