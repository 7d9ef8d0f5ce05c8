"""(c) time to apply a delta: Llama-2-7B- and OPT-6.7B-sized models on the meta device, and a
BERT-large with real (random) weights, opendelta next to PEFT's ``get_peft_model``.

Each model is built once (not timed); opendelta's cases are applied and detached again for
every round, PEFT's applied and ``unload()``-ed. The median of the rounds is reported.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch

from common import Row, Settings

SECTION = "c. apply a delta"


def _llama(smoke: bool) -> torch.nn.Module:
    import transformers as tf

    if smoke:
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=100)
    else:  # Llama-2-7B
        config = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return tf.LlamaForCausalLM(config)


def _opt(smoke: bool) -> torch.nn.Module:
    import transformers as tf

    if smoke:
        config = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=100, word_embed_proj_dim=64)
    else:  # OPT-6.7B
        config = tf.OPTConfig(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                              vocab_size=50272, word_embed_proj_dim=4096)
    with torch.device("meta"):
        return tf.OPTForCausalLM(config)


def _bert_large(smoke: bool) -> torch.nn.Module:
    import transformers as tf

    if smoke:
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, vocab_size=100)
    else:
        config = tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096)
    return tf.BertModel(config)


def _median_time(apply: Callable[[], Callable[[], None]], rounds: int, clock: str) -> float:
    """``apply()`` is timed (see ``common.interleaved`` for the clocks); the undo function
    it returns is not."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    times = []
    for _ in range(rounds):
        start = now()
        undo = apply()
        times.append(now() - start)
        undo()
    return statistics.median(times)


def run(settings: Settings) -> List[Row]:
    from peft import LoraConfig, get_peft_model

    from opendelta import AdapterModel, LoraModel

    rounds = 1 if settings.smoke else 3 * settings.repeats
    rows: List[Row] = []
    for label, build, targets in (("Llama-2-7B config, meta device", _llama, ["q_proj", "v_proj"]),
                                  ("OPT-6.7B config, meta device", _opt, ["q_proj", "v_proj"]),
                                  ("BERT-large, real weights", _bert_large, ["query", "value"])):
        model = build(settings.smoke)
        n_params = sum(p.numel() for p in model.parameters())

        def ours(cls, model=model):
            def apply():
                delta = cls(model)
                return delta.detach
            return apply

        def peft(model=model, targets=targets):
            wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            return wrapped.unload

        t_lora = _median_time(ours(LoraModel), rounds, settings.clock)
        t_adapter = _median_time(ours(AdapterModel), rounds, settings.clock)
        try:
            t_peft, peft_note = _median_time(peft, rounds, settings.clock), ""
        except Exception as exc:  # reported in the table, never hidden
            t_peft, peft_note = None, f"failed: {type(exc).__name__}: {exc}"[:120]
        note = f"{label}, {n_params / 1e6:.0f}M params; defaults (LoRA r=8 on q,v)"
        rows.append(Row(SECTION, f"LoRA -> {label}", "opendelta", t_lora, "s",
                        t_lora / t_peft if t_peft else None, "peft" if t_peft else "", note))
        rows.append(Row(SECTION, f"LoRA -> {label}", "peft", t_peft, "s", note=peft_note or note))
        rows.append(Row(SECTION, f"Adapter -> {label}", "opendelta", t_adapter, "s",
                        note=f"{label}; defaults (bottleneck 24 after attn.proj and ff.w2)"))
        del model
    return rows
