"""Fingerprints of backbone models, to tell whether a delta checkpoint fits a backbone.

A hash covers the backbone *without* its deltas: the module tree (names, classes, the
names, shapes and dtypes of the parameters) and, unless ``with_parameters=False``, the raw
bytes of every parameter. Attaching, detaching or training a delta does not change it, so
the hash written at save time can be checked against a fresh copy of the backbone.

Parameters are hashed as raw bytes (``tensor.view(torch.uint8)``): no per-element Python,
any dtype (fp32, fp16, bf16, fp8, integers). Each tensor gets its own SHA-256 digest (large
ones computed in a thread pool: hashlib releases the GIL), and the digests are combined in
model order, so the hash runs at the hash function's speed times the number of cores
(SHA-256 is hardware-accelerated on most CPUs). A weight that a merged delta changed counts
with the digest of what it held before the merge (recorded by the merge, see
:mod:`opendelta.core.merging`): merging does not change the hash either. Parameters on
the ``meta`` device have no values, so a model on ``meta`` hashes its structure only;
compare such a hash with a structure hash (``with_parameters=False``).

Hashes are strings ``"sha256:<32 hex digits>"``; the prefix tells them apart from the md5
hashes written by OpenDelta 0.3.x (a different recipe, never comparable).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..core.digest import Fingerprint, tensor_digest
from ..core.layers import DeltaLayer
from ..core.merging import premerge_fingerprints

HASH_PREFIX = "sha256:"
#: tensors at least this large (bytes) are hashed in worker threads.
_PARALLEL_BYTES = 1 << 20


def _new_hasher() -> "hashlib._Hash":
    return hashlib.sha256()


def _hexdigest(hasher: "hashlib._Hash") -> str:
    return HASH_PREFIX + hasher.hexdigest()[:32]


def _backbone_modules(model: nn.Module, prefix: str = "", through_replacements: bool = False
                      ) -> Iterator[Tuple[str, nn.Module]]:
    """Named modules of ``model``, skipping delta layers and everything inside them; with
    ``through_replacements``, a module replaced by a delta (``replace_module``) is seen as
    the original, under its own name (the backbone as if no delta were there)."""
    yield prefix, model
    for name, child in model._modules.items():
        if isinstance(child, DeltaLayer):
            child = child.__dict__.get("original") if through_replacements and child.replaces_child else None
        if child is None:
            continue
        yield from _backbone_modules(child, f"{prefix}.{name}" if prefix else name, through_replacements)


def backbone_parameters(model: nn.Module, through_replacements: bool = False
                        ) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every non-delta parameter of ``model``, shared ones once
    (``through_replacements``: see :func:`_backbone_modules`)."""
    seen = set()
    for module_name, module in _backbone_modules(model, through_replacements=through_replacements):
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{name}" if module_name else name), param


def _update_with_tensors(hasher: "hashlib._Hash", named: Iterable[Tuple[str, torch.Tensor]],
                         known: Optional[Mapping[int, Fingerprint]] = None) -> None:
    """Feed name and SHA-256 digest of each tensor to ``hasher``, in order; large tensors
    are digested in parallel. ``known``: ``id(tensor)`` -> a fingerprint to use instead of
    the tensor's current bytes (what a merged weight held before the merge)."""
    named = list(named)
    known = known or {}
    digests: Dict[int, bytes] = {}
    for _, tensor in named:
        print_ = known.get(id(tensor))
        if print_ is not None and print_.describes(tensor):
            digests[id(tensor)] = print_.digest
    big = [t for _, t in named if id(t) not in digests and t.numel() * t.element_size() >= _PARALLEL_BYTES]
    if big:
        workers = min(len(big), os.cpu_count() or 1, 16)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests.update(zip(map(id, big), pool.map(tensor_digest, big)))
    for name, tensor in named:
        hasher.update(name.encode())
        digest = digests.get(id(tensor))
        hasher.update(digest if digest is not None else tensor_digest(tensor))


def gen_parameter_hash(parameters: Union[Mapping[str, torch.Tensor], Iterable[torch.Tensor]],
                       hasher: Optional["hashlib._Hash"] = None) -> str:
    """Hash of the values (raw bytes), shapes and dtypes of ``parameters``.

    Args:
        parameters: tensors, or a mapping name -> tensor (names are hashed too, in the
            mapping's order). Tensors on the ``meta`` device contribute their shape and
            dtype only.
        hasher: a ``hashlib`` object to update instead of a fresh SHA-256 one.

    Returns:
        ``"sha256:<32 hex digits>"`` (or the given hasher's full hex digest, unprefixed).
    """
    own = hasher is None
    hasher = _new_hasher() if own else hasher
    items = list(parameters.items()) if isinstance(parameters, Mapping) else [("", p) for p in parameters]
    named = []
    for name, tensor in items:
        hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        if tensor.device.type != "meta":
            named.append((name, tensor))
    _update_with_tensors(hasher, named)
    return _hexdigest(hasher) if own else hasher.hexdigest()


def _structure_text(model: nn.Module) -> str:
    lines = []
    for name, module in _backbone_modules(model, through_replacements=True):
        lines.append(f"{name}:{type(module).__name__}")
        for pname, param in module._parameters.items():
            if param is not None:
                lines.append(f"  {pname}:{tuple(param.shape)}:{param.dtype}")
    return "\n".join(lines)


def gen_model_hash(model: nn.Module, with_parameters: bool = True,
                   skip_parameters: Collection[str] = ()) -> str:
    """Hash of a backbone model, its deltas excluded.

    Args:
        model: the backbone (deltas attached, detached or merged: the hash is the same).
        with_parameters: hash the parameter values too, not just the structure. Values of
            parameters on the ``meta`` device are never hashed.
        skip_parameters: names of parameters whose *values* are left out (their name,
            shape and dtype still count), e.g. a classifier head that a checkpoint stores
            and will overwrite anyway.

    Returns:
        ``"sha256:<32 hex digits>"``.
    """
    skip = set(skip_parameters)
    hasher = _new_hasher()
    hasher.update(_structure_text(model).encode())
    if with_parameters:
        known: Dict[int, Fingerprint] = {}
        for _, module in _backbone_modules(model, through_replacements=True):
            known.update(premerge_fingerprints(module))
        _update_with_tensors(hasher, [(name, p) for name, p in backbone_parameters(model, True)
                                      if name not in skip and p.device.type != "meta"], known)
    return _hexdigest(hasher)


def has_meta_parameters(model: nn.Module) -> bool:
    """Whether any non-delta parameter of ``model`` lives on the ``meta`` device."""
    return any(p.device.type == "meta" for _, p in backbone_parameters(model, True))


def is_comparable_hash(value: Optional[str]) -> bool:
    """Whether ``value`` is a hash made by this module (not OpenDelta 0.3.x's md5)."""
    return isinstance(value, str) and value.startswith(HASH_PREFIX)
