"""Common-structure maps of speech models: data, not code.

Whisper (``WhisperForConditionalGeneration`` and its base model), in the vocabulary of
:mod:`opendelta.core.structure_maps`, merged into ``COMMON_STRUCTURES`` there: an encoder
over audio features (its convolutional front end has no common name), a decoder with
self-attention (``attn``), cross-attention over the encoder (``crossattn``) and a
feed-forward block in every layer, and the output projection ``proj_out`` as the LM head.
"""
from __future__ import annotations

from typing import Dict


def _attention(original: str, common: str) -> Dict[str, str]:
    return {
        original: common,
        f"{original}.q_proj": f"{common}.q",
        f"{original}.k_proj": f"{common}.k",
        f"{original}.v_proj": f"{common}.v",
        f"{original}.out_proj": f"{common}.proj",
        f"{original}_layer_norm": f"{common}.layer_norm",
    }


def _layer(side: str) -> Dict[str, str]:
    layer, block = f"{side}.layers.{{i}}", f"{side}.block.{{i}}"
    out = {
        layer: block,
        **_attention(f"{layer}.self_attn", f"{block}.attn"),
        f"{layer}.fc1": f"{block}.ff.w1",
        f"{layer}.fc2": f"{block}.ff.w2",
        f"{layer}.final_layer_norm": f"{block}.ff.layer_norm",
    }
    if side == "decoder":
        out.update(_attention(f"{layer}.encoder_attn", f"{block}.crossattn"))
    return out


WHISPER: Dict[str, str] = {"decoder.embed_tokens": "embeddings", **_layer("encoder"), **_layer("decoder"),
                           "proj_out": "lm_head.proj"}

#: model_type -> structure map, merged into ``COMMON_STRUCTURES``.
SPEECH_STRUCTURES: Dict[str, Dict[str, str]] = {"whisper": WHISPER}
