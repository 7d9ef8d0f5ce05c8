"""The one case table: every delta method, how the generic tests build it on the tiny
models, and what it supports. Every generic test (matrix, persistence, mechanics, merge,
routing, distributed, bf16, meta device, threads) reads its rows from here, so adding a
method is one file in ``opendelta/methods/`` plus one row below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type

import pytest

import tiny_models as tm
from opendelta import (AdapterModel, BitFitModel, CompacterModel, IA3Model, LoraModel, LowRankAdapterModel,
                       ParallelAdapterModel, ParameterLoraModel, PrefixModel, SoftPromptModel)

#: soft tokens used on the tiny models (they have 64 positions; 100 is tried elsewhere).
PROMPT = 4


@dataclass(frozen=True)
class MethodCase:
    """One row of the table.

    Attributes:
        cls: the delta model class.
        kwargs: constructor arguments (besides the defaults) that fit the tiny models.
        exact_at_init: a fresh delta changes no output, exactly (zero-initialised update).
        mergeable: ``merge()`` / ``unmerge()`` apply.
        routable: ``opendelta.route`` can give different rows different deltas.
        adds_positions: the model's outputs gain leading positions (SoftPrompt on
            non-encoder-decoder models).
        unsupported: architecture -> (exception type, message regex) it must raise.
    """

    cls: Type
    kwargs: Dict[str, Any] = field(default_factory=dict)
    exact_at_init: bool = False
    mergeable: bool = False
    routable: bool = False
    adds_positions: bool = False
    unsupported: Dict[str, Tuple[Type[BaseException], str]] = field(default_factory=dict)


#: SoftPrompt's error on models whose input embedding is no token embedding (transformers
#: 5.0 and 5.24 word it differently for CLIP).
NO_TOKEN_EMBEDDING = "SoftPrompt (cannot read the size of|needs) the input embedding"

TABLE: Dict[str, MethodCase] = {
    "lora": MethodCase(LoraModel, exact_at_init=True, mergeable=True, routable=True),
    "bitfit": MethodCase(BitFitModel, exact_at_init=True, mergeable=True, routable=True),
    "adapter": MethodCase(AdapterModel, routable=True),
    "low_rank_adapter": MethodCase(LowRankAdapterModel, routable=True),
    # hidden 32 // reduction_factor 16 = 2 is not divisible by hypercomplex_division 4
    # (test_compacter_indivisible_sizes_raise); 32 // 8 = 4 is.
    "compacter": MethodCase(CompacterModel, {"reduction_factor": 8}, routable=True),
    "parallel_adapter": MethodCase(ParallelAdapterModel, routable=True),
    # Prefixes go in through the KV cache; DeBERTa-v2, ViT, CLIP and ModernBERT attention has none.
    "prefix": MethodCase(PrefixModel, {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16},
                         unsupported={arch: (NotImplementedError, rf"{cls} \({arch}\).*implemented for")
                                      for arch, cls in (("deberta-v2", "DebertaV2Attention"), ("vit", "ViTAttention"),
                                                        ("clip", "CLIPAttention"),
                                                        ("modernbert", "ModernBertAttention"))}),
    # A soft prompt is made of token embeddings: pixel and audio-frame inputs have none.
    "soft_prompt": MethodCase(SoftPromptModel, {"soft_token_num": PROMPT}, adds_positions=True,
                              unsupported={arch: (ValueError, NO_TOKEN_EMBEDDING)
                                           for arch in ("vit", "clip", "whisper")}),
    "ia3": MethodCase(IA3Model, exact_at_init=True, mergeable=True, routable=True),
    # LoRA on named parameters and modules; on these models (no fused experts) its default
    # targets are attention's (MoE models: tests/test_moe.py).
    "parameter_lora": MethodCase(ParameterLoraModel, exact_at_init=True, mergeable=True, routable=True),
    # LoRA's variants (options of LoraModel; maths and PEFT round trips: test_lora_variants.py).
    "lora_dora": MethodCase(LoraModel, {"use_dora": True}, exact_at_init=True, mergeable=True, routable=True),
    # The residual lives in the base weight, so rows routed elsewhere would see it: not routable;
    # residual + adapter equals the weight within fp32 rounding, not bit for bit.
    "lora_pissa": MethodCase(LoraModel, {"init_lora_weights": "pissa", "lora_r": 4}, mergeable=True),
}

#: method -> (class, constructor arguments): the short view older tests use.
METHODS = {name: (case.cls, case.kwargs) for name, case in TABLE.items()}
#: zero-initialised updates: a fresh delta changes nothing, exactly.
EXACT_AT_INIT = {name for name, case in TABLE.items() if case.exact_at_init}
#: (method, architecture) pairs that must refuse with a clear error instead.
UNSUPPORTED = {(name, arch): error for name, case in TABLE.items() for arch, error in case.unsupported.items()}


def methods(**flags: bool) -> List[str]:
    """Names of the rows whose attributes equal ``flags`` (e.g. ``methods(mergeable=True)``)."""
    return [name for name, case in TABLE.items() if all(getattr(case, k) == v for k, v in flags.items())]


def build(method: str, model: Any, **overrides: Any) -> Any:
    """The delta of row ``method`` on ``model``, with the row's arguments and ``overrides``."""
    case = TABLE[method]
    return case.cls(model, **{**case.kwargs, **overrides})


def supported_pairs(method_names: Optional[List[str]] = None, archs: Optional[List[str]] = None) -> List[Any]:
    """``pytest.param(method, arch)`` for every supported pair of the given rows and
    architectures (default: all)."""
    out = []
    for name in method_names or list(TABLE):
        for arch in archs or tm.ARCH_NAMES:
            if arch not in TABLE[name].unsupported:
                out.append(pytest.param(name, arch, id=f"{name}-{arch}"))
    return out


def real_positions(logits, method, arch):
    """Logits of the caller's tokens (SoftPrompt adds leading positions on non-seq2seq LMs)."""
    if TABLE[method].adds_positions and arch not in tm.ENCODER_DECODER:
        return logits[:, PROMPT:]
    return logits
