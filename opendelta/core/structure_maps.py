"""Common-structure maps: data, not code.

Each map sends the name of a module *relative to the base model* (with ``{i}`` standing
for a layer index) to its common name. The common vocabulary follows OpenDelta:

``embeddings``; ``encoder.block.{i}`` / ``decoder.block.{i}``; inside a block ``attn``
(self-attention) with ``q``, ``k``, ``v``, ``qkv`` (fused), ``proj`` (output projection)
and ``layer_norm``; ``crossattn`` with the same children; ``ff`` (feed-forward) with
``w1`` (up / gate), ``w3`` (second up projection of gated units), ``w2`` (down) and
``layer_norm``; ``lm_head`` with ``proj``.

A map applies to a whole model and to its task wrappers, since names are matched on a
tail that begins on a segment boundary (``bert.encoder.layer.0...`` for
``BertForSequenceClassification``).
"""
from __future__ import annotations

from typing import Dict

from .structure_maps_moe import MOE_STRUCTURES
from .structure_maps_text import TEXT_STRUCTURES
from .structure_maps_vision import VISION_STRUCTURES

StructureMap = Dict[str, str]


def _bert_family(q: str, k: str, v: str, lm_head: Dict[str, str]) -> StructureMap:
    block = "encoder.layer.{i}"
    common = "encoder.block.{i}"
    return {
        "embeddings.word_embeddings": "embeddings",
        block: common,
        f"{block}.attention": f"{common}.attn",
        f"{block}.attention.self.{q}": f"{common}.attn.q",
        f"{block}.attention.self.{k}": f"{common}.attn.k",
        f"{block}.attention.self.{v}": f"{common}.attn.v",
        f"{block}.attention.output.dense": f"{common}.attn.proj",
        f"{block}.attention.output.LayerNorm": f"{common}.attn.layer_norm",
        # BERT's feed-forward block is split in two modules; both are "ff".
        f"{block}.intermediate": f"{common}.ff",
        f"{block}.intermediate.dense": f"{common}.ff.w1",
        f"{block}.output": f"{common}.ff",
        f"{block}.output.dense": f"{common}.ff.w2",
        f"{block}.output.LayerNorm": f"{common}.ff.layer_norm",
        **lm_head,
    }


_CLS_HEAD = {"cls.predictions": "lm_head", "cls.predictions.decoder": "lm_head.proj"}

BERT = _bert_family("query", "key", "value", _CLS_HEAD)
ROBERTA = _bert_family("query", "key", "value", {"lm_head": "lm_head", "lm_head.decoder": "lm_head.proj"})
DEBERTA_V2 = _bert_family("query_proj", "key_proj", "value_proj", _CLS_HEAD)

DISTILBERT: StructureMap = {
    "embeddings.word_embeddings": "embeddings",
    "transformer.layer.{i}": "encoder.block.{i}",
    "transformer.layer.{i}.attention": "encoder.block.{i}.attn",
    "transformer.layer.{i}.attention.q_lin": "encoder.block.{i}.attn.q",
    "transformer.layer.{i}.attention.k_lin": "encoder.block.{i}.attn.k",
    "transformer.layer.{i}.attention.v_lin": "encoder.block.{i}.attn.v",
    "transformer.layer.{i}.attention.out_lin": "encoder.block.{i}.attn.proj",
    "transformer.layer.{i}.sa_layer_norm": "encoder.block.{i}.attn.layer_norm",
    "transformer.layer.{i}.ffn": "encoder.block.{i}.ff",
    "transformer.layer.{i}.ffn.lin1": "encoder.block.{i}.ff.w1",
    "transformer.layer.{i}.ffn.lin2": "encoder.block.{i}.ff.w2",
    "transformer.layer.{i}.output_layer_norm": "encoder.block.{i}.ff.layer_norm",
    "vocab_projector": "lm_head.proj",
}

GPT2: StructureMap = {
    "wte": "embeddings",
    "h.{i}": "decoder.block.{i}",
    "h.{i}.ln_1": "decoder.block.{i}.attn.layer_norm",
    "h.{i}.attn": "decoder.block.{i}.attn",
    "h.{i}.attn.c_attn": "decoder.block.{i}.attn.qkv",
    "h.{i}.attn.c_proj": "decoder.block.{i}.attn.proj",
    "h.{i}.ln_2": "decoder.block.{i}.ff.layer_norm",
    "h.{i}.mlp": "decoder.block.{i}.ff",
    "h.{i}.mlp.c_fc": "decoder.block.{i}.ff.w1",
    "h.{i}.mlp.c_proj": "decoder.block.{i}.ff.w2",
    "lm_head": "lm_head.proj",
}

OPT: StructureMap = {
    "decoder.embed_tokens": "embeddings",
    "decoder.layers.{i}": "decoder.block.{i}",
    "decoder.layers.{i}.self_attn": "decoder.block.{i}.attn",
    "decoder.layers.{i}.self_attn.q_proj": "decoder.block.{i}.attn.q",
    "decoder.layers.{i}.self_attn.k_proj": "decoder.block.{i}.attn.k",
    "decoder.layers.{i}.self_attn.v_proj": "decoder.block.{i}.attn.v",
    "decoder.layers.{i}.self_attn.out_proj": "decoder.block.{i}.attn.proj",
    "decoder.layers.{i}.self_attn_layer_norm": "decoder.block.{i}.attn.layer_norm",
    "decoder.layers.{i}.fc1": "decoder.block.{i}.ff.w1",
    "decoder.layers.{i}.fc2": "decoder.block.{i}.ff.w2",
    "decoder.layers.{i}.final_layer_norm": "decoder.block.{i}.ff.layer_norm",
    "lm_head": "lm_head.proj",
}


def _t5_attention(original: str, common: str, module: str) -> StructureMap:
    return {
        original: common,
        f"{original}.{module}.q": f"{common}.q",
        f"{original}.{module}.k": f"{common}.k",
        f"{original}.{module}.v": f"{common}.v",
        f"{original}.{module}.o": f"{common}.proj",
        f"{original}.layer_norm": f"{common}.layer_norm",
    }


def _t5_ff(original: str, common: str) -> StructureMap:
    return {
        original: common,
        f"{original}.DenseReluDense.wi": f"{common}.w1",
        f"{original}.DenseReluDense.wi_0": f"{common}.w1",
        f"{original}.DenseReluDense.wi_1": f"{common}.w3",
        f"{original}.DenseReluDense.wo": f"{common}.w2",
        f"{original}.layer_norm": f"{common}.layer_norm",
    }


T5: StructureMap = {
    "shared": "embeddings",
    "encoder.block.{i}": "encoder.block.{i}",
    **_t5_attention("encoder.block.{i}.layer.0", "encoder.block.{i}.attn", "SelfAttention"),
    **_t5_ff("encoder.block.{i}.layer.1", "encoder.block.{i}.ff"),
    "decoder.block.{i}": "decoder.block.{i}",
    **_t5_attention("decoder.block.{i}.layer.0", "decoder.block.{i}.attn", "SelfAttention"),
    **_t5_attention("decoder.block.{i}.layer.1", "decoder.block.{i}.crossattn", "EncDecAttention"),
    **_t5_ff("decoder.block.{i}.layer.2", "decoder.block.{i}.ff"),
    "lm_head": "lm_head.proj",
}


def _bart_attention(original: str, common: str) -> StructureMap:
    return {
        original: common,
        f"{original}.q_proj": f"{common}.q",
        f"{original}.k_proj": f"{common}.k",
        f"{original}.v_proj": f"{common}.v",
        f"{original}.out_proj": f"{common}.proj",
        f"{original}_layer_norm": f"{common}.layer_norm",
    }


def _bart_layer(side: str) -> StructureMap:
    layer, block = f"{side}.layers.{{i}}", f"{side}.block.{{i}}"
    out = {
        layer: block,
        **_bart_attention(f"{layer}.self_attn", f"{block}.attn"),
        f"{layer}.fc1": f"{block}.ff.w1",
        f"{layer}.fc2": f"{block}.ff.w2",
        f"{layer}.final_layer_norm": f"{block}.ff.layer_norm",
    }
    if side == "decoder":
        out.update(_bart_attention(f"{layer}.encoder_attn", f"{block}.crossattn"))
    return out


BART: StructureMap = {"shared": "embeddings", **_bart_layer("encoder"), **_bart_layer("decoder"),
                      "lm_head": "lm_head.proj"}

#: Whisper (``WhisperForConditionalGeneration`` and its base model) has BART's layers: an
#: encoder over audio features (its convolutional front end has no common name), a decoder
#: with self- and cross-attention, and ``proj_out`` as the LM head.
WHISPER: StructureMap = {"decoder.embed_tokens": "embeddings", **_bart_layer("encoder"), **_bart_layer("decoder"),
                         "proj_out": "lm_head.proj"}

LLAMA: StructureMap = {
    "embed_tokens": "embeddings",
    "layers.{i}": "decoder.block.{i}",
    "layers.{i}.input_layernorm": "decoder.block.{i}.attn.layer_norm",
    "layers.{i}.self_attn": "decoder.block.{i}.attn",
    "layers.{i}.self_attn.q_proj": "decoder.block.{i}.attn.q",
    "layers.{i}.self_attn.k_proj": "decoder.block.{i}.attn.k",
    "layers.{i}.self_attn.v_proj": "decoder.block.{i}.attn.v",
    "layers.{i}.self_attn.o_proj": "decoder.block.{i}.attn.proj",
    "layers.{i}.post_attention_layernorm": "decoder.block.{i}.ff.layer_norm",
    "layers.{i}.mlp": "decoder.block.{i}.ff",
    "layers.{i}.mlp.gate_proj": "decoder.block.{i}.ff.w1",
    "layers.{i}.mlp.up_proj": "decoder.block.{i}.ff.w3",
    "layers.{i}.mlp.down_proj": "decoder.block.{i}.ff.w2",
    "lm_head": "lm_head.proj",
}

#: model_type (as in ``config.model_type``) -> structure map.
COMMON_STRUCTURES: Dict[str, StructureMap] = {
    "bert": BERT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "deberta-v2": DEBERTA_V2,
    "distilbert": DISTILBERT,
    "gpt2": GPT2,
    "opt": OPT,
    "t5": T5,
    "mt5": T5,
    "bart": BART,
    "llama": LLAMA,
    "qwen2": LLAMA,
    "mistral": LLAMA,
    "whisper": WHISPER,
    **TEXT_STRUCTURES,
    **VISION_STRUCTURES,
    **MOE_STRUCTURES,
}
