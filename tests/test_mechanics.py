"""DeltaBase mechanics: ordering, detach/attach, copies, pickling, freezing, meta device."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import tiny_models as tm
from helpers import outputs, perturb, trainable_names
from opendelta import AdapterModel, BitFitModel, DeltaLayer, LoraModel
from opendelta.core.dispatch import attach_layer, detach_layer


class Scale(DeltaLayer):
    """Multiplies the host output (after) or input (before) by a factor; records its runs."""

    def __init__(self, factor, where, log):
        super().__init__()
        self.factor, self.log = factor, log
        self.uses_pre_hook = where == "before"
        self.uses_post_hook = where == "after"

    def pre_forward(self, host, args, kwargs):
        self.log.append(self.factor)
        return (args[0] * self.factor,), kwargs

    def post_forward(self, host, args, kwargs, output):
        self.log.append(self.factor)
        return output + self.factor


@pytest.mark.parametrize("where", ["before", "after"])
def test_documented_order_and_exact_reattach(where):
    log = []
    host = nn.Linear(3, 3)
    a, b, c = Scale(2.0, where, log), Scale(3.0, where, log), Scale(5.0, where, log)
    for name, layer in (("a", a), ("b", b), ("c", c)):
        attach_layer(host, name, layer)
    x = torch.randn(2, 3)
    y = host(x)
    expected = [2.0, 3.0, 5.0] if where == "after" else [5.0, 3.0, 2.0]
    assert log == expected  # after: first added first; before: last added first
    detach_layer(host, b)
    log.clear()
    host(x)
    assert log == [f for f in expected if f != 3.0]
    attach_layer(host, "b", b)  # back in its original place
    log.clear()
    assert torch.equal(host(x), y) and log == expected
    assert list(host._modules) == ["a", "b", "c"]


def test_two_deltas_on_one_module_detach_either():
    model = tm.build("bert", "cls")
    inputs = tm.example_inputs("bert", "cls")
    base = outputs(model, inputs)
    lora = LoraModel(model, modified_modules=["attention.output.dense"])
    adapter = AdapterModel(model, modified_modules=["attention.output.dense"])
    perturb(lora, seed=1)
    perturb(adapter, seed=2)
    both = outputs(model, inputs)
    host = model.bert.encoder.layer[0].attention.output.dense
    x = torch.randn(2, 5, tm.HIDDEN)
    with torch.no_grad():
        lora_layer, adapter_layer = host.lora, host.adapter
        expected = adapter_layer.adapt(nn.functional.linear(x, host.weight, host.bias) + lora_layer.delta(x))
        assert torch.allclose(host(x), expected, atol=1e-6)  # LoRA (first) runs before the adapter

    lora.detach()
    only_adapter = outputs(model, inputs)
    assert not torch.equal(only_adapter, both) and not torch.equal(only_adapter, base)
    adapter.detach()
    assert torch.equal(outputs(model, inputs), base)
    lora.attach()
    only_lora = outputs(model, inputs)
    adapter.attach()
    assert torch.equal(outputs(model, inputs), both)
    adapter.detach()
    assert torch.equal(outputs(model, inputs), only_lora)
    adapter.attach()
    lora.detach()
    assert torch.equal(outputs(model, inputs), only_adapter)


def test_second_delta_of_same_method_gets_its_own_name():
    model = tm.build("bert", "cls")
    first = LoraModel(model, modified_modules=["query"])
    second = LoraModel(model, modified_modules=["query"], lora_r=2)
    query = model.bert.encoder.layer[0].attention.self.query
    assert first.layer_attr == "lora" and second.layer_attr == "lora_1"
    assert query.lora.r == 8 and query.lora_1.r == 2


def test_deepcopy_is_independent_and_torch_save_round_trips(tmp_path):
    model = tm.build("gpt2", "lm")
    inputs = tm.example_inputs("gpt2")
    delta = LoraModel(model)
    perturb(delta)
    before = outputs(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(outputs(clone, inputs), before)
    with torch.no_grad():
        clone.transformer.h[0].attn.c_attn.lora.lora_B.add_(1.0)
    assert not torch.equal(outputs(clone, inputs), before)
    assert torch.equal(outputs(model, inputs), before)
    # Detaching the original leaves the copy's delta in place.
    delta.detach()
    assert not torch.equal(outputs(clone, inputs), outputs(model, inputs))
    delta.attach()

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(outputs(loaded, inputs), before)


def test_freeze_state_dict_through_wrappers_and_plain_torch_round_trip(tmp_path):
    model = tm.build("bart", "cls")
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classification_head"], set_state_dict=True)
    expected = trainable_names(model)
    assert set(model.state_dict()) == expected
    wrapped = nn.Sequential(model)
    assert set(wrapped.state_dict()) == {"0." + n for n in expected}
    perturb(delta)
    inputs = tm.example_inputs("bart", "cls")
    tuned = outputs(model, inputs)
    torch.save(model.state_dict(), tmp_path / "delta.pt")

    fresh = tm.build("bart", "cls")
    LoraModel(fresh).freeze_module(exclude=["deltas", "classification_head"])
    result = fresh.load_state_dict(torch.load(tmp_path / "delta.pt"), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(outputs(fresh, inputs), tuned)


def test_freeze_exclude_follows_addressing_and_common_names():
    model = tm.build("bart", "lm")
    delta = AdapterModel(model, modified_modules=["fc2"], bottleneck_dim=12)
    delta.freeze_module(exclude=["deltas", "layernorm_embedding"])
    names = trainable_names(model)
    assert {n for n in names if "layernorm_embedding" in n} == {
        f"model.{side}.layernorm_embedding.{p}" for side in ("encoder", "decoder") for p in ("weight", "bias")}
    assert all("adapter" in n or "layernorm_embedding" in n for n in names)
    # Common-structure names work in exclude (the original unfroze nothing here).
    delta.freeze_module(exclude=["layer_norm"])
    assert names != trainable_names(model)
    assert trainable_names(model) and all("layer_norm" in n for n in trainable_names(model))
    with pytest.raises(ValueError, match="match no module or parameter"):
        delta.freeze_module(exclude=["deltas", "layernorm_embeding"])


def test_user_guide_examples():
    # Custom usage: BART fc2 with bottleneck 12.
    bart = tm.build("bart", "lm")
    delta = AdapterModel(backbone_model=bart, modified_modules=["fc2"], bottleneck_dim=12)
    entries = delta.layer_entries()
    assert len(entries) == 4 and all(e.layer.modulelist.down_proj.out_features == 12 for e in entries)
    # Regex rules: only layer 1's self-attention output of the encoder.
    bart2 = tm.build("bart", "lm")
    delta = LoraModel(bart2, modified_modules=[r"[r]encoder\.layers\.[1]\.self_attn\.out_proj"])
    assert [h for h, _, _ in delta.layer_entries()] == ["model.encoder.layers.1.self_attn.out_proj"]
    # Composition: LoRA on key plus Adapter on output of RoBERTa.
    roberta = tm.build("roberta", "cls")
    inputs = tm.example_inputs("roberta", "cls")
    base = outputs(roberta, inputs)
    lora = LoraModel(backbone_model=roberta, modified_modules=["key"])
    adapter = AdapterModel(backbone_model=roberta, modified_modules=["output"])
    adapter.freeze_module(exclude=["deltas", "classifier"])
    names = trainable_names(roberta)
    assert any(".key.lora." in n for n in names) and any(".output.adapter." in n for n in names)
    assert any(n.startswith("classifier") for n in names)
    assert not torch.equal(outputs(roberta, inputs), base)
    lora.detach()
    adapter.detach()
    assert torch.equal(outputs(roberta, inputs), base)


def test_meta_device_llama_7b_without_forward():
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)

    def no_forward(*args, **kwargs):
        raise AssertionError("no forward pass may run")

    model.forward = no_forward
    lora = LoraModel(model)
    adapter = AdapterModel(model)
    bitfit = BitFitModel(model)
    assert len(lora.layer_entries()) == 64 and len(adapter.layer_entries()) == 64
    assert model.model.layers[0].self_attn.q_proj.lora.lora_A.shape == (8, 4096)
    assert model.model.layers[0].mlp.down_proj.adapter.modulelist.up_proj.weight.shape == (4096, 24)
    assert all(p.is_meta for _, p in bitfit.named_parameters())
    assert lora.num_delta_parameters() == 32 * 2 * (8 * 4096 * 2)


def test_import_does_not_import_transformers():
    code = "import sys, opendelta, bigmodelvis; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_delta_model_forward_explains(capsys):
    model = tm.build("bert", "cls")
    delta = LoraModel(model)
    with pytest.raises(RuntimeError, match="Call the backbone model"):
        delta(torch.zeros(1, 2))
    delta.freeze_module(exclude=["deltas", "classifier"])
    delta.log(visualization=False)
    printed = capsys.readouterr().out
    n_delta = 2 * 2 * (8 * tm.HIDDEN * 2)
    assert f"Delta Parameter Ratio: {n_delta}/" in printed
    assert f"Trainable Ratio: {n_delta + tm.HIDDEN * 3 + 3}/" in printed


class Gain(nn.Module):
    """A module that states no sizes (its parameter is not called ``weight``)."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, hidden):
        return hidden * self.gain


class ToyLM(nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.scale = Gain(6)
        self.fail = fail

    def forward(self, input_ids):
        if self.fail:
            raise RuntimeError("this model needs pixel_values")
        return self.scale(self.embed(input_ids))


def test_sizes_fall_back_to_one_dummy_forward():
    model = ToyLM()
    delta = AdapterModel(model, modified_modules=["scale"], bottleneck_dim=3)
    layer = model.scale.adapter
    assert layer.modulelist.down_proj.in_features == 6 and layer.modulelist.down_proj.out_features == 3
    assert len(model.scale._forward_hooks) == 1  # the probe's hook is gone: only the dispatch hook
    delta.detach()
    assert not model.scale._forward_hooks


def test_failed_dummy_forward_is_a_clear_error_never_swallowed():
    model = ToyLM(fail=True)
    with pytest.raises(RuntimeError, match=r"could not infer the sizes of \['scale'\].*dummy forward of "
                                           r"ToyLM .* failed: this model needs pixel_values") as info:
        AdapterModel(model, modified_modules=["scale"])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not model.scale._forward_hooks and "adapter" not in model.scale._modules
