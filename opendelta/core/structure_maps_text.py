"""Common-structure maps of newer language models: data, not code.

Gemma 3 (text), Phi-3, Qwen3 and ModernBERT, in the vocabulary of
:mod:`opendelta.core.structure_maps` (names relative to the base model, ``{i}`` a layer
index), merged into ``COMMON_STRUCTURES`` there. Beyond that vocabulary, Gemma 3's norms
after the attention and after the feed-forward block are ``attn.post_layer_norm`` and
``ff.post_layer_norm`` (they normalise a block's *output*; ``layer_norm`` keys, which name
the norm in front of a block, do not match them).
"""
from __future__ import annotations

from typing import Dict


def _decoder(qkv: Dict[str, str], ff: Dict[str, str], norms: Dict[str, str]) -> Dict[str, str]:
    """A Llama-like decoder stack ``layers.{i}`` with the given attention projections,
    feed-forward projections (``mlp.<name>``) and per-block norms."""
    layer, block = "layers.{i}", "decoder.block.{i}"
    out = {"embed_tokens": "embeddings", layer: block,
           f"{layer}.self_attn": f"{block}.attn",
           f"{layer}.self_attn.o_proj": f"{block}.attn.proj",
           f"{layer}.mlp": f"{block}.ff",
           "lm_head": "lm_head.proj"}
    out.update({f"{layer}.self_attn.{name}": f"{block}.attn.{common}" for name, common in qkv.items()})
    out.update({f"{layer}.mlp.{name}": f"{block}.ff.{common}" for name, common in ff.items()})
    out.update({f"{layer}.{name}": f"{block}.{common}" for name, common in norms.items()})
    return out


_SEPARATE_QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
_GATED_FF = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_PRE_NORMS = {"input_layernorm": "attn.layer_norm", "post_attention_layernorm": "ff.layer_norm"}

QWEN3 = _decoder(_SEPARATE_QKV, _GATED_FF, _PRE_NORMS)
# Phi-3 fuses q/k/v in one projection and gate/up in another (gate_up_proj: "w1").
PHI3 = _decoder({"qkv_proj": "qkv"}, {"gate_up_proj": "w1", "down_proj": "w2"}, _PRE_NORMS)
# Gemma 3 normalises before and after both sub-blocks.
GEMMA3_TEXT = _decoder(_SEPARATE_QKV, _GATED_FF, {
    "input_layernorm": "attn.layer_norm", "post_attention_layernorm": "attn.post_layer_norm",
    "pre_feedforward_layernorm": "ff.layer_norm", "post_feedforward_layernorm": "ff.post_layer_norm"})

MODERNBERT: Dict[str, str] = {
    "embeddings.tok_embeddings": "embeddings",
    "layers.{i}": "encoder.block.{i}",
    # attn_norm has no common name: in the first block it is an Identity (the embeddings
    # are normalised already), and a common "layer_norm" must be a norm.
    "layers.{i}.attn": "encoder.block.{i}.attn",
    "layers.{i}.attn.Wqkv": "encoder.block.{i}.attn.qkv",
    "layers.{i}.attn.Wo": "encoder.block.{i}.attn.proj",
    "layers.{i}.mlp_norm": "encoder.block.{i}.ff.layer_norm",
    "layers.{i}.mlp": "encoder.block.{i}.ff",
    # Wi computes the GLU's input and gate at once.
    "layers.{i}.mlp.Wi": "encoder.block.{i}.ff.w1",
    "layers.{i}.mlp.Wo": "encoder.block.{i}.ff.w2",
    "decoder": "lm_head.proj",  # ModernBertForMaskedLM
}

#: model_type -> structure map, merged into ``COMMON_STRUCTURES``.
TEXT_STRUCTURES: Dict[str, Dict[str, str]] = {
    "gemma3_text": GEMMA3_TEXT,
    "phi3": PHI3,
    "qwen3": QWEN3,
    "modernbert": MODERNBERT,
}
