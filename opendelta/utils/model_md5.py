"""Model and parameter hashes at their documented path (``opendelta.utils.model_md5``).

The hashing itself lives in :mod:`opendelta.io.hashing` (SHA-256 of the raw parameter
bytes, deltas excluded); this module keeps the documented names and arguments.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Optional, Union

import torch

from ..io.hashing import gen_model_hash
from ..io.hashing import gen_parameter_hash as _parameter_hash


def gen_parameter_hash(generator: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]],
                       md5: Optional["hashlib._Hash"] = None) -> "hashlib._Hash":
    """Feed the values, shapes and dtypes of some parameters to a hash object.

    Args:
        generator: tensors (e.g. ``model.parameters()``) or a mapping name -> tensor.
        md5: a ``hashlib`` object to update, e.g. one that already holds a model's
            structure; default a new SHA-256 object. (The name is the documented one; any
            ``hashlib`` algorithm works.)

    Returns:
        the updated hash object (call ``.hexdigest()`` on it), as documented. Its
        digest is the one :func:`opendelta.io.hashing.gen_parameter_hash` computes.
    """
    hasher = hashlib.sha256() if md5 is None else md5
    if not hasattr(hasher, "update") or not hasattr(hasher, "hexdigest"):
        raise TypeError(f"md5 must be a hashlib object such as hashlib.md5(), got {type(md5).__name__}")
    parameters = generator if isinstance(generator, Mapping) else list(generator)
    _parameter_hash(parameters, hasher)
    return hasher


__all__ = ["gen_model_hash", "gen_parameter_hash"]
