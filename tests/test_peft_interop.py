"""LoRA round trips with the real ``peft`` package, both directions, identical outputs."""
import json
import os

import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb
from opendelta import AutoDeltaModel, LoraModel
from opendelta.io.peft import load_peft_lora, save_peft_lora
from opendelta.io.files import CheckpointError

peft = pytest.importorskip("peft")

HEAD = {"bert": "classifier", "llama": "score", "gpt2": "score"}
TARGETS = {"bert": ["query", "value", "output.dense"], "llama": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"]}


def peft_outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("alpha", [16, 12])
def test_export_loads_in_peft_with_identical_outputs(tmp_path, arch, alpha):
    model = tm.build(arch, "cls")
    inputs = tm.example_inputs(arch, "cls")
    delta = LoraModel(model, modified_modules=TARGETS[arch], lora_r=4, lora_alpha=alpha)
    delta.freeze_module(exclude=["deltas", HEAD[arch]])
    perturb(delta)
    with torch.no_grad():
        getattr(model, HEAD[arch]).weight.add_(0.25)  # a trained head travels as modules_to_save
    expected = outputs(model, inputs)

    path = save_peft_lora(delta, tmp_path / "peft")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, alpha)
    assert config["fan_in_fan_out"] is (arch == "gpt2")  # GPT-2's Conv1D stores [in, out]
    assert config["modules_to_save"] == [HEAD[arch]]

    loaded = peft.PeftModel.from_pretrained(tm.build(arch, "cls"), path).eval()
    got = peft_outputs(loaded, inputs)
    if alpha / 4 == 4:  # a power-of-two scaling is exact whichever side it is applied on
        assert torch.equal(got, expected)
    else:  # PEFT scales after lora_B, we scale the rank-r intermediate: rounding differs
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    n_lora = sum(1 for n, _ in loaded.named_parameters() if "lora_A" in n)
    assert n_lora == len(delta.delta_layers())


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_import_of_a_peft_adapter_gives_identical_outputs(tmp_path, arch, rslora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                             fan_in_fan_out=arch == "gpt2", modules_to_save=[HEAD[arch]], use_rslora=rslora)
    peft_model = peft.get_peft_model(tm.build(arch, "cls"), config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.25)
    inputs = tm.example_inputs(arch, "cls")
    expected = peft_outputs(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")

    backbone = tm.build(arch, "cls")
    backbone.train()
    delta = AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone)
    assert isinstance(delta, LoraModel) and not backbone.training
    assert torch.allclose(outputs(backbone, inputs), expected, atol=1e-6, rtol=0) if rslora \
        else torch.equal(outputs(backbone, inputs), expected)
    n_peft = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert len(delta.delta_layers()) == n_peft

    # And back: our checkpoint of the imported adapter round-trips too, head included.
    delta.freeze_module()
    assert {n for n, p in backbone.named_parameters() if p.requires_grad and "lora" not in n} \
        == {n for n, _ in backbone.named_parameters() if n.startswith(HEAD[arch] + ".")}
    path = delta.save_finetuned(tmp_path / "ours")
    fresh = tm.build(arch, "cls")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), outputs(backbone, inputs))


def test_unsupported_peft_options_are_refused_and_backbone_unchanged(tmp_path):
    # An option opendelta does not implement (LoRA's bias training) is refused by name.
    config = peft.LoraConfig(r=4, target_modules=["query"], bias="lora_only")
    peft.get_peft_model(tm.build("bert", "cls"), config).save_pretrained(tmp_path / "bias")
    backbone = tm.build("bert", "cls")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError, match="bias"):
        load_peft_lora(tmp_path / "bias", backbone)
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(CheckpointError, match="peft_type 'LOHA'"):
        AutoDeltaModel.from_finetuned(tmp_path / "ia3", backbone)
    # An adapter made for another model: keys do not fit, nothing is left behind.
    peft.get_peft_model(tm.build("llama", "cls"), peft.LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="cannot build the LoRA delta"):
        AutoDeltaModel.from_finetuned(tmp_path / "llama", backbone)
    after = backbone.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_export_records_where_the_backbone_was_loaded_from(tmp_path):
    built = tm.build("bert", "cls")
    built.save_pretrained(tmp_path / "backbone")
    loaded = type(built).from_pretrained(tmp_path / "backbone")
    delta = LoraModel(loaded, modified_modules=["query"])

    def recorded(path):
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)["base_model_name_or_path"]

    assert recorded(save_peft_lora(delta, tmp_path / "a")) == str(tmp_path / "backbone")
    assert recorded(save_peft_lora(delta, tmp_path / "b", base_model_name_or_path="org/m")) == "org/m"
    # A backbone built from a config has no origin: nothing is recorded.
    assert recorded(save_peft_lora(LoraModel(built, modified_modules=["query"]), tmp_path / "c")) is None


def test_export_refuses_other_methods(tmp_path):
    from opendelta import AdapterModel

    with pytest.raises(TypeError, match="only LoRA"):
        save_peft_lora(AdapterModel(tm.build("bert")), tmp_path / "x")
