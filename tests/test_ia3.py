"""IA3: hand-computed maths, default targets, merge rules, and PEFT round trips checked by
peft itself (generic checks: the "ia3" row of tests/matrix_cases.py)."""
import json
import os

import pytest
import torch
from torch import nn

import tiny_models as tm
from helpers import outputs, perturb
from opendelta import AutoDeltaModel, IA3Model, LoraModel
from opendelta.io.files import CheckpointError
from opendelta.io.peft_ia3 import load_peft_ia3, save_peft_ia3
from opendelta.methods.ia3 import IA3Layer


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.key = nn.Linear(4, 3)
        self.down = nn.Linear(3, 2)

    def forward(self, x):
        return self.down(self.key(x))


def _vectors(delta):
    return {host: layer.ia3_l for host, _, layer in delta.layer_entries()}


def test_output_and_input_scaling_by_hand():
    toy = Toy()
    x = torch.randn(5, 4)
    delta = IA3Model(toy, modified_modules=["key", "down"], feedforward_modules=["down"])
    key_l, down_l = _vectors(delta)["key"], _vectors(delta)["down"]
    assert key_l.shape == (3,) and down_l.shape == (3,)  # key: its outputs; down: its inputs
    with torch.no_grad():  # vectors of ones: nothing changes, exactly
        assert torch.equal(toy(x), toy.down(toy.key(x) * 1.0))
    with torch.no_grad():
        key_l.copy_(torch.tensor([2.0, -1.0, 0.5]))
        down_l.copy_(torch.tensor([3.0, 0.25, -2.0]))
    W1, b1, W2, b2 = toy.key.weight, toy.key.bias, toy.down.weight, toy.down.bias
    # y = W2 ((W1 x + b1) * l_key * l_down) + b2, written out element by element
    h = x @ W1.T + b1
    h = h * torch.tensor([2.0, -1.0, 0.5])
    h = h * torch.tensor([3.0, 0.25, -2.0])
    expected = h @ W2.T + b2
    assert torch.allclose(toy(x), expected, atol=1e-6, rtol=0)


def test_merge_multiplies_rows_and_columns_and_unmerge_divides():
    toy = Toy()
    x = torch.randn(5, 4)
    delta = IA3Model(toy, modified_modules=["key", "down"], feedforward_modules=["down"])
    with torch.no_grad():
        _vectors(delta)["key"].copy_(torch.tensor([2.0, -1.0, 0.5]))
        _vectors(delta)["down"].copy_(torch.tensor([3.0, 0.25, -2.0]))
    W1, b1, W2, b2 = (t.detach().clone() for t in (toy.key.weight, toy.key.bias, toy.down.weight, toy.down.bias))
    expected = toy(x)
    delta.merge()
    # Output scaling: rows of W1 and the bias; input scaling: columns of W2, bias untouched
    # (W + (W * l - W): within one rounding of W * l).
    close = dict(rtol=1e-6, atol=0)
    assert torch.allclose(toy.key.weight, W1 * torch.tensor([[2.0], [-1.0], [0.5]]), **close)
    assert torch.allclose(toy.key.bias, b1 * torch.tensor([2.0, -1.0, 0.5]), **close)
    assert torch.allclose(toy.down.weight, W2 * torch.tensor([[3.0, 0.25, -2.0]]), **close)
    assert torch.equal(toy.down.bias, b2)
    assert torch.allclose(toy(x), expected, atol=1e-6, rtol=0)
    delta.unmerge()  # divided back, within rounding
    assert torch.allclose(toy.key.weight, W1, **close) and torch.allclose(toy.key.bias, b1, **close)
    assert torch.allclose(toy.down.weight, W2, **close)
    before = [t.detach().clone() for t in (toy.key.weight, toy.key.bias, toy.down.weight)]
    delta.merge(keep_copy=True)
    delta.unmerge()  # bit for bit from the copies
    assert all(torch.equal(a, b) for a, b in zip(before, (toy.key.weight, toy.key.bias, toy.down.weight)))


def test_merge_into_gpt2_conv1d_uses_its_in_out_layout():
    model = tm.build("gpt2", "lm")
    inputs = tm.example_inputs("gpt2")
    delta = IA3Model(model)
    perturb(delta, std=0.3)
    c_attn, c_proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    w_attn, w_proj = c_attn.weight.detach().clone(), c_proj.weight.detach().clone()
    l_attn = c_attn.ia3.ia3_l.detach().clone()
    l_proj = c_proj.ia3.ia3_l.detach().clone()
    assert not c_attn.ia3.is_feedforward and c_proj.ia3.is_feedforward
    expected = outputs(model, inputs)
    delta.merge()
    assert torch.allclose(c_attn.weight, w_attn * l_attn[None, :], atol=1e-6, rtol=0)  # [in, out]: columns
    assert torch.allclose(c_proj.weight, w_proj * l_proj[:, None], atol=1e-6, rtol=0)  # input rows
    assert (outputs(model, inputs) - expected).abs().max() <= 1e-5


def test_default_targets_keys_values_and_feedforward_input():
    model = tm.build("t5", "lm")
    delta = IA3Model(model)
    hosts = {h.split(".", 2)[-1] if h.startswith(("encoder", "decoder")) else h for h, _, _ in delta.layer_entries()}
    assert "0.layer.0.SelfAttention.k" in hosts and "0.layer.1.EncDecAttention.v" in hosts
    assert not any(h.endswith((".q", ".o")) for h in hosts)
    assert sorted(delta.feedforward_names()) == sorted(
        [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)]
        + [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(2)])


def test_feedforward_modules_take_module_or_common_names_and_must_match_a_target():
    model = tm.build("llama", "lm")
    by_name = IA3Model(model, modified_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert len(by_name.feedforward_names()) == 2
    by_name.detach()
    by_common = IA3Model(model, modified_modules=["k_proj", "down_proj"], feedforward_modules=["ff.w2"])
    assert by_common.feedforward_names() == by_name.feedforward_names()
    by_common.detach()
    none = IA3Model(model, modified_modules=["k_proj", "down_proj"], feedforward_modules=[])
    assert none.feedforward_names() == []
    none.detach()
    with pytest.raises(ValueError, match="feedforward_modules entry 'up_proj' matches none"):
        IA3Model(model, modified_modules=["k_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(ValueError, match="IA3 applies to Linear and Conv1D"):
        IA3Model(model, modified_modules=["self_attn"])
    with pytest.raises(TypeError, match="feedforward_modules must be a list of strings"):
        IA3Model(model, feedforward_modules="down_proj")
    assert not any(isinstance(m, IA3Layer) for m in model.modules())


def test_zero_entries_cannot_be_divided_out():
    model = tm.build("bert", "lm")
    delta = IA3Model(model)
    with torch.no_grad():
        delta.delta_layers()[0][1].ia3_l[0] = 0.0
    with pytest.raises(ValueError, match="entries equal to zero"):
        delta.merge()
    assert not delta.is_merged
    inputs = tm.example_inputs("bert")
    expected = outputs(model, inputs)
    delta.merge_and_detach()  # folding in for good needs no division
    assert (outputs(model, inputs) - expected).abs().max() <= 1e-5


def test_unmerge_waits_for_later_merges_into_the_same_weight():
    model = tm.build("llama", "lm")
    ia3 = IA3Model(model, modified_modules=["v_proj"], name="ia3")
    lora = LoraModel(model, modified_modules=["v_proj"], name="lora")
    perturb(ia3, std=0.2)
    perturb(lora, std=0.2)
    original = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    ia3.merge()
    lora.merge()
    with pytest.raises(RuntimeError, match=r"deltas \['lora'\] were merged into the same weight afterwards"):
        ia3.unmerge()
    assert ia3.is_merged and lora.is_merged  # nothing changed
    lora.unmerge()
    ia3.unmerge()
    restored = model.model.layers[0].self_attn.v_proj.weight
    assert ((restored - original).norm() / original.norm()) <= 1e-6


def test_bf16_backbone_float32_vectors_compute_like_peft():
    model = tm.build("llama", "lm").to(torch.bfloat16)
    delta = IA3Model(model, delta_dtype=torch.float32)
    perturb(delta, std=0.2)
    layer = model.model.layers[0].mlp.down_proj.ia3
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    # PEFT: (x.to(l.dtype) * l).to(x.dtype)
    assert torch.equal(layer.scale(x), (x.float() * layer.ia3_l).to(torch.bfloat16))


# --------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")
HEAD = {"bert": "classifier", "llama": "score", "gpt2": "score"}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, arch):
    model = tm.build(arch, "cls")
    inputs = tm.example_inputs(arch, "cls")
    delta = IA3Model(model)
    delta.freeze_module(exclude=["deltas", HEAD[arch]])
    perturb(delta, std=0.3)
    with torch.no_grad():
        getattr(model, HEAD[arch]).weight.add_(0.25)
    expected = outputs(model, inputs)
    path = save_peft_ia3(delta, tmp_path / "peft")
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == delta.feedforward_names()
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["modules_to_save"] == [HEAD[arch]]

    loaded = peft.PeftModel.from_pretrained(tm.build(arch, "cls"), path).eval()
    got = outputs(loaded, inputs)
    assert (got - expected).abs().max() <= 1e-6
    n_peft = sum(1 for n, _ in loaded.named_parameters() if "ia3_l" in n)
    assert n_peft == len(delta.delta_layers())


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_import_of_a_peft_ia3_adapter_gives_the_same_outputs(tmp_path, arch):
    targets = {"bert": (["key", "value", "output.dense"], ["output.dense"]),
               "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}[arch]
    torch.manual_seed(0)
    config = peft.IA3Config(target_modules=targets[0], feedforward_modules=targets[1], init_ia3_weights=False,
                            fan_in_fan_out=arch == "gpt2", modules_to_save=[HEAD[arch]])
    peft_model = peft.get_peft_model(tm.build(arch, "cls"), config).eval()
    inputs = tm.example_inputs(arch, "cls")
    expected = outputs(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")

    backbone = tm.build(arch, "cls")
    delta = AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone)
    assert isinstance(delta, IA3Model)
    assert (outputs(backbone, inputs) - expected).abs().max() <= 1e-6
    n_peft = sum(1 for n, _ in peft_model.named_parameters() if "ia3_l" in n)
    assert len(delta.delta_layers()) == n_peft
    n_ff = sum(1 for _, m in peft_model.named_modules() if getattr(m, "is_feedforward", False))
    assert len(delta.feedforward_names()) == n_ff > 0

    # Our own checkpoint of the imported adapter round-trips exactly, and exports back.
    delta.freeze_module()
    path = delta.save_finetuned(tmp_path / "ours")
    fresh = tm.build(arch, "cls")
    IA3Model.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), outputs(backbone, inputs))
    again = peft.PeftModel.from_pretrained(tm.build(arch, "cls"), save_peft_ia3(delta, tmp_path / "back")).eval()
    assert (outputs(again, inputs) - expected).abs().max() <= 1e-6


def test_bad_ia3_adapters_are_refused_and_the_backbone_is_unchanged(tmp_path):
    peft.get_peft_model(tm.build("bert", "cls"), peft.IA3Config(
        target_modules=["key", "output.dense"], feedforward_modules=["output.dense"])).save_pretrained(tmp_path / "a")
    backbone = tm.build("bert", "cls")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["feedforward_modules"] = []  # the vectors of output.dense are [1, in]: they scale inputs
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"output.dense.ia3_l has shape \(1, \d+\).*\[out_features, 1\]"):
        load_peft_ia3(tmp_path / "a", backbone)
    llama = tm.build("llama", "cls")
    peft.get_peft_model(llama, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[])) \
        .save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="cannot build the IA3 delta"):
        AutoDeltaModel.from_finetuned(tmp_path / "llama", backbone)
    after = backbone.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(TypeError, match="save_peft_ia3 writes IA3 deltas"):
        save_peft_ia3(LoraModel(tm.build("bert")), tmp_path / "x")
