"""Merging: fold linear deltas (LoRA, BitFit) into the backbone's weights, and take them out.

A merged delta costs nothing at inference: its update lives in the host's weight (LoRA:
``W += B @ A * alpha / r``, transposed for GPT-2's ``Conv1D`` whose weight is ``[in, out]``;
BitFit: ``b += delta``) and its hook is switched off, so it is never added twice. The delta
layers stay registered (their parameters remain visible and saveable) until
:meth:`MergeMixin.merge_and_detach`, which leaves a plain backbone.

**Merge state lives on the layers.** A merged layer remembers (see :class:`MergeableLayer`)
its host, the values its own parameters had when it was merged (a copy of the small delta
tensors), the backbone tensors it changed with a fingerprint of what they held before
(:mod:`opendelta.core.digest`), and the optional full copies of ``keep_copy``. Hence:

* ``unmerge()`` / ``detach()`` take out exactly the update that was put in, whatever was
  written to the delta's parameters meanwhile (``load_state_dict``, ``load_checkpoint``,
  an optimizer step, a hand edit): the backbone comes back within fp32 rounding, bit for
  bit with ``keep_copy``;
* a *load* into a merged layer (``delta.load_state_dict``, ``load_checkpoint``,
  ``load_delta_state_dict``, and any ``load_state_dict`` of a module containing the layer,
  e.g. the backbone's) re-merges it with the loaded values, so outputs follow the load;
  other writes (an optimizer step) take effect at the next ``merge()``, which brings every
  stale merged layer up to date;
* the backbone hash (:func:`opendelta.io.hashing.gen_model_hash`) of a merged backbone
  uses the fingerprints, so a checkpoint saved while merged records the backbone itself.
  Merging therefore reads each changed weight once (on the CPU) to fingerprint it.

Tied weights: a merge into a weight whose storage another backbone parameter shares (GPT-2's
``lm_head`` and ``wte``) would change both modules; ``merge()`` and ``merge_and_detach()``
refuse it, naming both parameters, before anything changes.

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

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from .dispatch import HOST_POST
from .freezing import set_trainable_state_dict
from .merge_layer import (_MERGE_STACK, MergeableLayer, Update, _check_not_tied, merged_backbone_tensors,
                          premerge_fingerprints, refresh_merged)
from .protocol import DeltaModelProtocol
from .quantized_merge import dequantize_modules

__all__ = ["MergeMixin", "MergeableLayer", "Update", "merged_backbone_tensors", "premerge_fingerprints",
           "refresh_merged", "_MERGE_STACK"]


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
        problem = layer.merge_problem(host, create_missing) or _order_problem(host, layer)
        if problem:
            raise ValueError(f"cannot merge {delta.name!r} into {host_name!r}: {problem}")


def _order_problem(host: nn.Module, layer: Any) -> Optional[str]:
    """Why folding ``layer`` into ``host``'s weights would change the outputs: a merged layer
    acts inside the host, i.e. before every layer still run by the host's forward hook, so an
    unmerged layer running before it must commute with adding to the output."""
    run: Sequence[str] = host.__dict__.get(HOST_POST, ())
    children: Dict[str, Any] = host._modules
    for name in run:
        earlier = children[name]
        if earlier is layer:
            return None
        if not getattr(earlier, "output_additive", False):
            return (f"the {type(earlier).__name__} of delta {earlier.delta_name!r} runs before it on that module "
                    "and does not commute with a change of the module's weights; merge or detach that delta "
                    "first, or keep this one unmerged")
    return None


def _state_dict_problems(module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> List[str]:
    """What ``module.load_state_dict(state_dict, strict)`` would complain about."""
    if not isinstance(state_dict, Mapping):
        return [f"expected a mapping of names to tensors, got {type(state_dict).__name__}"]
    own = module.state_dict(keep_vars=True)
    problems = []
    wrong = [k for k, v in state_dict.items() if k in own and not isinstance(v, torch.Tensor)]
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        problems.append(f"values that are not tensors for {wrong[:8]}")
    if shapes:
        problems.append(f"size mismatch for {shapes[:8]}")
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"missing key(s) {missing[:8]}")
        if unexpected:
            problems.append(f"unexpected key(s) {unexpected[:8]}")
    return problems


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
            ValueError: a weight to change is shared with another backbone parameter
                (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``).
        Nothing is changed when it raises. Merging an already merged delta merges again
        the layers whose parameters changed since (e.g. after an optimizer step), and
        leaves the others as they are.
        """
        if not self.lifecycle.attached:
            raise RuntimeError(f"{self.name!r} is detached; attach() it before merge()")
        _check_mergeable(self)
        pending = [(n, h, l) for n, h, l in _merge_pairs(self) if not l.merged]
        plans = [(h, l, l.merge_updates(h)) for _, h, l in pending]
        _check_not_tied(self, [(name, [t for t, _ in updates])
                               for (name, _, _), (_, _, updates) in zip(pending, plans)])
        if safe:
            with torch.no_grad():
                for (name, _, _), (_, _, updates) in zip(pending, plans):
                    if not all(torch.isfinite(t + inc).all() for t, inc in updates):
                        raise ValueError(f"merging {self.name!r} would put NaN or inf into the "
                                         f"weights of {name!r}; nothing was merged")
        refresh_merged(self)  # merged layers written to since (an optimizer step): up to date
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

    def merge_and_detach(self: DeltaModelProtocol, dequantize: bool = False) -> nn.Module:
        """Merge this delta for good and remove every trace of it; returns the backbone.

        Afterwards the backbone is a plain model: no delta children, no hooks of this delta,
        no state-dict filter; BitFit biases missing from Linear / convolution / LayerNorm
        modules were created as new backbone parameters (``requires_grad`` as the module's
        weight). The delta object has no layers left and cannot be attached again.

        Args:
            dequantize: first turn every quantized Linear of the backbone (bitsandbytes,
                torchao) into a full-precision ``nn.Linear`` (see
                :func:`opendelta.core.quantized_merge.dequantize_modules`), so the merged
                weights are exact: a full-precision model to export. Default ``False``:
                quantized weights are requantized with the update (see that module).
        """
        if not self.lifecycle.attached:
            raise RuntimeError(f"{self.name!r} is detached; attach() it before merge_and_detach()")
        _check_mergeable(self, create_missing=True)
        # Tied weights are refused before anything changes (a bias created here is new).
        _check_not_tied(self, [(name, [t for t, _ in layer.merge_updates(host)])
                               for name, host, layer in _merge_pairs(self)
                               if not layer.merged and layer.merge_problem(host) is None])
        if dequantize:
            dequantize_modules(self.backbone_model, [entry.layer for entry in self.layer_entries()])
        refresh_merged(self)
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
                entry.layer.forget_merge()
            self.remove_layer(entry)
        if self.lifecycle.filters_state_dict:
            set_trainable_state_dict(self.backbone_model, False)
            self.lifecycle.filters_state_dict = False
        self.lifecycle.attached = False
        self.lifecycle.merged_away = True
        return self.backbone_model

    # ----------------------------------------------------------------- loading
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` for the delta's own tensors (``delta.state_dict()``
        keys), all or nothing: every key, value and shape is checked first, and a failure
        raises ``RuntimeError`` with nothing loaded. Merged layers are merged again with
        the loaded values (see :mod:`opendelta.core.merging`)."""
        module = cast(nn.Module, self)
        problems = _state_dict_problems(module, state_dict, strict)
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               + "; ".join(problems) + ". Nothing was loaded.")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        refresh_merged(cast(DeltaModelProtocol, self))
        return result

    # ----------------------------------------------------------------- detach / attach
    def _prepare_detach(self: DeltaModelProtocol) -> None:
        """Called by ``detach()``: a merged delta (or one with merged layers) is unmerged
        first (see module docs)."""
        if any(getattr(e.layer, "merged", False) for e in self.layer_entries()):
            self.unmerge()
            self.lifecycle.remerge_on_attach = True

    def _check_reattachable(self: DeltaModelProtocol) -> None:
        """Called by ``attach()`` before anything is attached."""
        if self.lifecycle.merged_away:
            raise RuntimeError(f"{type(self).__name__} {self.name!r} was merged into the backbone "
                               "by merge_and_detach() and cannot be attached again")

    def _finish_attach(self: DeltaModelProtocol) -> None:
        """Called at the end of ``attach()``: re-merge what ``detach()`` unmerged. If that
        merge is refused (e.g. the weights were tied meanwhile), the delta is detached
        again, so that ``attach()`` is all or nothing."""
        if self.lifecycle.remerge_on_attach:
            try:
                self.merge(keep_copy=self.lifecycle.merge_keep_copy)
            except Exception:
                cast(Any, self).detach()
                raise
            self.lifecycle.remerge_on_attach = False
