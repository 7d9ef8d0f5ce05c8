"""Shared by the engine examples: a tiny model and a synthetic task, so that every example
runs on a CPU in seconds without downloads. Pass ``--model <path or hub id>`` to an example
to train a real pretrained model instead.

Task: sequence classification, label = how many of the "signal" tokens 3, 4, 5 a sequence
contains (0, 1 or 2+). A frozen random backbone cannot solve it; LoRA learns it quickly.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch

VOCAB, LENGTH, LABELS = 64, 12, 3


def parse_args(description: str, steps: int = 100) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="pretrained model path or id (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", default="delta_checkpoints/example")
    return parser.parse_args()


def build_classifier(model: Optional[str] = None, arch: str = "bert") -> torch.nn.Module:
    """A sequence classifier: ``model`` from pretrained weights, or a tiny random one."""
    import transformers as tf

    if model is not None:
        return tf.AutoModelForSequenceClassification.from_pretrained(model, num_labels=LABELS)
    torch.manual_seed(0)
    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0, num_labels=LABELS)
        return tf.LlamaForSequenceClassification(config)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, num_labels=LABELS,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(config)


def dataset(n: int = 512, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(6, VOCAB, (LENGTH,), generator=g)
        label = int(torch.randint(0, LABELS, (1,), generator=g))
        if label:
            positions = torch.randperm(LENGTH, generator=g)[:label]
            ids[positions] = torch.randint(3, 6, (label,), generator=g)
        out.append({"input_ids": ids, "labels": torch.tensor(label)})
    return out


def collate(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def accuracy(model: torch.nn.Module, rows: List[Dict[str, torch.Tensor]]) -> float:
    was_training = model.training
    model.eval()
    batch = collate(rows)
    logits = model(input_ids=batch["input_ids"]).logits
    model.train(was_training)
    return (logits.argmax(-1) == batch["labels"]).float().mean().item()
