"""Common-structure maps of mixture-of-experts decoders with fused expert weights: data.

transformers 5 stores the experts of an MoE block as 3-D *parameters* of one module, not
as ``nn.Linear`` modules: ``mlp.experts.gate_up_proj`` is ``[E, 2I, H]`` (gate and up
projections of every expert, fused) and ``mlp.experts.down_proj`` is ``[E, H, I]`` (GPT-OSS
stores both transposed, ``[E, H, 2I]`` and ``[E, I, H]``). Besides module names, these maps
therefore name *parameters*; module-level deltas never see those entries (no module has
that name), parameter deltas (:mod:`opendelta.methods.parameter_lora`) do.

Vocabulary added to the common one of :mod:`opendelta.core.structure_maps`:

* ``ff.router``: the router (``mlp.gate`` / ``mlp.router``);
* ``ff.experts``: the module holding the fused experts, with the parameters ``ff.experts.w13``
  (fused gate and up projections, ``w1`` and ``w3`` of every expert; vLLM's name) and
  ``ff.experts.w2`` (down projections);
* ``ff.shared``: an always-active shared expert, with ``w1`` / ``w3`` / ``w2`` like a dense
  feed-forward block;
* ``attn.kv``: the fused key/value up-projection of multi-head latent attention
  (DeepSeek-V2/V3, GLM-4-MoE-Lite), whose query up-projection is ``attn.q``.

Dense feed-forward blocks of the same models (layers before the first MoE layer) keep the
Llama names ``ff.w1`` / ``ff.w3`` / ``ff.w2``. Every model type listed exists with this
layout from transformers 5.0 to the newest tested release (``tests/test_moe.py`` checks
each entry against tiny models).
"""
from __future__ import annotations

from typing import Dict

MoeMap = Dict[str, str]

_BLOCK = "layers.{i}"
_COMMON = "decoder.block.{i}"


def _attention(kind: str) -> MoeMap:
    """Self-attention entries: ``"llama"`` (q/k/v/o projections) or ``"mla"`` (latent)."""
    attn, common = f"{_BLOCK}.self_attn", f"{_COMMON}.attn"
    out = {
        f"{_BLOCK}.input_layernorm": f"{common}.layer_norm",
        attn: common,
        f"{attn}.o_proj": f"{common}.proj",
    }
    if kind == "mla":
        out.update({f"{attn}.q_proj": f"{common}.q", f"{attn}.q_b_proj": f"{common}.q",
                    f"{attn}.kv_b_proj": f"{common}.kv"})
    else:
        out.update({f"{attn}.q_proj": f"{common}.q", f"{attn}.k_proj": f"{common}.k",
                    f"{attn}.v_proj": f"{common}.v"})
    return out


def _moe(block: str = "mlp", router: str = "gate", shared: str = "", dense: bool = False) -> MoeMap:
    """Feed-forward entries of an MoE layer at ``layers.{i}.<block>``."""
    ff, common = f"{_BLOCK}.{block}", f"{_COMMON}.ff"
    out = {
        f"{_BLOCK}.post_attention_layernorm": f"{common}.layer_norm",
        ff: common,
        f"{ff}.{router}": f"{common}.router",
        f"{ff}.experts": f"{common}.experts",
        f"{ff}.experts.gate_up_proj": f"{common}.experts.w13",
        f"{ff}.experts.down_proj": f"{common}.experts.w2",
    }
    if shared:
        out.update({f"{ff}.{shared}": f"{common}.shared", f"{ff}.{shared}.gate_proj": f"{common}.shared.w1",
                    f"{ff}.{shared}.up_proj": f"{common}.shared.w3",
                    f"{ff}.{shared}.down_proj": f"{common}.shared.w2"})
    if dense:  # layers before the first MoE layer have a Llama feed-forward block
        out.update({f"{ff}.gate_proj": f"{common}.w1", f"{ff}.up_proj": f"{common}.w3",
                    f"{ff}.down_proj": f"{common}.w2"})
    return out


def _decoder(attention: str = "llama", router: str = "gate", shared: str = "", dense: bool = False) -> MoeMap:
    return {"embed_tokens": "embeddings", _BLOCK: _COMMON, **_attention(attention),
            **_moe(router=router, shared=shared, dense=dense), "lm_head": "lm_head.proj"}


#: model_type -> map; merged into :data:`opendelta.core.structure_maps.COMMON_STRUCTURES`.
MOE_STRUCTURES: Dict[str, MoeMap] = {
    "mixtral": _decoder(),
    "qwen3_moe": _decoder(dense=True),  # mlp_only_layers are dense
    "qwen2_moe": _decoder(shared="shared_expert", dense=True),
    "qwen3_next": _decoder(shared="shared_expert"),  # full-attention layers; linear ones unmapped
    "olmoe": _decoder(),
    "phimoe": _decoder(router="router"),
    "gpt_oss": _decoder(router="router"),
    "minimax": _decoder(),
    "minimax_m2": _decoder(),
    "deepseek_v2": _decoder("mla", shared="shared_experts", dense=True),
    "deepseek_v3": _decoder("mla", shared="shared_experts", dense=True),
    "glm4_moe_lite": _decoder("mla", shared="shared_experts", dense=True),
    "glm4_moe": _decoder(shared="shared_experts", dense=True),
    "dots1": _decoder(shared="shared_experts", dense=True),
    "ernie4_5_moe": _decoder(shared="shared_experts", dense=True),
    "solar_open": _decoder(shared="shared_experts"),
    "hunyuan_v1_moe": _decoder(shared="shared_mlp"),
}

#: common names of the fused expert parameters (the parameter deltas' default targets).
EXPERT_PARAMETERS = ["ff.experts.w13", "ff.experts.w2"]

__all__ = ["MOE_STRUCTURES", "EXPERT_PARAMETERS"]
