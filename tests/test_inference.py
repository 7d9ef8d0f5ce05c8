"""Structure inference for models without a map (opendelta/core/inference.py): a hand-written
toy transformer with unusual names, the issue-16 architectures with their maps hidden, the
clear errors, and ``opendelta visualize --common`` on an unmapped architecture."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tiny_models as tm
from opendelta import CommonStructureMap, LoraModel, Visualization
from opendelta.core.inference import StructureInferenceError, infer_structure
from opendelta.core.targets import resolve

D = 16


class Mixer(nn.Module):
    """Attention with names no map knows, and no "attention" in its class or attribute name."""

    def __init__(self):
        super().__init__()
        self.toQuery, self.toKey, self.toValue = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.fuse = nn.Linear(D, D)  # the output projection: no telling name, registered last

    def forward(self, x):
        q, k, v = self.toQuery(x), self.toKey(x), self.toValue(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)
        return self.fuse(weights @ v)


class Churn(nn.Module):
    def __init__(self):
        super().__init__()
        self.widen, self.narrow = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)  # known by their shapes only

    def forward(self, x):
        return self.narrow(torch.relu(self.widen(x)))


class Unit(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre_mix_norm, self.mix = nn.LayerNorm(D), Mixer()
        self.post_mix_norm, self.churn = nn.LayerNorm(D), Churn()

    def forward(self, x):
        x = x + self.mix(self.pre_mix_norm(x))
        return x + self.churn(self.post_mix_norm(x))


class ToyNet(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.lexicon = nn.Embedding(50, D)
        self.trunk = nn.ModuleList(Unit() for _ in range(layers))
        self.readout = nn.Linear(D, 50)

    def forward(self, ids):
        x = self.lexicon(ids)
        for unit in self.trunk:
            x = unit(x)
        return self.readout(x)


def test_a_toy_transformer_with_unusual_names():
    model = ToyNet()
    mapping = infer_structure(model)
    expected = {
        "lexicon": "embeddings", "trunk": "encoder.block", "trunk.2": "encoder.block.2",
        "trunk.0.mix": "encoder.block.0.attn", "trunk.0.mix.toQuery": "encoder.block.0.attn.q",
        "trunk.0.mix.toKey": "encoder.block.0.attn.k", "trunk.0.mix.toValue": "encoder.block.0.attn.v",
        "trunk.0.mix.fuse": "encoder.block.0.attn.proj", "trunk.1.pre_mix_norm": "encoder.block.1.attn.layer_norm",
        "trunk.1.churn": "encoder.block.1.ff", "trunk.1.churn.widen": "encoder.block.1.ff.w1",
        "trunk.1.churn.narrow": "encoder.block.1.ff.w2", "trunk.1.post_mix_norm": "encoder.block.1.ff.layer_norm",
        "readout": "lm_head.proj",
    }
    assert {name: mapping.transform(name) for name in expected} == expected
    # LoRA's and the adapters' default keys find exactly the right modules through it.
    assert resolve(model, ["attn.q", "attn.v", "attn.qkv"], [], mapping, uses_defaults=True) == \
        [f"trunk.{i}.mix.{n}" for i in range(3) for n in ("toQuery", "toValue")]
    assert resolve(model, ["attn.proj", "ff.w2"], [], mapping, uses_defaults=True) == \
        [f"trunk.{i}.{n}" for i in range(3) for n in ("mix.fuse", "churn.narrow")]
    table = mapping.summary()
    assert table.splitlines()[0].startswith("common structure inferred for ToyNet")
    assert "encoder.block.{i}.attn.q" in table and "trunk.{i}.mix.toQuery" in table and "Linear" in table
    assert len(table.splitlines()) == 2 + len(mapping.rules)


class FusedMixer(nn.Module):
    is_causal = True

    def __init__(self):
        super().__init__()
        self.packed_qkv, self.emit = nn.Linear(D, 3 * D), nn.Linear(D, D)


class GatedChurn(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.lift, self.sink = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)


class CausalUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer, self.ffn = FusedMixer(), GatedChurn()


def test_fused_projections_gated_feed_forward_and_a_causal_stack():
    model = nn.Module()
    model.stack = nn.Sequential(CausalUnit(), CausalUnit())
    mapping = infer_structure(model)
    got = {n: mapping.transform(n) for n, _ in model.named_modules() if n.startswith("stack.1")}
    assert got == {"stack.1": "decoder.block.1", "stack.1.mixer": "decoder.block.1.attn",
                   "stack.1.mixer.packed_qkv": "decoder.block.1.attn.qkv",
                   "stack.1.mixer.emit": "decoder.block.1.attn.proj", "stack.1.ffn": "decoder.block.1.ff",
                   "stack.1.ffn.gate": "decoder.block.1.ff.w1", "stack.1.ffn.lift": "decoder.block.1.ff.w3",
                   "stack.1.ffn.sink": "decoder.block.1.ff.w2"}


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.left, self.attention.right = nn.Linear(D, D), nn.Linear(D, D)


def test_what_cannot_be_found_is_named():
    with pytest.raises(StructureInferenceError, match="ToyHead: it has no stack of repeated blocks"):
        infer_structure(type("ToyHead", (nn.Module,), {})())
    mlp = nn.Module()
    mlp.layers = nn.ModuleList(Churn() for _ in range(2))
    with pytest.raises(StructureInferenceError, match=r"block 'layers.0' \(Churn\) has no attention module.*"
                                                      r"\['widen', 'narrow'\]"):
        infer_structure(mlp)
    odd = nn.Module()
    odd.blocks = nn.ModuleList(TwoLinears() for _ in range(2))
    with pytest.raises(StructureInferenceError, match=r"cannot tell the query, key and value projections of the "
                                                      r"attention 'blocks.0.attention' apart.*\['left', 'right'\]"):
        infer_structure(odd)


LEAVES = {"q", "k", "v", "qkv", "proj", "w1", "w2", "w3"}


def _tail(common):
    """``...block.3.attn.q`` -> ``block.3.attn.q`` (towers and stacks are named differently)."""
    parts = common.split(".")
    return ".".join(parts[parts.index("block"):]) if "block" in parts else common


@pytest.mark.parametrize("arch", tm.NEW_ARCH_NAMES + ["bert", "gpt2", "t5", "llama"])
def test_architectures_with_their_maps_hidden(arch):
    """The inferred map names every projection the real map names, the same way."""
    model = tm.build(arch, "lm")
    real, inferred = CommonStructureMap(model), infer_structure(model)
    expected, got = {}, {}
    for name, _ in model.named_modules():
        common = real.transform(name)
        if common and common.rsplit(".", 1)[-1] in LEAVES and "lm_head" not in common:
            expected[name] = _tail(common)
            got[name] = _tail(inferred.transform(name) or "-")
    assert expected and got == expected
    # LoRA's default targets are the same through either map.
    keys = LoraModel.default_modified_modules
    assert resolve(model, keys, [], inferred, uses_defaults=True) == resolve(model, keys, [], real, uses_defaults=True)


class InferringLora(LoraModel):
    """LoRA whose structure map falls back on inference: what DeltaBase._structure_map does
    once the fallback is wired in (see the issue-16 report)."""

    def _structure_map(self):
        return CommonStructureMap.load(self.backbone_model) or infer_structure(self.backbone_model)


def test_default_targets_through_the_inferred_map_train_save_and_load(tmp_path):
    from opendelta import IA3Model

    torch.manual_seed(0)
    model, ids = ToyNet(), torch.randint(0, 50, (2, 5))
    delta = InferringLora(model)  # no modified_modules: the defaults, through the inferred map
    assert [h for h, _, _ in delta.layer_entries()] == [f"trunk.{i}.mix.{n}" for i in range(3)
                                                        for n in ("toQuery", "toValue")]
    delta.freeze_module()
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1)
    expected = model(ids)
    path = delta.save_finetuned(tmp_path / "ckpt")
    torch.manual_seed(0)
    fresh = ToyNet()
    InferringLora.from_finetuned(path, fresh)
    assert torch.equal(fresh(ids), expected)

    class InferringIA3(IA3Model):
        _structure_map = InferringLora._structure_map

    ia3 = InferringIA3(ToyNet())  # keys, values and the feed-forward down projection's input
    assert ia3.feedforward_names() == [f"trunk.{i}.churn.narrow" for i in range(3)]
    assert len(ia3.layer_entries()) == 9


def test_visualization_draws_the_inferred_map():
    model = ToyNet(layers=2)
    LoraModel(model, modified_modules=["toQuery"])
    vis = Visualization(model)
    vis.structure_graph(mapping=infer_structure(model), printTree=False)
    text = vis.export_text()
    assert "encoder (virtual)" in text and "0-1 (Unit)" in text and "q (Linear)" in text and "lora_A" in text


def test_cli_visualize_common_shows_the_inferred_map(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=4 * D, max_position_embeddings=32)
    assert config.model_type not in __import__("opendelta.core.structure_maps", fromlist=["x"]).COMMON_STRUCTURES
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-m", "opendelta", "visualize", str(tmp_path / "neox"), "--common",
                             "--structure-only"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "common structure inferred for GPTNeoXModel" in out
    assert "decoder.block.{i}.attn.qkv" in out and "layers.{i}.attention.query_key_value" in out
    assert "ff.w2" in out and "0-1 (GPTNeoXLayer)" in out and "qkv (Linear)" in out
