"""log(), inspect_module_statistics and inspect_optimizer_statistics against hand counts."""
from __future__ import annotations

import warnings

import pytest
import torch

from opendelta import LoraModel, inspect_module_statistics, inspect_optimizer_statistics
from tiny_models import build

# Tiny BERT classifier (hidden 32, intermediate 64, 2 layers, vocabulary 96, 64 positions,
# 3 labels), counted by hand:
EMBEDDINGS = 96 * 32 + 64 * 32 + 2 * 32 + 2 * 32                       # words, positions, types, LN
LAYER = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32  # q,k,v,o, LN, ff, LN
POOLER = 32 * 32 + 32
CLASSIFIER = 32 * 3 + 3
BACKBONE = EMBEDDINGS + 2 * LAYER + POOLER + CLASSIFIER
LORA = 2 * 2 * (8 * 32 + 32 * 8)     # 2 layers x (query, value) x (A [8, 32] + B [32, 8])


@pytest.fixture
def tuned():
    model = build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def test_module_statistics_equal_hand_counts(tuned):
    model, _ = tuned
    assert BACKBONE == 23491
    stats = inspect_module_statistics(model)
    assert stats["total_parameters"] == BACKBONE + LORA
    assert stats["backbone_parameters"] == BACKBONE
    assert stats["delta_parameters"] == LORA == 2048
    assert stats["trainable_parameters"] == LORA + CLASSIFIER
    # OpenDelta's denominators: all parameters, deltas included
    assert stats["trainable_ratio"] == pytest.approx((LORA + CLASSIFIER) / (BACKBONE + LORA), rel=1e-12)
    assert stats["delta_ratio"] == pytest.approx(LORA / (BACKBONE + LORA), rel=1e-12)
    assert stats["trainable_ratio_of_backbone"] == pytest.approx((LORA + CLASSIFIER) / BACKBONE, rel=1e-12)
    assert stats["delta_ratio_of_backbone"] == pytest.approx(LORA / BACKBONE, rel=1e-12)


def test_log_prints_tree_counts_and_ratios(tuned, capsys):
    model, delta = tuned
    delta.log()
    out = capsys.readouterr().out
    assert "lora (LoraLayer) lora_A:[8, 32] lora_B:[32, 8]" in out          # the tree
    # the manual's lines: count/total=percent with six decimals, over all 25,539 parameters
    assert "Trainable Ratio: 2147/25539=8.406750%" in out.splitlines()
    assert "Delta Parameter Ratio: 2048/25539=8.019108%" in out.splitlines()
    assert f"Total parameters: {BACKBONE + LORA:,} (backbone {BACKBONE:,} + delta {LORA:,})" in out
    delta.log(visualization=False, delta_ratio=False, trainable_ratio=False)
    out = capsys.readouterr().out
    assert "LoraLayer" not in out and "Delta Parameter Ratio" not in out and "Trainable Ratio" not in out
    assert f"Total parameters: {BACKBONE + LORA:,}" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_reports_cuda_memory(tuned, capsys):
    from opendelta.tools.inspect import log_model

    model, _ = tuned
    model.cuda()
    stats = log_model(model, visualization=False)
    out = capsys.readouterr().out
    assert f"model parameters there: {BACKBONE + LORA:,}" in out
    expected = (BACKBONE + LORA) * 4 / 2 ** 30
    assert stats["cuda_memory"]["cuda:0"]["allocated"] >= expected
    assert "Memory on cuda:0:" in out


def test_optimizer_with_exactly_the_trainable_parameters_is_quiet(tuned, capsys):
    model, _ = tuned
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = inspect_optimizer_statistics(optimizer, model)
    assert stats["tensors"] == 2 * 2 * 2 + 2
    assert stats["parameters"] == stats["updated_parameters"] == LORA + CLASSIFIER
    assert [(g["tensors"], g["parameters"], g["weight_decay"]) for g in stats["param_groups"]] == [
        (9, LORA + 32 * 3, 0.01), (1, 3, 0.0)]
    assert stats["frozen_in_optimizer"] == [] and stats["missing_trainable"] == []
    assert f"updates {LORA + CLASSIFIER:,} parameters" in capsys.readouterr().out


def test_optimizer_holding_frozen_parameters_warns(tuned):
    model, _ = tuned
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="frozen parameter tensor"):
        stats = inspect_optimizer_statistics(optimizer, model, verbose=False)
    frozen_tensors = sum(1 for p in model.parameters() if not p.requires_grad)
    # embeddings 5 tensors, 16 per layer, pooler 2 (the classifier is trainable)
    assert len(stats["frozen_in_optimizer"]) == frozen_tensors == 5 + 2 * 16 + 2
    assert "bert.embeddings.word_embeddings.weight" in stats["frozen_in_optimizer"]
    assert stats["parameters"] == BACKBONE + LORA
    assert stats["updated_parameters"] == LORA + CLASSIFIER
    # Without the model, frozen parameters are named by their place in the optimizer.
    with pytest.warns(UserWarning, match="frozen"):
        stats = inspect_optimizer_statistics(optimizer, verbose=False)
    assert stats["frozen_in_optimizer"][0] == "param_groups[0]['params'][0] [96, 32]"


def test_optimizer_missing_trainable_parameters_warns(tuned):
    model, delta = tuned
    optimizer = torch.optim.SGD([p for _, p in delta.named_parameters()], lr=0.1)
    with pytest.warns(UserWarning, match="not in the optimizer") as record:
        stats = inspect_optimizer_statistics(optimizer, model, verbose=False)
    assert stats["missing_trainable"] == ["classifier.weight", "classifier.bias"]
    assert stats["updated_parameters"] == LORA and stats["not_in_model"] == 0
    assert "classifier.weight" in str(record[0].message)
    # An optimizer built before the delta existed misses all delta parameters.
    fresh = build("bert", "cls")
    early = torch.optim.SGD(fresh.parameters(), lr=0.1)
    LoraModel(fresh, modified_modules=["query"]).freeze_module()
    with pytest.warns(UserWarning) as record:
        stats = inspect_optimizer_statistics(early, fresh, verbose=False)
    assert len(stats["missing_trainable"]) == 4 and all(".lora." in n for n in stats["missing_trainable"])
    assert {str(w.message).split(" ")[1] for w in record} == {"frozen", "trainable"}
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        inspect_optimizer_statistics([torch.zeros(1)])
