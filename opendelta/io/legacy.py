"""Reading checkpoints written by the original OpenDelta (0.3.x).

Those directories hold ``config.json`` and ``pytorch_model.bin`` (a pickled ``OrderedDict``
of tensors, read here with ``torch.load(weights_only=True)``: no code is ever unpickled).
Three differences from our format are bridged:

* **Targets.** A default configuration is saved with OpenDelta's internal common names
  marked with ``@`` (``"attn@.q@"``) and its own default list, which may name modules the
  backbone does not have (``"lm_head@.proj@"`` on a classifier). ``@`` marks are stripped by
  :class:`~opendelta.core.base.DeltaBase`; entries that match no module are dropped here,
  as the original skipped them.
* **BitFit.** The original trained the backbone's existing biases in place
  (``...query.bias``); ours adds a zero-initialised bias delta (``...query.bitfit.bias``)
  and keeps the backbone untouched. A saved bias ``b'`` becomes the delta ``b' - b`` where
  ``b`` is the fresh backbone's bias (the output ``Wx + b + (b' - b)`` equals ``Wx + b'`` to
  float rounding, ~1e-7). Biases the original did not touch get a zero delta.
* **The backbone hash** is the md5 of the original's recipe (including the delta's random
  parameters), never comparable with ours: it is not checked (see
  :func:`opendelta.io.hashing.is_comparable_hash`).

Parameter names of the other methods are the same in both libraries, and extra entries
(``classifier.*``) are backbone parameters the original left trainable: they load as such.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import torch
from torch import nn

from ..core.addressing import endswith_in
from ..core.structure import CommonStructureMap
from .state import delta_tensors

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase


def is_legacy_config(config: Dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict was written by OpenDelta 0.3.x."""
    version = str(config.get("opendelta_version", ""))
    marked = any("@" in str(k) for k in (config.get("modified_modules") or []))
    return marked or version.startswith(("0.1", "0.2", "0.3"))


def upgrade_legacy_config(config: Dict[str, Any], backbone_model: nn.Module) -> Dict[str, Any]:
    """A copy of a legacy config dict whose ``@``-marked common-structure targets that match
    no module of ``backbone_model`` are dropped (the original skipped them silently).

    Plain (unmarked) targets are kept as they are, so a wrong name still raises. Duplicates
    are kept (ParallelAdapter's ``["attn@", "attn@", ...]`` are (input, output) pairs).
    """
    keys = config.get("modified_modules")
    if not keys or not any("@" in str(k) for k in keys):
        return dict(config)
    mapping = CommonStructureMap.load(backbone_model)
    if mapping is None:
        return dict(config)
    commons = [c for c in (mapping.transform(n) for n, _ in backbone_model.named_modules() if n) if c]

    def matches(key: str) -> bool:
        return "@" not in key or any(endswith_in(c, [key.replace("@", "")]) for c in commons)

    # ParallelAdapter reads its targets in (input, output) pairs: keep or drop whole pairs.
    group = 2 if _normalised_type(config.get("delta_type")) == "parallel_adapter" else 1
    groups = [keys[i:i + group] for i in range(0, len(keys), group)]
    kept = [k for g in groups if all(matches(k) for k in g) for k in g]
    return {**config, "modified_modules": kept}


def _normalised_type(delta_type: Any) -> str:
    from ..core.registry import get_delta_class

    try:
        return get_delta_class(str(delta_type)).delta_type
    except ValueError:
        return str(delta_type)


def convert_legacy_state_dict(delta: "DeltaBase", state_dict: Dict[str, torch.Tensor]
                              ) -> Dict[str, torch.Tensor]:
    """Turn an OpenDelta 0.3.x state dict into the canonical names of ``delta``.

    Only BitFit changes (see the module docstring); everything else passes through and is
    checked strictly by :meth:`~opendelta.io.checkpoint.SaveLoadMixin.load_delta_state_dict`.
    """
    if delta.delta_type != "bitfit":
        return dict(state_dict)
    targets = delta_tensors(delta)
    backbone_params = dict(delta.backbone_model.named_parameters())
    layer_name = type(delta).layer_name
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        host, _, leaf = key.rpartition(".")
        delta_key = f"{host}.{layer_name}.{leaf}" if host else f"{layer_name}.{leaf}"
        if leaf == "bias" and delta_key in targets:
            original = backbone_params.get(key)
            if original is not None and original.shape == value.shape:
                # Subtract in float64 so the delta carries b' - b as exactly as possible.
                value = (value.double() - original.detach().to("cpu", torch.float64)).to(value.dtype)
            out[delta_key] = value
        else:
            out[key] = value
    for key, tensor in targets.items():
        if key not in out:  # a bias the original did not train: unchanged, i.e. a zero delta
            out[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    return out
