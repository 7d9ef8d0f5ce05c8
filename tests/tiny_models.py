"""Tiny random transformers models, built from config objects (no downloads).

Every architecture the library supports by default has an entry in ``ARCH_NAMES`` (the
text models the shared generic tests run on) or ``NEW_ARCH_NAMES`` (vision, speech and
newer language models: tests/test_architectures.py runs every case-table row on them).
Models are small (hidden 32, 2 layers) so that the whole test matrix runs in seconds on a
CPU. Vision and speech models take ``pixel_values`` / ``input_features``: see
:func:`example_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

HIDDEN = 32
LAYERS = 2
HEADS = 4
VOCAB = 96


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[str], torch.nn.Module]
    is_encoder_decoder: bool = False
    is_decoder_only: bool = False


def _config(name: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if name == "bert":
        return tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=64, max_position_embeddings=64, **common)
    if name == "roberta":
        return tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=64, max_position_embeddings=80, pad_token_id=1,
                                vocab_size=VOCAB)
    if name == "deberta-v2":
        return tf.DebertaV2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=64, max_position_embeddings=64, **common)
    if name == "distilbert":
        return tf.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64,
                                   max_position_embeddings=64, **common)
    if name == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                             vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                            bos_token_id=1, eos_token_id=2, **common)
    if name == "t5":
        return tf.T5Config(d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                           num_heads=HEADS, decoder_start_token_id=0, eos_token_id=1, **common)
    if name == "bart":
        return tf.BartConfig(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                             encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                             **common)
    if name in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[name]
        return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                   bos_token_id=1, eos_token_id=2, **common)
    new = _new_config(name)
    if new is not None:
        return new
    raise KeyError(name)


#: image side and patch side of the tiny vision models (4 patches + CLS), audio frames.
IMAGE, PATCH, MELS, FRAMES = 16, 8, 8, 32


def _new_config(name: str):
    import transformers as tf

    if name in ("gemma3_text", "qwen3"):
        cls = tf.Gemma3TextConfig if name == "gemma3_text" else tf.Qwen3Config
        return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                   head_dim=HIDDEN // HEADS, intermediate_size=64, max_position_embeddings=64, vocab_size=VOCAB,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "phi3":
        return tf.Phi3Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                             original_max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2)
    if name == "modernbert":
        return tf.ModernBertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   intermediate_size=64, max_position_embeddings=64, vocab_size=VOCAB,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    if name == "vit":
        return tf.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=64, image_size=IMAGE, patch_size=PATCH, num_channels=3)
    if name == "clip":
        tower = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64)
        return tf.CLIPConfig(text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2),
                             vision_config=dict(tower, image_size=IMAGE, patch_size=PATCH), projection_dim=16)
    if name == "whisper":
        return tf.WhisperConfig(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, num_mel_bins=MELS, max_source_positions=FRAMES // 2,
                                max_target_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None,
                                begin_suppress_tokens=None)
    return None


_TASK_CLASSES = {
    # name: (sequence classification, language modelling)
    "bert": ("BertForSequenceClassification", "BertForMaskedLM"),
    "roberta": ("RobertaForSequenceClassification", "RobertaForMaskedLM"),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2ForMaskedLM"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertForMaskedLM"),
    "gpt2": ("GPT2ForSequenceClassification", "GPT2LMHeadModel"),
    "opt": ("OPTForSequenceClassification", "OPTForCausalLM"),
    "t5": ("T5ForSequenceClassification", "T5ForConditionalGeneration"),
    "bart": ("BartForSequenceClassification", "BartForConditionalGeneration"),
    "llama": ("LlamaForSequenceClassification", "LlamaForCausalLM"),
    "qwen2": ("Qwen2ForSequenceClassification", "Qwen2ForCausalLM"),
    "mistral": ("MistralForSequenceClassification", "MistralForCausalLM"),
}
#: vision, speech and newer language models (task "cls": a classifier, where one exists).
_NEW_TASK_CLASSES = {
    "vit": ("ViTForImageClassification", "ViTForImageClassification"),
    "clip": ("CLIPModel", "CLIPModel"),
    "whisper": ("WhisperForAudioClassification", "WhisperForConditionalGeneration"),
    "gemma3_text": ("Gemma3TextForSequenceClassification", "Gemma3ForCausalLM"),
    "phi3": ("Phi3ForSequenceClassification", "Phi3ForCausalLM"),
    "qwen3": ("Qwen3ForSequenceClassification", "Qwen3ForCausalLM"),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertForMaskedLM"),
}

ENCODER_DECODER = {"t5", "bart", "whisper"}
DECODER_ONLY = {"gpt2", "opt", "llama", "qwen2", "mistral", "gemma3_text", "phi3", "qwen3"}
#: the text architectures the shared generic tests run on
ARCH_NAMES = list(_TASK_CLASSES)
#: architectures added by issue 16 (tests/test_architectures.py); vision models take
#: pixel_values, Whisper input_features, CLIP both tokens and pixels.
NEW_ARCH_NAMES = list(_NEW_TASK_CLASSES)
ALL_ARCH_NAMES = ARCH_NAMES + NEW_ARCH_NAMES
#: models without token inputs (no input embedding for a soft prompt)
VISION = {"vit"}
SPEECH = {"whisper"}


def build(name: str, task: str = "lm", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of architecture ``name``; ``task`` is ``"lm"``, ``"cls"`` or ``"base"``."""
    import transformers as tf

    config = _config(name)
    for k, v in overrides.items():
        setattr(config, k, v)
    config.num_labels = 3
    torch.manual_seed(seed)
    if task == "base":
        model = tf.AutoModel.from_config(config)
    else:
        cls_name = {**_TASK_CLASSES, **_NEW_TASK_CLASSES}[name][0 if task == "cls" else 1]
        model = getattr(tf, cls_name)(config)
    return model.eval()


def example_inputs(name: str, task: str = "lm", batch: int = 2, length: int = 7, seed: int = 1
                   ) -> Dict[str, torch.Tensor]:
    """Deterministic inputs for ``build(name, task)``.

    Encoder-decoder language models get ``decoder_input_ids``; their sequence classifiers
    get an end-of-sequence token at the end of every row instead (they pool on it). ViT gets
    ``pixel_values`` ``[batch, 3, 16, 16]``; Whisper ``input_features`` ``[batch, 8, 32]``
    (and ``decoder_input_ids`` unless ``task="cls"``); CLIP tokens and ``pixel_values``.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}
    if name == "whisper":
        inputs = {"input_features": torch.randn(batch, MELS, FRAMES, generator=g)}
        if task != "cls":
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
        return inputs
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "clip":
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    if name in ENCODER_DECODER:
        if task == "cls":
            ids[:, -1] = EOS[name]
        else:
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


EOS = {"t5": 1, "bart": 2}
