"""Documented behaviours of the manual's tools and of BitFit: ``log()`` ratios as the manual
prints them, ``Visualization.build_common_tree``, BitFit's documented method and
overlapping targets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny_models as tm
from opendelta import BitFitModel, LoraModel, inspect_module_statistics
from opendelta.methods.bitfit import BiasLayer
from opendelta.tools.inspect import format_module_statistics


# ------------------------------------------------------------------------------ log()
def test_log_reproduces_the_manuals_printed_ratios(capsys):
    """The manual's example: LoRA (r=8) on the four attention Linears of the last two
    blocks of OPT-1.3B prints ``Trainable Ratio: 262144/1316020224=0.019919%``: the
    denominator is *all* parameters (1,315,758,080 of OPT-1.3B plus the 262,144 of the
    delta). Built on the meta device: no memory, exact counts."""
    import transformers as tf

    config = tf.OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                          vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)
    with torch.device("meta"):
        model = tf.OPTForCausalLM(config)
    model.tie_weights()  # transformers 5.0 leaves the lm_head untied on meta until asked
    delta = LoraModel(model, modified_modules=[r"[r]layers\.2[23]\.self_attn\.(q|k|v|out)_proj"], lora_r=8)
    delta.freeze_module()
    stats = inspect_module_statistics(model)
    assert stats["backbone_parameters"] == 1_315_758_080
    assert format_module_statistics(stats)[:2] == ["Trainable Ratio: 262144/1316020224=0.019919%",
                                                   "Delta Parameter Ratio: 262144/1316020224=0.019919%"]
    # over the backbone alone it would read 0.019923%: not what the manual prints
    assert f"{100 * stats['trainable_ratio_of_backbone']:.6f}" == "0.019923"
    delta.log(visualization=False, cuda_memory=False)
    lines = capsys.readouterr().out.splitlines()
    assert "Trainable Ratio: 262144/1316020224=0.019919%" in lines
    assert "Delta Parameter Ratio: 262144/1316020224=0.019919%" in lines


def test_log_ratios_differ_when_the_head_is_trainable(capsys):
    model = tm.build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "classifier"])
    delta.log(visualization=False)
    lines = capsys.readouterr().out.splitlines()
    # 2,048 LoRA + 99 classifier parameters trainable, of 23,491 + 2,048
    assert "Trainable Ratio: 2147/25539=8.406750%" in lines
    assert "Delta Parameter Ratio: 2048/25539=8.019108%" in lines


# ---------------------------------------------------------------- build_common_tree
def _texts(tree) -> list:
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        out.append(node.label.plain if hasattr(node.label, "plain") else str(node.label))
        stack.extend(reversed(node.children))
    return out


def test_build_common_tree_of_the_model_and_of_a_submodule():
    from bigmodelvis import Visualization as FromBigmodelvis
    from opendelta.utils.visualization import Visualization

    assert Visualization is FromBigmodelvis
    model = tm.build("bert", "lm")
    vis = Visualization(model)
    tree = vis.build_common_tree(model, None)
    texts = _texts(tree)
    assert texts[0].startswith("BertForMaskedLM")
    for line in ("encoder (BertEncoder)", "block (ModuleList)", "0-1 (BertLayer)", "attn (BertAttention)",
                 "q,k,v,proj (Linear) weight:[32, 32] bias:[32]", "ff (BertIntermediate+BertOutput)"):
        assert line in texts
    # a submodule drawn under the names it has in the whole model
    layer = model.bert.encoder.layer[1]
    sub = vis.build_common_tree(layer, None, key_to_root="bert.encoder.layer", query="1")
    assert [c.label.plain.split(" ")[0] for c in sub.children] == ["attn", "ff"]
    assert vis.structure.names == ["BertLayer"]
    # into an existing tree, with a flat mapping of our own
    root = vis.structure_graph(printTree=False)
    before = len(root.children)
    same = vis.build_common_tree(layer, {"attention.self.{i}": "x.{i}", "attention.self.query": "attn.q"},
                                 tree=root)
    assert same is root and len(root.children) > before
    assert "attn (virtual)" in _texts(root) and "q (Linear) weight:[32, 32] bias:[32]" in _texts(root)
    with pytest.raises(KeyError, match="no common structure map"):
        Visualization(nn.Linear(2, 2)).build_common_tree(nn.Linear(2, 2), None)


def test_visualization_modules_stay_small():
    import inspect

    import opendelta.tools.common_tree as common_tree
    import opendelta.tools.structure_tree as structure_tree
    import opendelta.tools.visualization as visualization

    for module in (visualization, common_tree, structure_tree):
        assert len(inspect.getsource(module).splitlines()) < 400, module.__name__


# ------------------------------------------------------------------------------ BitFit
def _bitfit_hosts(model):
    return [name for name, module in model.named_modules() if isinstance(module, BiasLayer)]


def test_bitfit_overlapping_targets_get_one_bias_each():
    model = tm.build("bert", "cls")
    inputs = tm.example_inputs("bert", "cls")
    reference = model(**inputs).logits
    delta = BitFitModel(model, modified_modules=["attention", "intermediate", "output"])
    hosts = _bitfit_hosts(model)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                 "output.dense", "output.LayerNorm"]
    assert hosts == [f"bert.encoder.layer.{i}.{p}.bitfit" for i in range(2) for p in per_layer]
    assert torch.equal(model(**inputs).logits, reference)  # zero-initialised biases
    # training the bias delta is training the layer's own bias: the same gradient
    delta.freeze_module(exclude=["deltas", "bias"])
    model(**inputs).logits.sum().backward()
    dense = model.bert.encoder.layer[0].attention.output.dense
    torch.testing.assert_close(dense.bitfit.bias.grad, dense.bias.grad, rtol=0, atol=0)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1)
    assert not torch.equal(model(**inputs).logits, reference)
    delta.detach()
    assert torch.equal(model(**inputs).logits, reference) and not _bitfit_hosts(model)


def test_bitfit_documented_method():
    model = tm.build("t5", "lm")  # bias-free Linears and T5LayerNorm
    delta = BitFitModel(model, modified_modules=["encoder.block.0.layer.1.DenseReluDense.wo"])
    add = delta.add_bias_to_modules_have_bias_or_known_type
    wi = model.encoder.block[0].layer[1].DenseReluDense.wi
    assert add(wi) is True and wi.bitfit.bias.shape == (64,)            # Linear without bias: known type
    assert add(wi) is False                                             # already has this delta's bias
    norm = model.encoder.block[0].layer[0].layer_norm
    assert add(norm) is True and norm.bitfit.bias.shape == (32,)        # T5LayerNorm: a norm
    dropout = model.encoder.block[0].layer[0].dropout
    assert add(dropout) is False and "bitfit" not in dropout._modules   # unknown type, no bias

    class Scale(nn.Module):  # unknown type with a bias parameter: sized by it
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(32))

        def forward(self, x):
            return x + self.bias

    model.encoder.block[1].extra = Scale()
    assert add(model.encoder.block[1].extra) is True
    assert model.encoder.block[1].extra.bitfit.bias.shape == (32,)
    with pytest.raises(ValueError, match="not a module of this delta's backbone"):
        add(nn.Linear(2, 2))
    delta.detach()
    assert not _bitfit_hosts(model)


def test_bitfit_on_a_leaf_of_another_type_adds_a_bias_on_its_output():
    model = tm.build("bert", "cls")
    BitFitModel(model, modified_modules=["word_embeddings"])
    assert _bitfit_hosts(model) == ["bert.embeddings.word_embeddings.bitfit"]
    assert model.bert.embeddings.word_embeddings.bitfit.bias.shape == (32,)


def test_original_gpt2_bitfit_config_loads():
    """OpenDelta 0.3.2's GPT-2 BitFit config: its lm_head key only matches an excluded module."""
    model = tm.build("gpt2", "lm")
    BitFitModel(model, modified_modules=["attn@", "ff@", "layer_norm@", "lm_head@.proj@"],
                exclude_modules=["lm_head"])
    per_block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    assert _bitfit_hosts(model) == [f"transformer.h.{i}.{p}.bitfit" for i in range(2) for p in per_block]
