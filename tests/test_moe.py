"""LoRA on fused MoE experts (ParameterLoraModel) on tiny Mixtral and Qwen3-MoE, and the MoE
common-structure maps.

Comparisons run in float64 with transformers' eager experts loop (its default ``grouped_mm``
has no float64 CPU kernel); the other implementations are checked in float32. The reference
of every output is an independent copy of the backbone whose weights were given the update
``B @ A * alpha / r`` by hand (einsum over experts).
"""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiny_moe as tmoe  # noqa: E402
from opendelta import AutoDeltaModel, ParameterLoraModel, route  # noqa: E402
from opendelta.core.structure_maps_moe import MOE_STRUCTURES  # noqa: E402
from opendelta.methods.low_rank_weights import LowRankWeight, ParameterHandle  # noqa: E402
from opendelta.methods.parameter_lora import ParameterFactors, ParameterLoraLayer  # noqa: E402

ARCHS = ["mixtral", "qwen3_moe"]
EXPERT_NAMES = ("gate_up_proj", "down_proj")


def _randomize(delta, std=0.2, seed=0):
    """Give every ``lora_B`` random values (a fresh LoRA changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in delta.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype) * std)


def _dense_reference(reference, delta):
    """Add every update of ``delta`` by hand to the weights of ``reference`` (a copy of the
    backbone taken before the delta was built)."""
    with torch.no_grad():
        for host_name, _, layer in delta.layer_entries():
            host = reference.get_submodule(host_name)
            if isinstance(layer, ParameterLoraLayer):
                for name, f in layer.factors().items():
                    update = f.lora_B @ f.lora_A * f.scaling  # per expert for 3-D parameters
                    param = getattr(host, name)
                    param += update.transpose(-2, -1) if f.transposed else update
            else:
                host.weight += layer.lora_B @ layer.lora_A * layer.scaling
    return reference


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(params=ARCHS)
def moe(request):
    """``(arch, model, reference copy, delta with random updates, inputs)``."""
    model = tmoe.build(request.param)
    reference = copy.deepcopy(model)
    delta = ParameterLoraModel(model, lora_r=4, lora_alpha=8)
    _randomize(delta)
    return request.param, model, _dense_reference(reference, delta), delta, tmoe.inputs()


# --------------------------------------------------------------------------- maps
@pytest.mark.parametrize("model_type", sorted(MOE_STRUCTURES))
def test_every_moe_map_entry_names_a_module_or_parameter(model_type):
    # Maps listing alternatives (DeepSeek's q_proj or q_a/q_b_proj) are checked on both variants.
    modules, params = {}, {}
    for overrides in [{}, *tmoe.VARIANTS.get(model_type, [])]:
        model = transformers.AutoModelForCausalLM.from_config(tmoe.config(model_type, **overrides))
        modules.update(model.named_modules())
        params.update(model.named_parameters())
    unmatched = []
    for original, common in MOE_STRUCTURES[model_type].items():
        pattern = re.compile(r"(?:.*\.)?" + re.escape(original).replace(r"\{i\}", r"\d+"))
        if common.endswith(("experts.w13", "experts.w2")):
            hits = [n for n, p in params.items() if pattern.fullmatch(n) and p.dim() == 3]
        else:
            hits = [n for n in modules if pattern.fullmatch(n)]
        if not hits:
            unmatched.append(original)
    assert unmatched == [], f"{model_type} on transformers {transformers.__version__}"


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_attention_and_every_expert_stack(arch):
    model = tmoe.build(arch)
    delta = ParameterLoraModel(model)
    hosts = {e.host_name: e.layer for e in delta.layer_entries()}
    layers = model.config.num_hidden_layers
    assert sorted(h for h in hosts if h.endswith(("q_proj", "v_proj"))) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj"))
    experts = [h for h, layer in hosts.items() if isinstance(layer, ParameterLoraLayer)]
    assert experts == [f"model.layers.{i}.mlp.experts" for i in range(layers)]
    factors = hosts[experts[0]].factors()
    assert set(factors) == set(EXPERT_NAMES)
    stack = model.model.layers[0].mlp.experts
    e, d1, d2 = stack.gate_up_proj.shape
    assert factors["gate_up_proj"].lora_A.shape == (e, 8, d2) and factors["gate_up_proj"].lora_B.shape == (e, d1, 8)
    assert isinstance(stack._parameters["gate_up_proj"], ParameterHandle)


# --------------------------------------------------------------------------- behaviour
def test_lora_on_experts_changes_outputs_and_equals_the_dense_update(moe):
    arch, model, reference, delta, batch = moe
    fresh = tmoe.build(arch)
    out = _logits(model, batch)
    assert (out - _logits(fresh, batch)).abs().max() > 1e-2
    torch.testing.assert_close(out, _logits(reference, batch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_no_expert_stack_update_is_built_in_a_forward(implementation, monkeypatch):
    model = tmoe.build("mixtral", dtype=torch.float32, experts_implementation=implementation)
    reference = copy.deepcopy(model)
    delta = ParameterLoraModel(model, modified_modules=[], target_parameters=["experts.gate_up_proj",
                                                                              "experts.down_proj"])
    _randomize(delta)
    _dense_reference(reference, delta)

    def forbidden(*args, **kwargs):
        raise AssertionError("an [E, out, in] update was built")

    monkeypatch.setattr(LowRankWeight, "dense", forbidden)
    monkeypatch.setattr(ParameterFactors, "delta_weight", forbidden)
    batch = tmoe.inputs()
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in delta.named_parameters())


def test_training_lowers_the_loss_and_only_deltas_get_gradients(moe):
    _, model, _, delta, batch = moe
    delta.freeze_module()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora." in n for n in with_grad)
    assert any("experts.lora.gate_up_proj" in n for n in with_grad)


def test_merge_and_unmerge_are_exact(moe):
    arch, model, reference, delta, batch = moe
    stack = model.model.layers[0].mlp.experts
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
    lazy = _logits(model, batch)
    delta.merge(keep_copy=True)
    torch.testing.assert_close(_logits(model, batch), lazy, rtol=0, atol=1e-12)
    torch.testing.assert_close(stack.gate_up_proj.detach(), reference.model.layers[0].mlp.experts.gate_up_proj,
                               rtol=0, atol=0)
    delta.unmerge()
    after = {n: p.detach() for n, p in model.named_parameters() if ".lora." not in n}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(_logits(model, batch), lazy)
    delta.merge()  # without copies: the subtraction restores float64 within rounding
    delta.unmerge()
    assert max((before[n] - p.detach()).abs().max().item() for n, p in model.named_parameters()
               if n in before) < 1e-15


def test_save_and_load_round_trip_exactly(moe, tmp_path):
    arch, model, _, delta, batch = moe
    out = _logits(model, batch)
    delta.save_finetuned(tmp_path / "delta")
    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "delta" / "model.safetensors"))
    assert keys and all(".lora." in k for k in keys)
    assert any(k.endswith("experts.lora.down_proj.lora_B") for k in keys)
    fresh = tmoe.build(arch)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert isinstance(loaded, ParameterLoraModel)
    assert torch.equal(_logits(fresh, batch), out)


def test_peft_target_parameters_format_round_trips_through_peft(moe, tmp_path):
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.21"):
        pytest.skip("the target_parameters layout of the PEFT format is peft >= 0.21's "
                    f"(installed: {peft.__version__})")
    from opendelta.io.peft_parameters import load_peft_parameter_lora, save_peft_parameter_lora

    arch, model, _, delta, batch = moe
    out = _logits(model, batch)
    save_peft_parameter_lora(delta, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tmoe.build(arch), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs, batch), out, rtol=0, atol=1e-12)
    # PEFT's own adapter (random B: init_lora_weights=False) read by us.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    peft_model = peft.get_peft_model(tmoe.build(arch, seed=3), config)
    expected = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "theirs")
    fresh = tmoe.build(arch, seed=3)
    plain = _logits(fresh, batch)
    ours = load_peft_parameter_lora(tmp_path / "theirs", fresh)
    assert isinstance(ours, ParameterLoraModel)
    got = _logits(fresh, batch)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_detach_restores_exactly_and_attach_restores_the_delta(moe):
    arch, model, _, delta, batch = moe
    stack = model.model.layers[1].mlp.experts
    plain = _logits(tmoe.build(arch), batch)
    out = _logits(model, batch)
    delta.detach()
    assert type(stack._parameters["gate_up_proj"]) is torch.nn.Parameter
    assert torch.equal(_logits(model, batch), plain)
    delta.attach()
    assert isinstance(stack._parameters["down_proj"], ParameterHandle)
    assert torch.equal(_logits(model, batch), out)
    delta.merge_and_detach()
    assert type(stack._parameters["down_proj"]) is torch.nn.Parameter
    assert not any(".lora" in n for n, _ in model.named_modules())
    torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-12)


def test_a_whole_batch_routes_to_one_delta_and_rows_cannot_be_split():
    model = tmoe.build("mixtral")
    a = ParameterLoraModel(model, name="a")
    b = ParameterLoraModel(model, name="b")
    _randomize(a, seed=1)
    _randomize(b, seed=2)
    batch = tmoe.inputs()
    with route("a"):
        routed = _logits(model, batch)
    b.detach()
    assert torch.equal(routed, _logits(model, batch))
    b.attach()
    with pytest.raises(ValueError, match="subset of the batch|dimension 0"):
        with route(["a", "b"]):
            model(**batch)


def test_deepcopy_and_pickling_keep_the_delta():
    model = tmoe.build("mixtral")
    delta = ParameterLoraModel(model)
    _randomize(delta)
    batch = tmoe.inputs()
    out = _logits(model, batch)
    assert torch.equal(_logits(copy.deepcopy(model), batch), out)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(_logits(torch.load(buffer, weights_only=False), batch), out)


def test_transposed_experts_and_user_named_2d_parameters():
    # GPT-OSS stores experts [E, in, out] (is_transposed); the router weight is a 2-D parameter used by F.linear.
    model = tmoe.build("gpt_oss")
    reference = copy.deepcopy(model)
    delta = ParameterLoraModel(model, modified_modules=[], lora_r=2,
                               target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.router.weight"])
    assert model.model.layers[0].mlp.experts.is_transposed
    _randomize(delta)
    _dense_reference(reference, delta)
    batch = tmoe.inputs()
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=0, atol=1e-12)


def test_bad_parameter_targets_are_refused_with_the_fix():
    model = tmoe.build("mixtral")
    with pytest.raises(ValueError, match="closest parameter names.*gate_up_proj"):
        ParameterLoraModel(model, target_parameters=["experts.gate_up"])
    with pytest.raises(ValueError, match="lora_dropout must be 0"):
        ParameterLoraModel(model, lora_dropout=0.1)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        ParameterLoraModel(model, modified_modules=[], target_parameters=["input_layernorm.weight"])
    with pytest.raises(ValueError, match="both as modules and through their parameters"):
        ParameterLoraModel(model, modified_modules=["self_attn.q_proj"], target_parameters=["q_proj.weight"])
    assert not any(isinstance(p, ParameterHandle) for p in model.parameters())
    assert not any(".lora" in n for n, _ in model.named_modules())


def test_a_forward_that_raises_leaves_no_update_switched_on(monkeypatch):
    model = tmoe.build("mixtral")
    delta = ParameterLoraModel(model, modified_modules=[], target_parameters=["experts.gate_up_proj"])
    _randomize(delta)
    batch = tmoe.inputs()
    out = _logits(model, batch)
    experts = model.model.layers[1].mlp.experts
    original = type(experts).forward

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(experts), "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        model(**batch)  # layer 0's hooks ran in full; layer 1's pre-hook pushed, its post-hook never ran
    monkeypatch.setattr(type(experts), "forward", original)
    assert torch.equal(_logits(model, batch), out)
    delta.detach()
    assert torch.equal(_logits(model, batch), _logits(tmoe.build("mixtral"), batch))
