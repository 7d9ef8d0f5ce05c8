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

**Digests are remembered per tensor** (on the tensor object, never pickled into a
checkpoint's weights): a tensor whose digest was computed before is read again only if it
may have changed. It is re-hashed when its version counter moved (every in-place write
through autograd: ``load_state_dict``, non-fused optimizer steps, ``copy_`` / ``add_``
under ``no_grad``), its storage, shape or dtype changed (``.to()``, ``param.data = ...``),
or any of 16 samples of 64 bytes spread over its bytes (first and last included) differs
from what they held. The samples catch the writes the version counter does not see:
fused optimizer steps and in-place writes through ``.data`` that touch them. **What it
does not see**: a write through ``.data`` (or a fused kernel) confined to bytes between the
samples of a tensor hashed earlier in the same process (e.g. editing a few embedding
rows of a large matrix with ``weight.data[i] = ...``); hashes in a new process are always
computed from all bytes. So the second and later saves, loads and checks on a backbone
cost a few microseconds per tensor instead of reading all its bytes (the first one reads
them, about 0.1 s for 90 MB with SHA-256 on one core).

Hashes are strings ``"sha256:<32 hex digits>"``; the prefix tells them apart from the md5
hashes written by OpenDelta 0.3.x (a different recipe, never comparable).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..core.digest import Fingerprint, tensor_bytes, tensor_digest
from ..core.layers import DeltaLayer
from ..core.merging import premerge_fingerprints

HASH_PREFIX = "sha256:"
#: tensors at least this large (bytes) are hashed in worker threads.
_PARALLEL_BYTES = 1 << 20
#: the attribute of a tensor holding its remembered digest (see the module documentation).
_DIGEST_ATTR = "_opendelta_digest"
#: number and size (bytes) of the samples that validate a remembered digest.
_SAMPLES, _SAMPLE_BYTES = 16, 64


# --------------------------------------------------------------------------- remembered digests
def _sample_starts(nbytes: int) -> List[int]:
    step = (nbytes - _SAMPLE_BYTES) / (_SAMPLES - 1)
    return [int(i * step) for i in range(_SAMPLES)]


def _sample(tensor: torch.Tensor) -> bytes:
    """A 16-byte digest of ``_SAMPLES`` chunks of ``_SAMPLE_BYTES`` spread evenly over the
    raw bytes of ``tensor`` (first and last included; all of them when it is small)."""
    nbytes = tensor.numel() * tensor.element_size()
    small = nbytes <= _SAMPLES * _SAMPLE_BYTES
    hasher = hashlib.blake2b(digest_size=16)
    if tensor.device.type == "cpu":
        raw = tensor_bytes(tensor)  # a view of the tensor's memory when contiguous
        hasher.update(raw if small else b"".join(raw[o:o + _SAMPLE_BYTES] for o in _sample_starts(nbytes)))
        return hasher.digest()
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if not small:  # the same bytes, gathered on the device first
        starts = torch.tensor(_sample_starts(nbytes), device=flat.device)
        flat = flat[(starts[:, None] + torch.arange(_SAMPLE_BYTES, device=flat.device)).reshape(-1)]
    hasher.update(flat.cpu().numpy().tobytes())
    return hasher.digest()


def _stamp(tensor: torch.Tensor) -> Tuple[int, int, Tuple[int, ...], torch.dtype]:
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


def remembered_digest(tensor: torch.Tensor) -> Optional[bytes]:
    """The SHA-256 digest computed for ``tensor`` before, if it still describes the tensor
    (see the module documentation); ``None`` otherwise."""
    entry = tensor.__dict__.get(_DIGEST_ATTR)
    if entry is None or entry[0] != _stamp(tensor) or entry[1] != _sample(tensor):
        return None
    return entry[2]


def _remember(tensor: torch.Tensor, digest: bytes) -> None:
    if is_traceable_wrapper_subclass(tensor):  # no storage of its own to stamp
        return
    try:
        tensor.__dict__[_DIGEST_ATTR] = (_stamp(tensor), _sample(tensor), digest)
    except (AttributeError, RuntimeError, TypeError):  # tensors that cannot carry it
        pass


def _cached_tensor_digest(tensor: torch.Tensor) -> bytes:
    """:func:`~opendelta.core.digest.tensor_digest`, remembered on the tensor."""
    digest = remembered_digest(tensor) if _DIGEST_ATTR in tensor.__dict__ else None
    if digest is None:
        digest = tensor_digest(tensor)
        _remember(tensor, digest)
    return digest


def _new_hasher() -> "hashlib._Hash":
    return hashlib.sha256()


def _hexdigest(hasher: "hashlib._Hash") -> str:
    return HASH_PREFIX + hasher.hexdigest()[:32]


def _backbone_modules(model: nn.Module, prefix: str = "", through_replacements: bool = False
                      ) -> Iterator[Tuple[str, nn.Module]]:
    """Named modules of ``model``, skipping delta layers and everything inside them; with
    ``through_replacements``, a module replaced by a delta (``replace_module``) is seen as
    the original, under its own name (the backbone as if no delta were there). Pre-order,
    as ``named_modules``; iterative (no generator per level)."""
    stack: List[Tuple[str, nn.Module]] = [(prefix, model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = []
        for child_name, child in module._modules.items():
            if isinstance(child, DeltaLayer):
                child = child.__dict__.get("original") if through_replacements and child.replaces_child else None
            if child is not None:
                children.append((f"{name}.{child_name}" if name else child_name, child))
        stack.extend(reversed(children))


def _parameters_of(modules: Iterable[Tuple[str, nn.Module]]) -> Iterator[Tuple[str, torch.Tensor]]:
    seen = set()
    for module_name, module in modules:
        for name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{name}" if module_name else name), param


def backbone_parameters(model: nn.Module, through_replacements: bool = False
                        ) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every non-delta parameter of ``model``, shared ones once
    (``through_replacements``: see :func:`_backbone_modules`)."""
    return _parameters_of(_backbone_modules(model, through_replacements=through_replacements))


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
        elif _DIGEST_ATTR in tensor.__dict__:
            remembered = remembered_digest(tensor)
            if remembered is not None:
                digests[id(tensor)] = remembered
    big = [t for _, t in named if id(t) not in digests and t.numel() * t.element_size() >= _PARALLEL_BYTES]
    if len(big) > 1 and (os.cpu_count() or 1) > 1:
        workers = min(len(big), os.cpu_count() or 1, 16)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests.update(zip(map(id, big), pool.map(_cached_tensor_digest, big)))
    for name, tensor in named:
        hasher.update(name.encode())
        digest = digests.get(id(tensor))
        hasher.update(digest if digest is not None else _cached_tensor_digest(tensor))


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
    target = _new_hasher() if hasher is None else hasher
    items = list(parameters.items()) if isinstance(parameters, Mapping) else [("", p) for p in parameters]
    named = []
    for name, tensor in items:
        target.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        if tensor.device.type != "meta":
            named.append((name, tensor))
    _update_with_tensors(target, named)
    return _hexdigest(target) if hasher is None else target.hexdigest()


def _structure_text(modules: Iterable[Tuple[str, nn.Module]]) -> str:
    lines = []
    for name, module in modules:
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
    modules = list(_backbone_modules(model, through_replacements=True))  # walked once
    hasher = _new_hasher()
    hasher.update(_structure_text(modules).encode())
    if with_parameters:
        known: Dict[int, Fingerprint] = {}
        for _, module in modules:
            known.update(premerge_fingerprints(module))
        _update_with_tensors(hasher, [(name, p) for name, p in _parameters_of(modules)
                                      if name not in skip and p.device.type != "meta"], known)
    return _hexdigest(hasher)


def has_meta_parameters(model: nn.Module) -> bool:
    """Whether any non-delta parameter of ``model`` lives on the ``meta`` device."""
    return any(p.device.type == "meta" for _, p in backbone_parameters(model, True))


def is_comparable_hash(value: Optional[str]) -> bool:
    """Whether ``value`` is a hash made by this module (not OpenDelta 0.3.x's md5)."""
    return isinstance(value, str) and value.startswith(HASH_PREFIX)
