"""Merge state on the layers: :class:`MergeableLayer`, the mixin of delta layers that fold
into their host's weights, and the helpers reading that state (see :mod:`opendelta.core.merging`
for the behaviour it gives)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from .digest import Fingerprint, fingerprint
from .dispatch import is_delta_parameter_name, refresh_hooks
from .protocol import DeltaModelProtocol

#: attribute on a host module: the mergeable layers folded into it, in merge order.
_MERGE_STACK = "_opendelta_merge_stack"
#: attribute of a merged layer: its merge state (a dict, see MergeableLayer).
_MERGE_STATE = "_opendelta_merge_state"
#: attribute of a layer: its load_state_dict post-hook is registered.
_LOAD_HOOK = "_opendelta_merge_load_hook"

Update = Tuple[nn.Parameter, torch.Tensor]  # (backbone tensor, increment of the same shape)


def _params(layer: Any) -> Dict[str, torch.Tensor]:
    return dict(cast(nn.Module, layer).named_parameters())


class MergeableLayer:
    """Mixin for delta layers that are linear re-parameterisations of their host.

    Subclasses implement :meth:`merge_updates` (and :meth:`merge_problem`). The mixin keeps
    the ``merged`` flag (read by the dispatcher, see :func:`opendelta.core.dispatch.refresh_hooks`)
    and, while merged, the merge state in ``__dict__`` (never a submodule or a parameter):
    ``host``, ``keep_copy``, ``snapshot`` (own parameter values at merge time),
    ``tensors`` (the backbone tensors changed), ``fingerprints`` (what they held before,
    ``None`` where an earlier merge already recorded it or on the meta device) and
    ``backup`` (full copies with ``keep_copy``, while still valid).
    """

    merged: bool = False

    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        """Why this layer cannot be merged into ``host`` (``None``: it can)."""
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        """``(backbone tensor, increment)`` pairs that fold this layer into ``host`` (while
        merged: the increments that take it out again)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    @property
    def merge_state(self) -> Dict[str, Any]:
        """The merge state of a merged layer (empty when not merged)."""
        return cast(Dict[str, Any], self.__dict__.get(_MERGE_STATE) or {})

    def merge_is_stale(self) -> bool:
        """Whether this merged layer's parameters changed since they were merged (the
        backbone still holds the old update)."""
        snapshot = self.merge_state.get("snapshot")
        return bool(self.merged and snapshot is not None and _differs(_params(self), snapshot))

    def merge(self, host: nn.Module, keep_copy: bool = False,
              updates: Optional[List[Update]] = None) -> None:
        """Add this layer's update to ``host``'s weights and switch its hook off."""
        if self.merged:
            return
        updates = self.merge_updates(host) if updates is None else updates
        earlier = premerge_fingerprints(host)
        state: Dict[str, Any] = {
            "host": host, "keep_copy": keep_copy,
            "snapshot": {n: p.detach().clone() for n, p in _params(self).items()},
            "tensors": [t for t, _ in updates],
            "fingerprints": [None if id(t) in earlier else fingerprint(t) for t, _ in updates],
        }
        with torch.no_grad():
            state["backup"] = [t.detach().clone() for t, _ in updates] if keep_copy else None
            for tensor, increment in updates:
                tensor.add_(increment)
        self.__dict__[_MERGE_STATE] = state
        host.__dict__.setdefault(_MERGE_STACK, []).append(self)
        self.merged = True
        if not self.__dict__.get(_LOAD_HOOK):
            cast(nn.Module, self).register_load_state_dict_post_hook(_remerge_after_load)
            self.__dict__[_LOAD_HOOK] = True
        refresh_hooks(host)

    def unmerge(self, host: nn.Module) -> None:
        """Take out of ``host``'s weights the update this layer put in (with the values
        its parameters had then) and switch its hook back on."""
        if not self.merged:
            return
        state = self.merge_state
        stack = host.__dict__.get(_MERGE_STACK, [])
        position = next(i for i, layer in enumerate(stack) if layer is self)
        backup = state.get("backup")
        # A copy is valid only while nothing merged after this layer is still in the weight.
        with torch.no_grad():
            if backup is not None and position == len(stack) - 1:
                for tensor, saved in zip(state["tensors"], backup):
                    tensor.copy_(saved)
            else:
                for tensor, increment in self._updates_as_merged(host):
                    tensor.sub_(increment.to(device=tensor.device, dtype=tensor.dtype))
        for later in stack[position + 1:]:
            later_state = later.merge_state
            later_state["backup"] = None  # their copies still hold this layer's update
            # What this layer's tensors held before it merged is what they hold without both.
            for i, tensor in enumerate(state.get("tensors", ())):
                for j, other in enumerate(later_state.get("tensors", ())):
                    if other is tensor and state["fingerprints"][i] is not None:
                        later_state["fingerprints"][j] = state["fingerprints"][i]
        del stack[position]
        if not stack:
            del host.__dict__[_MERGE_STACK]
        self.__dict__.pop(_MERGE_STATE, None)
        self.merged = False
        refresh_hooks(host)

    def forget_merge(self) -> None:
        """Drop the merge state of a layer merged for good (``merge_and_detach``): the
        update stays in the weights, the layer leaves the backbone."""
        self.__dict__.pop(_MERGE_STATE, None)
        self.merged = False

    def remerge(self, host: nn.Module) -> None:
        """Bring a stale merged layer up to date: unmerge the old update, merge the current
        parameters (same ``keep_copy``). If the current values cannot be merged (e.g. an
        IA3 vector with zeros), the layer stays unmerged and runs through its hook."""
        keep_copy = bool(self.merge_state.get("keep_copy"))
        self.unmerge(host)
        problem = self.merge_problem(host)
        if problem:
            warnings.warn(f"{type(self).__name__} on {type(host).__name__} was unmerged and not merged "
                          f"again: {problem}", RuntimeWarning, stacklevel=3)
            return
        self.merge(host, keep_copy=keep_copy)

    def _updates_as_merged(self, host: nn.Module) -> List[Update]:
        """``merge_updates`` computed with the parameter values of merge time."""
        snapshot = self.merge_state.get("snapshot")
        params = _params(self)
        if snapshot is None or not _differs(params, snapshot):
            return self.merge_updates(host)
        current = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            try:
                for name, param in params.items():
                    param.copy_(snapshot[name])
                # Clone: an increment may be a view of a parameter restored below.
                return [(t, inc.detach().clone()) for t, inc in self.merge_updates(host)]
            finally:
                for name, param in params.items():
                    param.copy_(current[name])


def _differs(params: Mapping[str, torch.Tensor], snapshot: Mapping[str, torch.Tensor]) -> bool:
    if set(params) != set(snapshot):
        return True
    for name, param in params.items():
        saved = snapshot[name]
        if tuple(param.shape) != tuple(saved.shape):
            return True
        if param.device.type == "meta" or saved.device.type == "meta":
            continue
        if not torch.equal(param.detach(), saved.to(device=param.device, dtype=param.dtype)):
            return True
    return False


def _remerge_after_load(layer: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook of a mergeable layer: a merged layer whose parameters
    were loaded with new values is merged again with them."""
    if isinstance(layer, MergeableLayer) and layer.merge_is_stale():
        layer.remerge(layer.merge_state["host"])


def premerge_fingerprints(host: nn.Module) -> Dict[int, Fingerprint]:
    """``id(tensor)`` -> what the tensor held before any merge still in it, for the backbone
    tensors of ``host`` that merged layers changed (read by the backbone hash)."""
    out: Dict[int, Fingerprint] = {}
    for layer in host.__dict__.get(_MERGE_STACK, ()):
        state = layer.merge_state
        for tensor, print_ in zip(state.get("tensors", ()), state.get("fingerprints", ())):
            if print_ is not None:
                out.setdefault(id(tensor), print_)
    return out


def refresh_merged(delta: DeltaModelProtocol) -> None:
    """Re-merge every merged layer of ``delta`` whose parameters changed since its merge
    (after a load into a merged delta)."""
    for entry in delta.layer_entries():
        layer = entry.layer
        if isinstance(layer, MergeableLayer) and layer.merge_is_stale():
            layer.remerge(delta.host_module(entry.host_name))


def merged_backbone_tensors(model: nn.Module) -> Dict[int, str]:
    """``id(tensor)`` -> host name of every backbone tensor some merged layer changed."""
    out: Dict[int, str] = {}
    for name, module in model.named_modules():
        for layer in module.__dict__.get(_MERGE_STACK, ()):
            for tensor in layer.merge_state.get("tensors", ()):
                out[id(tensor)] = name
    return out


def _storage_key(tensor: torch.Tensor) -> Any:
    if tensor.device.type == "meta":
        return ("id", id(tensor))
    try:
        return (tensor.device, tensor.untyped_storage().data_ptr())
    except RuntimeError:  # a wrapper tensor subclass without storage (torchao's quantized weights)
        return ("id", id(tensor))


def _check_not_tied(delta: DeltaModelProtocol, planned: Sequence[Tuple[str, Sequence[torch.Tensor]]]) -> None:
    """Refuse to merge into a tensor that another backbone parameter shares (tied weights)."""
    if not planned:
        return
    backbone = delta.backbone_model
    owners: Dict[Any, List[str]] = {}
    for name, param in backbone.named_parameters(remove_duplicate=False):
        if not is_delta_parameter_name(backbone, name):
            owners.setdefault(_storage_key(param), []).append(name)
    for host_name, tensors in planned:
        for tensor in tensors:
            names = owners.get(_storage_key(tensor), [])
            if len(names) > 1:
                raise ValueError(
                    f"cannot merge {delta.name!r} into {host_name!r}: the tensor it would change is "
                    f"shared by the backbone parameters {names} (tied weights), so merging would change "
                    "all of them. Keep the delta unmerged, or untie the weights first (e.g. give "
                    f"{host_name!r} its own copy: module.weight = nn.Parameter(module.weight.detach().clone())). "
                    "Nothing was merged.")
