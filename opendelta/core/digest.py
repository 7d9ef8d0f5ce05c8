"""SHA-256 fingerprints of tensor values, shared by merging (which remembers what a weight
held before a merge changed it) and :mod:`opendelta.io.hashing` (backbone hashes)."""
from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


class Fingerprint(NamedTuple):
    """What a tensor held: the SHA-256 digest of its raw bytes, with its shape and dtype
    (a digest only stands for a tensor of the same shape and dtype)."""

    digest: bytes
    shape: Tuple[int, ...]
    dtype: torch.dtype

    def describes(self, tensor: torch.Tensor) -> bool:
        return tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (any dtype, any device but meta), on the CPU."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    # reshape(-1) makes 0-d tensors viewable; view(uint8) reinterprets bf16/fp8 bytes, which
    # numpy cannot represent directly.
    return data.contiguous().reshape(-1).view(torch.uint8).numpy().data


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 digest (32 bytes) of the raw bytes of ``tensor``; for a wrapper tensor subclass
    (torchao's quantized weights), of the digests of the tensors it is made of, in order."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        hasher = hashlib.sha256()
        for name in names:
            inner = getattr(tensor, name)
            if inner is not None:
                hasher.update(name.encode())
                hasher.update(tensor_digest(inner))
        return hasher.digest()
    return hashlib.sha256(tensor_bytes(tensor)).digest()


def fingerprint(tensor: torch.Tensor) -> Optional[Fingerprint]:
    """The :class:`Fingerprint` of ``tensor``; ``None`` on the meta device (no values)."""
    if tensor.device.type == "meta":
        return None
    return Fingerprint(tensor_digest(tensor), tuple(tensor.shape), tensor.dtype)
