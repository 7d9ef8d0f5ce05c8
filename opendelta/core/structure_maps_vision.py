"""Common-structure maps of vision models: data, not code.

ViT and CLIP, in the vocabulary of :mod:`opendelta.core.structure_maps`, merged into
``COMMON_STRUCTURES`` there.

* **ViT** changed its module layout within the supported transformers range: up to 5.x it
  is BERT-like (``encoder.layer.{i}.attention.attention.query``), later releases have
  ``layers.{i}.attention.q_proj`` and ``mlp.fc1``. The map lists both layouts; on one
  release only one of them names modules (:data:`LAYOUT_ALTERNATIVES` says which entries
  belong together, for the guards that check every entry against a model).
* **CLIP** holds two towers. Their common names carry the tower: ``text.encoder.block.{i}``
  and ``vision.encoder.block.{i}``, so a key such as ``attn.q`` reaches both towers and
  ``text.encoder`` (or the module name ``text_model``) only one. The same map serves
  ``CLIPTextModel`` and ``CLIPVisionModel``, which hold one tower each.
"""
from __future__ import annotations

from typing import Dict, List


def _vit_bert_layout() -> Dict[str, str]:
    """ViT as transformers 5.0 writes it (BERT-like, ``attention.attention.query``)."""
    layer, block = "encoder.layer.{i}", "encoder.block.{i}"
    return {
        layer: block,
        f"{layer}.layernorm_before": f"{block}.attn.layer_norm",
        f"{layer}.attention": f"{block}.attn",
        f"{layer}.attention.attention.query": f"{block}.attn.q",
        f"{layer}.attention.attention.key": f"{block}.attn.k",
        f"{layer}.attention.attention.value": f"{block}.attn.v",
        f"{layer}.attention.output.dense": f"{block}.attn.proj",
        f"{layer}.layernorm_after": f"{block}.ff.layer_norm",
        f"{layer}.intermediate": f"{block}.ff",
        f"{layer}.intermediate.dense": f"{block}.ff.w1",
        f"{layer}.output": f"{block}.ff",
        f"{layer}.output.dense": f"{block}.ff.w2",
    }


def _vit_proj_layout() -> Dict[str, str]:
    """ViT as later transformers 5 releases write it (``layers.{i}``, ``q_proj``, ``mlp``)."""
    layer, block = "layers.{i}", "encoder.block.{i}"
    return {
        layer: block,
        f"{layer}.layernorm_before": f"{block}.attn.layer_norm",
        f"{layer}.attention": f"{block}.attn",
        f"{layer}.attention.q_proj": f"{block}.attn.q",
        f"{layer}.attention.k_proj": f"{block}.attn.k",
        f"{layer}.attention.v_proj": f"{block}.attn.v",
        f"{layer}.attention.o_proj": f"{block}.attn.proj",
        f"{layer}.layernorm_after": f"{block}.ff.layer_norm",
        f"{layer}.mlp": f"{block}.ff",
        f"{layer}.mlp.fc1": f"{block}.ff.w1",
        f"{layer}.mlp.fc2": f"{block}.ff.w2",
    }


VIT: Dict[str, str] = {"embeddings.patch_embeddings": "embeddings", **_vit_bert_layout(), **_vit_proj_layout()}


def _clip_tower(tower: str, common: str) -> Dict[str, str]:
    layer, block = f"{tower}.encoder.layers.{{i}}", f"{common}.encoder.block.{{i}}"
    return {
        f"{tower}.encoder.layers.{{i}}": block,
        f"{layer}.layer_norm1": f"{block}.attn.layer_norm",
        f"{layer}.self_attn": f"{block}.attn",
        f"{layer}.self_attn.q_proj": f"{block}.attn.q",
        f"{layer}.self_attn.k_proj": f"{block}.attn.k",
        f"{layer}.self_attn.v_proj": f"{block}.attn.v",
        f"{layer}.self_attn.out_proj": f"{block}.attn.proj",
        f"{layer}.layer_norm2": f"{block}.ff.layer_norm",
        f"{layer}.mlp": f"{block}.ff",
        f"{layer}.mlp.fc1": f"{block}.ff.w1",
        f"{layer}.mlp.fc2": f"{block}.ff.w2",
    }


CLIP: Dict[str, str] = {
    "text_model.embeddings.token_embedding": "text.embeddings",
    **_clip_tower("text_model", "text"),
    "vision_model.embeddings.patch_embedding": "vision.embeddings",
    **_clip_tower("vision_model", "vision"),
}

#: model_type -> structure map, merged into ``COMMON_STRUCTURES``.
VISION_STRUCTURES: Dict[str, Dict[str, str]] = {
    "vit": VIT,
    "clip": CLIP,
    "clip_text_model": CLIP,
    "clip_vision_model": CLIP,
}

#: model_type -> groups of map entries of which a given transformers release has exactly
#: one (the other layouts name no module there). Entries outside every group always apply.
LAYOUT_ALTERNATIVES: Dict[str, List[List[str]]] = {
    "vit": [list(_vit_bert_layout()), list(_vit_proj_layout())],
}
