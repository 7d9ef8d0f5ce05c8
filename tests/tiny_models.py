"""Tiny random transformers models, built from config objects (no downloads).

Every architecture the library supports by default has an entry in ``ARCHS``. Models are
small (hidden 32, 2 layers) so that the whole test matrix runs in seconds on a CPU.
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
    raise KeyError(name)


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

ENCODER_DECODER = {"t5", "bart"}
DECODER_ONLY = {"gpt2", "opt", "llama", "qwen2", "mistral"}
ARCH_NAMES = list(_TASK_CLASSES)


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
        cls_name = _TASK_CLASSES[name][0 if task == "cls" else 1]
        model = getattr(tf, cls_name)(config)
    return model.eval()


def example_inputs(name: str, task: str = "lm", batch: int = 2, length: int = 7, seed: int = 1
                   ) -> Dict[str, torch.Tensor]:
    """Deterministic inputs for ``build(name, task)``.

    Encoder-decoder language models get ``decoder_input_ids``; their sequence classifiers
    get an end-of-sequence token at the end of every row instead (they pool on it).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name in ENCODER_DECODER:
        if task == "cls":
            ids[:, -1] = EOS[name]
        else:
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


EOS = {"t5": 1, "bart": 2}
