"""LoRA's variants: rsLoRA, DoRA, the init_lora_weights options (gaussian, PiSSA, OLoRA).
Hand-computed maths, exact save/load, and PEFT round trips both ways checked by peft itself
(generic checks: the "lora_dora" and "lora_pissa" rows of tests/matrix_cases.py)."""
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models as tm
from helpers import outputs, perturb
from opendelta import AutoDeltaModel, LoraConfig, LoraModel
from opendelta.io.files import BackboneHashWarning, CheckpointError
from opendelta.io.peft import load_peft_lora, save_peft_lora
from opendelta.methods.lora import DoraLayer


def _toy(out=5, inp=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.proj = nn.Linear(inp, out)
    return model


def _layer(delta):
    return delta.delta_layers()[0][1]


def _set(layer, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(value)


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = _toy()
    x = torch.randn(3, 6)
    plain = LoraModel(model, modified_modules=["proj"], lora_r=4, lora_alpha=6, name="plain")
    assert _layer(plain).scaling == 6 / 4
    plain.detach()
    rs = LoraModel(model, modified_modules=["proj"], lora_r=4, lora_alpha=6, use_rslora=True)
    layer = _layer(rs)
    assert layer.scaling == 6 / math.sqrt(4) == 3.0
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    _set(layer, lora_A=A, lora_B=B)
    W, b = model.proj.weight, model.proj.bias
    assert torch.allclose(model(x), x @ W.T + b + 3.0 * (x @ A.T @ B.T), atol=1e-6, rtol=0)


def test_dora_forward_by_hand_and_gradients_with_a_constant_norm():
    model = _toy()
    x = torch.randn(3, 6)
    delta = LoraModel(model, modified_modules=["proj"], lora_r=2, lora_alpha=4, use_dora=True)
    layer = _layer(delta)
    W, b = model.proj.weight.detach(), model.proj.bias.detach()
    assert isinstance(layer, DoraLayer) and layer.batched_routing is False
    assert torch.allclose(layer.lora_magnitude_vector, W.norm(dim=1))  # m starts at the row norms
    assert torch.equal(model(x), F.linear(x, model.proj.weight, model.proj.bias))  # B = 0: unchanged
    A, B, m = torch.randn(2, 6), torch.randn(5, 2), torch.rand(5) + 0.5
    _set(layer, lora_A=A, lora_B=B, lora_magnitude_vector=m)
    adapted = W + 2.0 * B @ A  # scaling 4 / 2
    norm = adapted.norm(dim=1)  # one per output feature
    expected = (x @ adapted.T) * (m / norm) + b
    out = model(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-6)
    # The norm is a constant in backpropagation: d out / d m = (W + s B A) x / n.
    out.sum().backward()
    assert torch.allclose(layer.lora_magnitude_vector.grad, ((x @ adapted.T) / norm).sum(0), atol=1e-5, rtol=1e-6)


def test_dora_merge_writes_the_decomposed_weight_and_unmerge_restores_it():
    model = _toy()
    x = torch.randn(3, 6)
    delta = LoraModel(model, modified_modules=["proj"], lora_r=2, lora_alpha=4, use_dora=True)
    layer = _layer(delta)
    A, B, m = torch.randn(2, 6), torch.randn(5, 2), torch.rand(5) + 0.5
    _set(layer, lora_A=A, lora_B=B, lora_magnitude_vector=m)
    W, b = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    expected = model(x).detach()
    delta.merge()
    adapted = W + 2.0 * B @ A
    assert torch.allclose(model.proj.weight, (m / adapted.norm(dim=1))[:, None] * adapted, atol=1e-6, rtol=1e-6)
    assert torch.equal(model.proj.bias, b)  # DoRA never scales the bias
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)
    delta.unmerge()
    assert ((model.proj.weight - W).norm() / W.norm()) <= 1e-6
    delta.merge(keep_copy=True)
    delta.unmerge()
    assert ((model.proj.weight - W).norm() / W.norm()) <= 1e-6
    before = model.proj.weight.detach().clone()
    delta.merge(keep_copy=True)
    delta.unmerge()
    assert torch.equal(model.proj.weight, before)  # from the copy, bit for bit


@pytest.mark.parametrize("mode", ["pissa", "olora"])
def test_residual_plus_adapter_is_the_weight_and_detach_restores_it(mode):
    model = _toy(out=7, inp=9)
    W = model.proj.weight.detach().clone()
    x = torch.randn(4, 9)
    base = model(x).detach()
    delta = LoraModel(model, modified_modules=["proj"], lora_r=3, lora_alpha=6, init_lora_weights=mode)
    layer = _layer(delta)
    principal = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    residual = model.proj.weight.detach()
    assert torch.allclose(residual + principal, W, atol=1e-6, rtol=0)  # residual + adapter = W
    assert not torch.allclose(residual, W)  # the principal part left the base weight
    if mode == "pissa":  # the rank-3 SVD truncation of W
        u, s, vh = torch.linalg.svd(W)
        assert torch.allclose(principal, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
        assert torch.allclose(layer.lora_A @ layer.lora_A.T * layer.scaling, torch.diag(s[:3]), atol=1e-5)
    else:  # B: orthonormal columns Q_r; B A: the projection of W onto them
        q = layer.lora_B.detach()
        assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-6)
        assert torch.allclose(principal, layer.scaling * q @ q.T @ W, atol=1e-5, rtol=0)
    assert (model(x) - base).abs().max() <= 1e-6
    perturb(delta, std=0.1)
    tuned = model(x).detach()
    delta.detach()
    assert torch.equal(model.proj.weight, W) and torch.equal(model(x), base)  # bit for bit
    delta.attach()
    assert torch.equal(model.proj.weight, residual) and torch.equal(model(x), tuned)


def test_gaussian_init_and_bad_options():
    model = _toy(out=512, inp=512)
    layer = _layer(LoraModel(model, modified_modules=["proj"], lora_r=8, init_lora_weights="gaussian"))
    assert torch.count_nonzero(layer.lora_B) == 0
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.01  # A ~ N(0, 1/r), not Kaiming-uniform
    with pytest.raises(ValueError, match=r"unknown init_lora_weights 'loftq'.*True, False or one of "
                                         r"\['gaussian', 'pissa', 'olora'\]"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(TypeError, match=r"LoraConfig.use_dora must be True or False, got 1"):
        LoraConfig(use_dora=1)
    with pytest.raises(ValueError, match="take the first r = 9 directions of 'proj'"):
        LoraModel(_toy(), modified_modules=["proj"], lora_r=9, init_lora_weights="pissa")
    assert LoraConfig.from_dict(LoraConfig(use_dora=True, init_lora_weights="olora").to_dict()) == \
        LoraConfig(use_dora=True, init_lora_weights="olora")


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"use_dora": True}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "olora", "use_dora": True}], ids=str)
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_save_and_load_are_exact(tmp_path, arch, options):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    delta = LoraModel(model, lora_r=4, **options)
    delta.freeze_module()
    perturb(delta, std=0.05)
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = tm.build(arch, "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneHashWarning)  # the hash is the original weights'
        loaded = AutoDeltaModel.from_finetuned(path, fresh)
    assert {k: getattr(loaded.config, k) for k in options} == options
    assert torch.equal(outputs(fresh, inputs), expected)


# --------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")
HEAD = {"bert": "classifier", "llama": "score", "gpt2": "score"}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
VARIANTS = [{"use_dora": True}, {"use_rslora": True, "lora_alpha": 6}, {"init_lora_weights": "pissa"},
            {"init_lora_weights": "olora"}, {"init_lora_weights": "pissa", "use_dora": True, "use_rslora": True}]


@pytest.mark.parametrize("options", VARIANTS, ids=str)
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, arch, options):
    model = tm.build(arch, "cls")
    inputs = tm.example_inputs(arch, "cls")
    delta = LoraModel(model, modified_modules=TARGETS[arch], lora_r=4, **options)
    delta.freeze_module(exclude=["deltas", HEAD[arch]])
    perturb(delta, std=0.05)
    expected = outputs(model, inputs)
    path = save_peft_lora(delta, tmp_path / "peft")
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    residual = options.get("init_lora_weights") in ("pissa", "olora")
    assert config["r"] == (8 if residual else 4) and config["init_lora_weights"] is True
    assert (config["use_dora"], config["use_rslora"]) == (options.get("use_dora", False),
                                                          options.get("use_rslora", False))
    loaded = peft.PeftModel.from_pretrained(tm.build(arch, "cls"), path).eval()  # an unmodified backbone
    assert (outputs(loaded, inputs) - expected).abs().max() <= 1e-6
    # And back: the exported (rank-2r, for PiSSA / OLoRA) adapter loads into ours too.
    again = tm.build(arch, "cls")
    AutoDeltaModel.from_finetuned(path, again)
    assert (outputs(again, inputs) - expected).abs().max() <= 1e-6


def _peft_trained(arch, **options):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2",
                             modules_to_save=[HEAD[arch]], **options)
    model = peft.get_peft_model(tm.build(arch, "cls"), config).eval()
    with torch.no_grad():  # a trained adapter: every LoRA tensor moved
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_dora": True, "use_rslora": True},
                                     {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}], ids=str)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_import_of_peft_variants_gives_the_same_outputs(tmp_path, arch, options):
    peft_model = _peft_trained(arch, **options)
    inputs = tm.example_inputs(arch, "cls")
    expected = outputs(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")  # PiSSA / OLoRA: PEFT's unconverted format
    backbone = tm.build(arch, "cls")  # the original weights: the residual is rebuilt
    delta = AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone)
    assert isinstance(delta, LoraModel) and delta.config.use_dora == options.get("use_dora", False)
    assert (outputs(backbone, inputs) - expected).abs().max() <= 1e-6
    # Our own checkpoint of it round-trips exactly.
    delta.freeze_module()
    path = delta.save_finetuned(tmp_path / "ours")
    fresh = tm.build(arch, "cls")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), outputs(backbone, inputs))


def test_import_of_a_converted_pissa_adapter(tmp_path):
    """PEFT's portable PiSSA format: a plain rank-2r LoRA of the original weights."""
    initial = peft.get_peft_model(tm.build("llama", "cls"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights="pissa"))
    initial.save_pretrained(tmp_path / "initial")
    peft_model = initial
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    inputs = tm.example_inputs("llama", "cls")
    expected = outputs(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    backbone = tm.build("llama", "cls")
    delta = AutoDeltaModel.from_finetuned(tmp_path / "converted", backbone)
    assert delta.config.lora_r == 8 and delta.config.init_lora_weights is True
    assert (outputs(backbone, inputs) - expected).abs().max() <= 1e-6


def test_unrebuildable_initialisations_are_refused(tmp_path):
    peft.get_peft_model(tm.build("bert", "cls"), peft.LoraConfig(r=4, target_modules=["query"])) \
        .save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    config_file.write_text(json.dumps(config))
    backbone = tm.build("bert", "cls")
    with pytest.raises(CheckpointError, match="init_lora_weights='pissa_niter_4' is not supported"):
        load_peft_lora(tmp_path / "a", backbone)
    assert not any("lora" in n for n, _ in backbone.named_modules())
