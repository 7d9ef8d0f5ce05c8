"""Visualization: folded blocks, merged siblings, shapes, parameter states, views, export, speed."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from opendelta import LoraModel
from opendelta.tools.visualization import (DELTA, FROZEN, TRAINABLE, StructureNode, Visualization,
                                           build_structure, compact_names)
from tiny_models import build


def lines_of(vis: Visualization) -> list:
    """The drawn tree as plain text lines, without the guide characters."""
    return [line.lstrip("│├└─ ").rstrip() for line in vis.export_text(width=200).splitlines()]


def child(node: StructureNode, name: str) -> StructureNode:
    matches = [c for c in node.children if c.display_name == name]
    assert len(matches) == 1, f"{name!r} not among {[c.display_name for c in node.children]}"
    return matches[0]


def walk(node: StructureNode, *names: str) -> StructureNode:
    for name in names:
        node = child(node, name)
    return node


def test_repeated_blocks_fold_into_ranges_and_siblings_merge():
    model = build("bert", "cls", num_hidden_layers=4)
    vis = Visualization(model)
    tree = vis.structure_graph(printTree=False)
    lines = lines_of(vis)
    assert lines[0] == "root"
    assert "0-3 (BertLayer)" in lines
    assert "query,key,value (Linear) weight:[32, 32] bias:[32]" in lines
    assert "dense (Linear) weight:[64, 32] bias:[64]" in lines       # intermediate
    assert "dense (Linear) weight:[32, 64] bias:[32]" in lines       # output
    assert "word_embeddings (Embedding) weight:[96, 32]" in lines
    assert "classifier (Linear) weight:[3, 32] bias:[3]" in lines
    # One folded block is drawn once: 4 layers, but one query/key/value line.
    assert sum("query" in line for line in lines) == 1
    # The returned rich tree carries the structure.
    layer = walk(tree.node, "bert", "encoder", "layer")
    assert [c.names for c in layer.children] == [["0", "1", "2", "3"]]
    assert tree.children[0].module_name == "bert" and tree.children[0].info == "BertModel"
    # Parameters count per module of a node: the folded block stands for 4 identical layers.
    assert layer.children[0].num_parameters == 8544
    assert len(layer.children[0].names) * 8544 + 5248 + 1056 + 99 == sum(p.numel() for p in model.parameters())


def test_blocks_that_differ_split_the_fold_and_show_delta_parameters():
    model = build("bert", "cls", num_hidden_layers=4)
    LoraModel(model, modified_modules=["[r]encoder\\.layer\\.[12]\\.attention\\.self\\.(query|value)"])
    vis = Visualization(model)
    tree = vis.structure_graph(printTree=False)
    lines = lines_of(vis)
    assert "0,3 (BertLayer)" in lines and "1-2 (BertLayer)" in lines
    assert "lora (LoraLayer) lora_A:[8, 32] lora_B:[32, 8]" in lines
    assert "query,value (Linear) weight:[32, 32] bias:[32]" in lines
    modified = walk(tree.node, "bert", "encoder", "layer", "1-2", "attention", "self", "query,value")
    lora = child(modified, "lora")
    assert [(p.name, p.shape, p.state) for p in lora.params] == [
        ("lora_A", (8, 32), DELTA), ("lora_B", (32, 8), DELTA)]
    assert {p.state for p in modified.params} == {TRAINABLE}  # not frozen yet


def test_colours_tell_frozen_trainable_and_delta_apart():
    model = build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    vis = Visualization(model)
    tree = vis.structure_graph(printTree=False)

    def styles(node_tree):
        label = node_tree.label
        return {label.plain[s.start:s.end]: str(s.style) for s in label.spans}

    rich_nodes = {}
    stack = [tree]
    while stack:
        t = stack.pop()
        if t.module_name is not None:
            rich_nodes[t.module_name] = t
        stack.extend(t.children)
    assert styles(rich_nodes["lora"])["lora_A:[8, 32]"] == vis.delta_color == "magenta"
    assert styles(rich_nodes["classifier"])["weight:[3, 32]"] == vis.trainable_color
    assert styles(rich_nodes["key,value"])["weight:[32, 32]"] == vis.frozen_color
    assert styles(rich_nodes["0-1"])["0-1"] == vis.duplicate_color
    assert styles(rich_nodes["classifier"])[" (Linear)"] == vis.type_color
    states = {p.state for p in walk(tree.node, "bert", "embeddings", "word_embeddings").params}
    assert states == {FROZEN}
    # Colours are instance settings.
    vis.delta_color = "blue"
    tree = vis.structure_graph(printTree=False)
    lora = tree.children[0].children[1].children[0].children[0].children[0].children[0].children[0].children[0]
    assert lora.module_name == "lora" and styles(lora)["lora_A:[8, 32]"] == "blue"


def test_keep_non_params_and_expand_params():
    model = build("bert", "cls")
    vis = Visualization(model)
    vis.structure_graph(printTree=False)
    plain = lines_of(vis)
    assert not any("Dropout" in line or "GELUActivation" in line for line in plain)
    vis.structure_graph(keep_non_params=True, printTree=False)
    kept = lines_of(vis)
    assert "dropout (Dropout)" in kept and "intermediate_act_fn (GELUActivation)" in kept
    assert "activation (Tanh)" in kept
    tree = vis.structure_graph(expand_params=True, printTree=False)
    expanded = lines_of(vis)
    assert "word_embeddings (Embedding)" in expanded and "weight:[96, 32]" in expanded
    param_nodes = [t for t in tree.children[1].children if t.is_param_node]
    assert [t.label.plain for t in param_nodes] == ["weight:[3, 32]", "bias:[3]"]


def test_common_structure_view():
    model = build("bert", "cls", num_hidden_layers=3)
    vis = Visualization(model)
    tree = vis.structure_graph(common_structure=True, printTree=False)
    lines = lines_of(vis)
    # bert.encoder and bert.encoder.layer have common names (encoder, encoder.block)
    assert "encoder (BertEncoder)" in lines and "block (ModuleList)" in lines and "0-2 (BertLayer)" in lines
    assert "attn (BertAttention)" in lines
    assert "q,k,v,proj (Linear) weight:[32, 32] bias:[32]" in lines
    assert "ff (BertIntermediate+BertOutput)" in lines
    assert "w1 (Linear) weight:[64, 32] bias:[64]" in lines
    assert "w2 (Linear) weight:[32, 64] bias:[32]" in lines
    assert "embeddings (Embedding) weight:[96, 32]" in lines
    grey = child(tree.node, "bert.pooler")
    assert not grey.common and child(grey, "dense").type_name == "Linear"
    vis.structure_graph(only_common=True, printTree=False)
    only = lines_of(vis)
    assert not any("pooler" in line or "classifier" in line or "position_embeddings" in line for line in only)
    assert "q,k,v,proj (Linear) weight:[32, 32] bias:[32]" in only


def test_common_structure_needs_a_map():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(KeyError, match="no common structure map"):
        Visualization(seq).structure_graph(common_structure=True, printTree=False)
    vis = Visualization(seq)
    vis.structure_graph(mapping={"{i}": "block.{i}"}, printTree=False)
    assert lines_of(vis) == ["root", "block (virtual)", "0,2 (Linear) weight:[4, 4] bias:[4]",
                             "3 (Linear) weight:[2, 4] bias:[2]"]
    with pytest.raises(TypeError, match="nested mapping"):
        Visualization(seq).structure_graph(mapping={"0": {"__name__": "x"}}, printTree=False)


def test_plain_modules_and_root_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(3, 3), nn.GELU()) for _ in range(6))
            self.head = nn.Linear(3, 1, bias=False)

    net = Net()
    for p in net.head.parameters():
        p.requires_grad_(False)
    vis = Visualization(net)
    vis.structure_graph(rootname="net", printTree=False)
    assert lines_of(vis) == ["net scale:[3]", "blocks (ModuleList)", "0-5 (Sequential)",
                             "0 (Linear) weight:[3, 3] bias:[3]", "head (Linear) weight:[1, 3]"]
    assert build_structure(net).children[1].params[0].state == FROZEN
    assert compact_names(["0", "1", "2", "5", "q", "7", "8"]) == "0-2,5,q,7-8"
    assert Visualization(nn.ReLU()).structure_graph(printTree=False).node.names == ["root"]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Visualization("bert")


def test_prints_and_exports(tmp_path, capsys):
    model = build("gpt2", "lm")
    LoraModel(model)
    vis = Visualization(model)
    vis.structure_graph()
    out = capsys.readouterr().out
    assert "0-1 (GPT2Block)" in out and "lora (LoraLayer)" in out
    svg = vis.export_svg(str(tmp_path / "tree.svg"))
    html = vis.export_html(str(tmp_path / "tree.html"))
    assert svg.startswith("<svg") and "GPT2Block" in svg
    assert "<html" in html.lower() and "lora_A" in html
    assert (tmp_path / "tree.svg").read_text() == svg and (tmp_path / "tree.html").read_text() == html


def test_import_stays_light():
    code = ("import sys, opendelta; V = opendelta.Visualization; from bigmodelvis import Visualization; "
            "assert V is Visualization; "
            "assert 'transformers' not in sys.modules, 'transformers'; assert 'rich' not in sys.modules, 'rich'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seven_billion_parameter_model_on_meta_is_fast():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    LoraModel(model)
    start = time.perf_counter()
    vis = Visualization(model)
    vis.structure_graph(printTree=False)
    text = vis.export_text()
    elapsed = time.perf_counter() - start
    print(f"Visualization of a 7B Llama on meta: {elapsed * 1000:.1f} ms")
    assert "0-31 (LlamaDecoderLayer)" in text
    assert "q_proj,v_proj (Linear) weight:[4096, 4096]" in text
    assert elapsed < 3.0


def test_wrapper_sharing_its_parents_common_name_merges_into_it():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.q = nn.Linear(2, 2)
            self.ln = nn.LayerNorm(2)

    vis = Visualization(nn.Sequential(Block(), Block()))
    vis.structure_graph(mapping={"{i}": "block.{i}", "{i}.inner": "block.{i}", "{i}.inner.q": "block.{i}.attn.q"},
                        printTree=False)
    assert lines_of(vis) == ["root", "block (virtual)", "0-1 (Block)", "attn (virtual)",
                             "q (Linear) weight:[2, 2] bias:[2]", "ln (LayerNorm) weight:[2] bias:[2]"]
