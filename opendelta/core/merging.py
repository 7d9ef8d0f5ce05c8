"""Merging: fold linear deltas (LoRA, BitFit) into the backbone's weights, and take them out.

A merged delta costs nothing at inference: its update lives in the host's weight (LoRA:
``W += B @ A * alpha / r``, transposed for GPT-2's ``Conv1D`` whose weight is ``[in, out]``;
BitFit: ``b += delta``) and its hook is switched off, so it is never added twice. The delta
layers stay registered (their parameters remain visible and saveable) until
:meth:`MergeMixin.merge_and_detach`, which leaves a plain backbone.

Exactness: :meth:`MergeMixin.unmerge` subtracts the same update it added, which restores
fp32 weights within rounding (relative error well below 1e-6); ``merge(keep_copy=True)``
keeps a copy of each touched weight and restores it bit for bit (for low-precision weights,
where subtraction loses more, prefer it).

Detach and attach while merged (defined behaviour): ``detach()`` first unmerges (exactly
with ``keep_copy``), so the backbone computes what it did before the delta; ``attach()``
merges again with the same options, which reproduces the same merged weights bit for bit.

Host without a bias (BitFit on T5 / Llama linears, ``LayerNorm(bias=False)``, RMSNorm):
``merge()`` refuses, naming the module, because it would have to add a parameter to the
backbone that ``unmerge()`` would then have to remove. ``merge_and_detach()`` creates the
bias as a new backbone parameter where the module's own forward reads ``self.bias``
(``nn.Linear``, convolutions, ``nn.LayerNorm``); other modules (RMSNorm, T5LayerNorm)
refuse, since nothing in their forward would use it.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .dispatch import refresh_hooks
from .freezing import set_trainable_state_dict
from .protocol import DeltaModelProtocol

#: attribute on a host module: the mergeable layers folded into it, in merge order.
_MERGE_STACK = "_opendelta_merge_stack"

Update = Tuple[nn.Parameter, torch.Tensor]  # (backbone tensor, increment of the same shape)


class MergeableLayer:
    """Mixin for delta layers that are linear re-parameterisations of their host.

    Subclasses implement :meth:`merge_updates`. The mixin keeps the ``merged`` flag (read by
    the dispatcher, see :func:`opendelta.core.layers.refresh_hooks`) and the optional copies.
    """

    merged: bool = False
    _merge_backup: Optional[List[torch.Tensor]] = None

    def merge_problem(self, host: nn.Module, create_missing: bool = False) -> Optional[str]:
        """Why this layer cannot be merged into ``host`` (``None``: it can)."""
        return None

    def merge_updates(self, host: nn.Module, create_missing: bool = False) -> List[Update]:
        """``(backbone tensor, increment)`` pairs that fold this layer into ``host``."""
        raise NotImplementedError

    def merge(self, host: nn.Module, keep_copy: bool = False,
              updates: Optional[List[Update]] = None) -> None:
        """Add this layer's update to ``host``'s weights and switch its hook off."""
        if self.merged:
            return
        updates = self.merge_updates(host) if updates is None else updates
        with torch.no_grad():
            self._merge_backup = [t.detach().clone() for t, _ in updates] if keep_copy else None
            for tensor, increment in updates:
                tensor.add_(increment)
        host.__dict__.setdefault(_MERGE_STACK, []).append(self)
        self.merged = True
        refresh_hooks(host)

    def unmerge(self, host: nn.Module) -> None:
        """Take this layer's update out of ``host``'s weights and switch its hook back on."""
        if not self.merged:
            return
        stack = host.__dict__.get(_MERGE_STACK, [])
        position = next(i for i, layer in enumerate(stack) if layer is self)
        backup = getattr(self, "_merge_backup", None)
        # A copy is valid only while nothing merged after this layer is still in the weight.
        with torch.no_grad():
            if backup is not None and position == len(stack) - 1:
                for (tensor, _), saved in zip(self.merge_updates(host), backup):
                    tensor.copy_(saved)
            else:
                for tensor, increment in self.merge_updates(host):
                    tensor.sub_(increment)
                for later in stack[position + 1:]:
                    later._merge_backup = None  # their copies still hold this layer's update
        del stack[position]
        if not stack:
            del host.__dict__[_MERGE_STACK]
        self._merge_backup = None
        self.merged = False
        refresh_hooks(host)


def _merge_pairs(delta: DeltaModelProtocol) -> List[Tuple[str, nn.Module, Any]]:
    """``(host name, host, layer)`` for every layer of ``delta``, in insertion order."""
    return [(e.host_name, delta.host_module(e.host_name), e.layer) for e in delta.layer_entries()]


def _check_not_merged_away(delta: DeltaModelProtocol) -> None:
    if delta.lifecycle.merged_away:
        raise RuntimeError(f"{type(delta).__name__} {delta.name!r} was merged into the backbone "
                           "by merge_and_detach(); it has no layers left")


def _check_mergeable(delta: DeltaModelProtocol, create_missing: bool = False) -> None:
    _check_not_merged_away(delta)
    for host_name, host, layer in _merge_pairs(delta):
        if not isinstance(layer, MergeableLayer):
            raise TypeError(
                f"{type(delta).__name__} cannot be merged: its {type(layer).__name__} on "
                f"{host_name!r} is not a linear re-parameterisation of the module "
                "(only LoRA and BitFit deltas merge); keep it unmerged or detach it")
        problem = layer.merge_problem(host, create_missing)
        if problem:
            raise ValueError(f"cannot merge {delta.name!r} into {host_name!r}: {problem}")


class MergeMixin:
    """``merge`` / ``unmerge`` / ``merge_and_detach`` for :class:`opendelta.DeltaBase`.

    Uses only the delta model's declared interface: ``layer_entries()``, ``host_module()``,
    ``remove_layer()``, ``lifecycle`` (:class:`~opendelta.core.layers.DeltaLifecycle`),
    ``name`` and ``backbone_model``; the merge state of each layer is on the layer.
    """

    @property
    def is_merged(self: DeltaModelProtocol) -> bool:
        """True when this delta's layers are folded into the backbone's weights."""
        entries = self.layer_entries()
        return bool(entries) and all(getattr(e.layer, "merged", False) for e in entries)

    # ----------------------------------------------------------------- public API
    def merge(self: DeltaModelProtocol, keep_copy: bool = False, safe: bool = False) -> None:
        """Fold this delta into the backbone's weights; its hooks stop running.

        Args:
            keep_copy: keep a copy of every touched weight so :meth:`unmerge` restores it
                bit for bit (memory: one copy of each modified weight).
            safe: compute every merged weight first and check that all are finite; on a
                NaN or inf, raise ``ValueError`` naming the module, with nothing changed.

        Raises:
            TypeError: a layer of this delta cannot be merged (Adapter, Prefix, ...).
            ValueError: a host cannot take the update (BitFit on a module without a bias),
                or ``safe`` found a non-finite result.
            RuntimeError: the delta is detached.
        Merging an already merged delta does nothing.
        """
        if not self.lifecycle.attached:
            raise RuntimeError(f"{self.name!r} is detached; attach() it before merge()")
        _check_mergeable(self)
        pending = [(n, h, l) for n, h, l in _merge_pairs(self) if not l.merged]
        plans = [(h, l, l.merge_updates(h)) for _, h, l in pending]
        if safe:
            with torch.no_grad():
                for (name, _, _), (_, _, updates) in zip(pending, plans):
                    if not all(torch.isfinite(t + inc).all() for t, inc in updates):
                        raise ValueError(f"merging {self.name!r} would put NaN or inf into the "
                                         f"weights of {name!r}; nothing was merged")
        for host, layer, updates in plans:
            layer.merge(host, keep_copy=keep_copy, updates=updates)
        self.lifecycle.merge_keep_copy = keep_copy

    def unmerge(self: DeltaModelProtocol) -> None:
        """Take a merged delta out of the backbone's weights; its hooks run again.

        Restores the weights exactly when merged with ``keep_copy=True`` (and nothing
        merged later into the same modules is still there), else within fp32 rounding.
        Unmerging a delta that is not merged does nothing.
        """
        # Reverse order: the last merged comes out first, so copies stay valid.
        for _, host, layer in reversed(_merge_pairs(self)):
            if getattr(layer, "merged", False):
                layer.unmerge(host)

    def merge_and_detach(self: DeltaModelProtocol) -> nn.Module:
        """Merge this delta for good and remove every trace of it; returns the backbone.

        Afterwards the backbone is a plain model: no delta children, no hooks of this delta,
        no state-dict filter; BitFit biases missing from Linear / convolution / LayerNorm
        modules were created as new backbone parameters (``requires_grad`` as the module's
        weight). The delta object has no layers left and cannot be attached again.
        """
        if not self.lifecycle.attached:
            raise RuntimeError(f"{self.name!r} is detached; attach() it before merge_and_detach()")
        _check_mergeable(self, create_missing=True)
        for _, host, layer in _merge_pairs(self):
            if not layer.merged:
                layer.merge(host, updates=layer.merge_updates(host, create_missing=True))
        for entry in reversed(self.layer_entries()):
            host = self.host_module(entry.host_name)
            stack = host.__dict__.get(_MERGE_STACK)
            if stack is not None:
                stack[:] = [l for l in stack if l is not entry.layer]
                if not stack:
                    del host.__dict__[_MERGE_STACK]
            if isinstance(entry.layer, MergeableLayer):
                entry.layer._merge_backup = None
            self.remove_layer(entry)
        if self.lifecycle.filters_state_dict:
            set_trainable_state_dict(self.backbone_model, False)
            self.lifecycle.filters_state_dict = False
        self.lifecycle.attached = False
        self.lifecycle.merged_away = True
        return self.backbone_model

    # ----------------------------------------------------------------- detach / attach
    def _prepare_detach(self: DeltaModelProtocol) -> None:
        """Called by ``detach()``: a merged delta is unmerged first (see module docs)."""
        if self.is_merged:
            self.unmerge()
            self.lifecycle.remerge_on_attach = True

    def _check_reattachable(self: DeltaModelProtocol) -> None:
        """Called by ``attach()`` before anything is attached."""
        if self.lifecycle.merged_away:
            raise RuntimeError(f"{type(self).__name__} {self.name!r} was merged into the backbone "
                               "by merge_and_detach() and cannot be attached again")

    def _finish_attach(self: DeltaModelProtocol) -> None:
        """Called at the end of ``attach()``: re-merge what ``detach()`` unmerged."""
        if self.lifecycle.remerge_on_attach:
            self.lifecycle.remerge_on_attach = False
            self.merge(keep_copy=self.lifecycle.merge_keep_copy)
