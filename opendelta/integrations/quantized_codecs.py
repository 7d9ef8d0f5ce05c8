"""The storage formats of quantized Linear weights that merging can read and rewrite.

One :class:`~opendelta.core.quantized_merge.WeightCodec` per format:

* :class:`Bnb4bitCodec`: bitsandbytes ``Linear4bit`` (``Params4bit``: NF4 or FP4 codes in
  blocks of ``blocksize`` values sharing one absmax, optionally itself quantized,
  "double quantization"). On CPUs with AVX512-BF16, bitsandbytes repacks a weight in place
  at the first inference forward (bf16 absmax); it is read back through bitsandbytes' own
  inverse conversion.
* :class:`Bnb8bitCodec`: bitsandbytes ``Linear8bitLt`` (``Int8Params``: int8 codes, one
  absmax ``SCB`` per output row; LLM.int8()).
* :class:`TorchaoInt8Codec`: an ``nn.Linear`` whose weight torchao's
  ``quantize_(model, Int8WeightOnlyConfig())`` made an ``Int8Tensor`` (int8 codes, one
  scale per row or one for the tensor, symmetric). Other torchao tensor types dequantize
  (for ``merge_and_detach(dequantize=True)``) but are not requantized: ``merge()`` refuses.

Recognising a format reads class names only; bitsandbytes and torchao are imported inside
the methods, which only run on weights those libraries created (so they are loaded).

Error bounds of one requantization of the float weight ``W`` (what :class:`MergeError.bound`
states; ``W'`` is ``W`` cast to the layer's storage dtype):

* 4-bit, per block ``b`` of ``blocksize`` values with absmax ``A_b`` of ``W'`` and stored
  (possibly double-quantized) absmax ``A'_b``: ``|err| <= g/2 * A_b + |A_b - A'_b|`` plus
  ``max |W - W'|``, with ``g`` the widest gap between neighbouring code values (NF4:
  ``1 - 0.6962 = 0.3038``; FP4: ``1 - 0.6667 = 0.3333``);
* 8-bit (bitsandbytes, rows quantized from fp16 as bitsandbytes does): ``SCB_row / 254``
  plus the fp16 rounding of ``W``;
* torchao int8: half a quantization step, ``scale_row / 2``, plus the dtype rounding.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..core.quantized_merge import WeightCodec, is_quantized, register_weight_codec

#: float rounding slack added to every bound (relative to max |W|).
_SLACK = 1e-5


def _class_of(tensor: Any) -> Tuple[str, str]:
    cls = type(tensor)
    return cls.__module__, cls.__name__


def _become_linear(module: nn.Module, weight: torch.Tensor, drop: Tuple[str, ...] = ()) -> None:
    """Turn ``module`` (an ``nn.Linear`` subclass of a quantization library, or an
    ``nn.Linear`` with a quantized weight) into a plain ``nn.Linear`` holding ``weight``.
    The object stays the same: its hooks, children and every reference to it stay valid."""
    module.__class__ = nn.Linear
    module._parameters["weight"] = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    for attr in drop:
        module.__dict__.pop(attr, None)
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items()
                if getattr(getattr(h, "hook", h), "__module__", "").startswith("bitsandbytes")]:
        del hooks[key]


def forget_quantization(backbone: nn.Module) -> None:
    """Once no quantized module is left: drop what transformers keeps about the quantization
    (its quantizer's ``remove_quantization_config``: ``hf_quantizer``,
    ``config.quantization_config``, ...; ``is_loaded_in_4bit`` / ``_8bit``), so that
    ``save_pretrained`` writes, and ``from_pretrained`` reads, a full-precision model."""
    if any(is_quantized(module) for module in backbone.modules()):
        return
    quantizer = getattr(backbone, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(backbone)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(backbone, flag, False):
            setattr(backbone, flag, False)


class _Codec(WeightCodec):
    def after_dequantize(self, backbone: nn.Module) -> None:
        forget_quantization(backbone)


def _rounding(weight: torch.Tensor, dtype: torch.dtype) -> float:
    return float((weight - weight.to(dtype).float()).abs().max())


class Bnb4bitCodec(_Codec):
    """bitsandbytes ``Linear4bit`` (NF4 / FP4)."""

    name = "bnb-4bit"

    def handles(self, module: nn.Module) -> bool:
        owner, cls = _class_of(module._parameters.get("weight"))
        return cls == "Params4bit" and owner.startswith("bitsandbytes")

    @staticmethod
    def _unpacked(param: Any) -> Tuple[torch.Tensor, Any]:
        """``(codes, quant_state)`` in bitsandbytes' standard layout (undoing its CPU repacking
        on a copy of the state)."""
        state = param.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            return _convert_weight_packed_for_cpu_inverse(param.data, copy.deepcopy(state))
        return param.data, state

    def original_dtype(self, module: nn.Module) -> Optional[torch.dtype]:
        state = module.weight.quant_state
        return getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) \
            else state.dtype

    def keep(self, module: nn.Module) -> Any:
        return module.weight

    def restore(self, module: nn.Module, kept: Any) -> None:
        module._parameters["weight"] = kept
        module.quant_state = kept.quant_state

    def dequantize(self, module: nn.Module, kept: Any = None) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        codes, state = self._unpacked(module.weight if kept is None else kept)
        return dequantize_4bit(codes, state)

    def store(self, module: nn.Module, weight: torch.Tensor, kept: Any) -> None:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit

        codes, state = quantize_4bit(weight.contiguous(), blocksize=kept.blocksize,
                                     compress_statistics=kept.compress_statistics, quant_type=kept.quant_type,
                                     quant_storage=kept.quant_storage)
        param = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=kept.blocksize,
                                  compress_statistics=kept.compress_statistics, quant_type=kept.quant_type,
                                  quant_storage=kept.quant_storage, module=module, bnb_quantized=True)
        module._parameters["weight"] = param
        module.quant_state = state

    def error_bound(self, module: nn.Module, weight: torch.Tensor) -> float:
        from bitsandbytes.functional import dequantize_blockwise, get_4bit_type

        param = module.weight
        state = param.quant_state
        stored = weight.to(state.dtype).float()
        code = get_4bit_type(state.quant_type, device="cpu").float().sort().values
        gap = float((code[1:] - code[:-1]).max())
        absmax = stored.reshape(-1)
        pad = (-absmax.numel()) % state.blocksize
        absmax = torch.nn.functional.pad(absmax, (0, pad)).reshape(-1, state.blocksize).abs().max(dim=1).values
        if state.nested:
            saved = dequantize_blockwise(state.absmax, state.state2).float() + state.offset
        else:
            saved = state.absmax.float()
        per_block = gap / 2 * absmax + (absmax - saved.reshape(-1).to(absmax.device)).abs()
        scale = float(weight.abs().max())
        return float(per_block.max()) + _rounding(weight, state.dtype) + _SLACK * scale

    def to_float(self, module: nn.Module, weight: torch.Tensor) -> None:
        _become_linear(module, weight, ("quant_state", "compute_dtype", "compute_type_is_set", "quant_storage",
                                        "support_avx512bf16_for_cpu"))


class Bnb8bitCodec(_Codec):
    """bitsandbytes ``Linear8bitLt`` (int8 codes, per-row absmax ``SCB``)."""

    name = "bnb-int8"

    def handles(self, module: nn.Module) -> bool:
        owner, cls = _class_of(module._parameters.get("weight"))
        return cls == "Int8Params" and owner.startswith("bitsandbytes") and module.weight.dtype == torch.int8

    @staticmethod
    def _scales(module: nn.Module, param: Any) -> torch.Tensor:
        scb = getattr(param, "SCB", None)
        if scb is None and param is module.weight:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise RuntimeError(f"{type(module).__name__}'s int8 weight has no row scales (SCB); move the model "
                               "to its device first (bitsandbytes quantizes on .to())")
        return scb

    def requantize_problem(self, module: nn.Module) -> Optional[str]:
        if getattr(getattr(module, "state", None), "has_fp16_weights", False):
            return "its 8-bit weights are kept in fp16 (has_fp16_weights=True); merge into a plain Linear instead"
        return None

    def keep(self, module: nn.Module) -> Any:
        return module.weight, self._scales(module, module.weight)

    def restore(self, module: nn.Module, kept: Any) -> None:
        param, scb = kept
        param.CB, param.SCB = param.data, scb
        module._parameters["weight"] = param
        module.state.CB = module.state.SCB = None  # the next forward takes them from the weight

    def dequantize(self, module: nn.Module, kept: Any = None) -> torch.Tensor:
        param, scb = (module.weight, self._scales(module, module.weight)) if kept is None else kept
        return param.data.float() * (scb.float().reshape(-1, 1) / 127.0)

    def store(self, module: nn.Module, weight: torch.Tensor, kept: Any) -> None:
        import bitsandbytes as bnb
        from bitsandbytes.functional import int8_vectorwise_quant

        # As Int8Params._quantize does: rows quantized from fp16.
        codes, scb, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        param = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
        module._parameters["weight"] = param
        module.state.CB = module.state.SCB = None

    def error_bound(self, module: nn.Module, weight: torch.Tensor) -> float:
        scb = self._scales(module, module.weight).float()
        scale = float(weight.abs().max())
        return float(scb.max()) / 254.0 + _rounding(weight, torch.float16) + _SLACK * scale

    def to_float(self, module: nn.Module, weight: torch.Tensor) -> None:
        _become_linear(module, weight, ("state", "index"))


class TorchaoInt8Codec(_Codec):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (requantization: ``Int8Tensor``)."""

    name = "torchao-int8"

    def handles(self, module: nn.Module) -> bool:
        owner, _ = _class_of(module._parameters.get("weight"))
        return owner.startswith("torchao") and hasattr(module.weight, "dequantize")

    def requantize_problem(self, module: nn.Module) -> Optional[str]:
        name = type(module.weight).__name__
        if name != "Int8Tensor":
            return (f"its torchao weight is a {name}; only Int8Tensor weights (Int8WeightOnlyConfig) are "
                    "requantized. Use merge_and_detach(dequantize=True), or keep the delta unmerged")
        return None

    def original_dtype(self, module: nn.Module) -> Optional[torch.dtype]:
        return module.weight.dtype

    def keep(self, module: nn.Module) -> Any:
        return module._parameters["weight"]

    def restore(self, module: nn.Module, kept: Any) -> None:
        module._parameters["weight"] = kept

    def dequantize(self, module: nn.Module, kept: Any = None) -> torch.Tensor:
        return (module.weight if kept is None else kept).dequantize()

    def store(self, module: nn.Module, weight: torch.Tensor, kept: Any) -> None:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow, PerTensor

        per_row = list(kept.block_size) == [1, int(weight.shape[1])]
        quantized = Int8Tensor.from_hp(weight.contiguous(), granularity=PerRow() if per_row else PerTensor(),
                                       act_quant_kwargs=kept.act_quant_kwargs, reduce_range=kept.reduce_range)
        module._parameters["weight"] = nn.Parameter(quantized, requires_grad=False)

    def error_bound(self, module: nn.Module, weight: torch.Tensor) -> float:
        scale = float(module.weight.scale.float().abs().max())
        return scale / 2 + _rounding(weight, module.weight.dtype) + _SLACK * float(weight.abs().max())

    def to_float(self, module: nn.Module, weight: torch.Tensor) -> None:
        _become_linear(module, weight)


CODECS = (register_weight_codec(Bnb4bitCodec()), register_weight_codec(Bnb8bitCodec()),
          register_weight_codec(TorchaoInt8Codec()))

__all__ = ["Bnb4bitCodec", "Bnb8bitCodec", "TorchaoInt8Codec", "CODECS", "forget_quantization"]
