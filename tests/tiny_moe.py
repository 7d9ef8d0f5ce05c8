"""Tiny random mixture-of-experts decoders with fused expert weights (no downloads).

``build("mixtral")`` / ``build("qwen3_moe")``: hidden 32, 2 layers, 8 experts, top-2, float64
by default (exact comparisons) and the ``eager`` experts implementation (transformers' default,
``grouped_mm``, has no float64 CPU kernel; tests of the other implementations run in float32).
``CONFIGS`` builds every model type of :data:`opendelta.core.structure_maps_moe.MOE_STRUCTURES`,
with the options that make each map entry exist (a dense first layer, a shared expert, ...).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

EXPERTS = 8
TOP_K = 2
VOCAB = 96

_COMMON: Dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    moe_intermediate_size=16, num_experts=EXPERTS, num_local_experts=EXPERTS, n_routed_experts=EXPERTS,
    num_experts_per_tok=TOP_K, vocab_size=VOCAB, max_position_embeddings=64, head_dim=8, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2)

_DENSE_FIRST = dict(first_k_dense_replace=1)
#: per model type: the options under which every entry of its map names something.
_EXTRA: Dict[str, Dict[str, Any]] = {
    "qwen3_moe": dict(mlp_only_layers=[0]),
    "qwen2_moe": dict(mlp_only_layers=[0], shared_expert_intermediate_size=16),
    "qwen3_next": dict(layer_types=["full_attention", "full_attention"], shared_expert_intermediate_size=16),
    "minimax": dict(layer_types=["full_attention", "full_attention"]),
    "ernie4_5_moe": dict(moe_layer_start_index=1),
    **{t: _DENSE_FIRST for t in ("deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1")},
}
#: model types whose maps list alternatives one model cannot hold at once: the extra variants.
VARIANTS: Dict[str, List[Dict[str, Any]]] = {
    t: [dict(q_lora_rank=None)] for t in ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")
}


def config(model_type: str, **overrides: Any) -> Any:
    import transformers

    return transformers.AutoConfig.for_model(model_type, **{**_COMMON, **_EXTRA.get(model_type, {}), **overrides})


def build(model_type: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float64,
          experts_implementation: str = "eager", **overrides: Any) -> torch.nn.Module:
    """A tiny causal LM of ``model_type`` (eval mode)."""
    import transformers

    if model_type == "qwen3_moe":  # every layer an MoE layer (the map guard builds a dense one too)
        overrides.setdefault("mlp_only_layers", [])
    cfg = config(model_type, **overrides)
    cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def inputs(batch: int = 2, length: int = 7, seed: int = 1) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
