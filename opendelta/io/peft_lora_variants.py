"""PEFT's LoRA variants in the PEFT adapter format: rsLoRA, DoRA, PiSSA and OLoRA.

Used by :mod:`opendelta.io.peft` (``save_peft_lora`` / ``load_peft_lora``):

* **rsLoRA** (``use_rslora``): the same flag on both sides; ``lora_alpha`` is written as it
  is (the scaling is ``alpha / sqrt(r)`` in both libraries).
* **DoRA** (``use_dora``): the magnitude vector travels as
  ``base_model.model.<module>.lora_magnitude_vector`` (``[out_features]``), PEFT's key.
* **PiSSA / OLoRA**: our delta holds a residual in the base weight. It is exported the way
  PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does: as a
  plain LoRA of the *original* weight with rank ``2r``, ``A' = [A; A0]``,
  ``B' = [B, -B0]`` and ``lora_alpha`` doubled (times ``sqrt(2)`` with rsLoRA) so the
  scaling is unchanged; it loads on an unmodified backbone. An adapter saved by PEFT
  without that conversion (``init_lora_weights: "pissa"`` / ``"olora"``) is imported by
  starting our LoRA the same way on the original backbone (the residual is recomputed, as
  PEFT does when it loads one) and loading the trained ``A`` and ``B``.

Layers are read by duck typing (``lora_magnitude_vector``, ``has_residual``), so this
module needs nothing from :mod:`opendelta.methods`.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .files import CheckpointError

#: PEFT's key suffix of a DoRA magnitude vector (and our parameter name).
MAGNITUDE_KEY = "lora_magnitude_vector"
_RESIDUAL = ("pissa", "olora")


def export_tensors(layer: Any) -> Dict[str, torch.Tensor]:
    """Key suffix -> tensor of one LoRA layer in PEFT's format (see the module docs)."""
    lora_A, lora_B = layer.lora_A, layer.lora_B
    if getattr(layer, "has_residual", False):
        lora_A = torch.cat([lora_A.detach(), layer.lora_A_init.to(lora_A.dtype)], dim=0)
        lora_B = torch.cat([lora_B.detach(), -layer.lora_B_init.to(lora_B.dtype)], dim=1)
    out = {"lora_A.weight": lora_A, "lora_B.weight": lora_B}
    magnitude = getattr(layer, MAGNITUDE_KEY, None)
    if isinstance(magnitude, torch.Tensor):
        out[MAGNITUDE_KEY] = magnitude
    return out


def export_options(config: Any) -> Dict[str, Any]:
    """``adapter_config.json`` entries for a LoRA config: rank, alpha and the variant flags."""
    r, alpha = config.lora_r, config.lora_alpha
    if getattr(config, "init_lora_weights", True) in _RESIDUAL:  # converted to a rank-2r LoRA
        r, alpha = 2 * r, alpha * (math.sqrt(2) if config.use_rslora else 2)
    return {"r": r, "lora_alpha": alpha, "use_rslora": bool(getattr(config, "use_rslora", False)),
            "use_dora": bool(getattr(config, "use_dora", False)), "init_lora_weights": True}


def import_options(config: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``LoraModel`` keyword arguments for the variant options of a PEFT ``adapter_config``.

    Raises:
        CheckpointError: an initialisation whose residual cannot be rebuilt (``loftq``,
            ``pissa_niter_*``, ``corda``, ``eva``, ...).
    """
    options: Dict[str, Any] = {"use_rslora": bool(config.get("use_rslora", False)),
                               "use_dora": bool(config.get("use_dora", False))}
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        if init.lower() in _RESIDUAL:
            options["init_lora_weights"] = init.lower()
        elif init.lower() != "gaussian":  # gaussian starts change nothing once trained weights load
            raise CheckpointError(f"{source}: init_lora_weights={init!r} is not supported: its base-weight "
                                  "residual cannot be rebuilt; supported: True, 'gaussian', 'pissa', 'olora' (or "
                                  "save the adapter with PEFT's path_initial_model_for_weight_conversion)")
    return options


__all__ = ["MAGNITUDE_KEY", "export_options", "export_tensors", "import_options"]
