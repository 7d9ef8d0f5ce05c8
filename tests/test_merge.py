"""merge / unmerge / merge_and_detach for the mergeable methods (LoRA, BitFit).

Tolerances: merged and unmerged outputs agree within 1e-5 (absolute, fp32 logits of order
1); ``unmerge()`` restores every weight within a relative error of 1e-6 (Frobenius norm);
``merge(keep_copy=True)`` followed by ``unmerge()`` restores them bit for bit.
"""
import copy

import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import build, methods
from opendelta import AdapterModel, BitFitModel, LoraModel
from opendelta.core.layers import DeltaLayer

ARCHS = ["bert", "gpt2", "llama"]  # Linear with bias, Conv1D [in, out], bias-free Linear
ATOL = 1e-5


def _make(method, arch):
    model = tm.build(arch, "lm")
    if method == "bitfit" and arch == "llama":  # bias-free linears and RMSNorm: merge() refuses, see below
        delta = BitFitModel(model, modified_modules=["ff"], common_structure=True)
    else:
        delta = build(method, model)
    perturb(delta, std=0.2)
    return model, delta


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
            if not any(s in k for s in (".lora.", ".bitfit."))}


def _max_rel_error(model, reference):
    state = model.state_dict()
    return max(((state[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in reference.items())


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", methods(mergeable=True))
def test_merge_unmerge(method, arch):
    model, delta = _make(method, arch)
    inputs = tm.example_inputs(arch)
    if method == "bitfit" and arch == "llama":
        with pytest.raises(ValueError, match="no bias to fold"):
            delta.merge()
        assert not delta.is_merged
        return
    original = _weights(model)
    unmerged = outputs(model, inputs)
    hooks = _hook_count(model)
    assert hooks > 0

    delta.merge()
    assert delta.is_merged
    assert all(layer.merged for _, layer in delta.delta_layers())
    assert _hook_count(model) == 0  # the deltas' hooks no longer run: nothing is added twice
    merged = outputs(model, inputs)
    assert (merged - unmerged).abs().max() <= ATOL
    assert _max_rel_error(model, original) > 1e-4  # the weights did change
    delta.merge()  # idempotent
    assert torch.allclose(outputs(model, inputs), merged, atol=0, rtol=0)

    delta.unmerge()
    assert not delta.is_merged and _hook_count(model) == hooks
    assert _max_rel_error(model, original) <= 1e-6
    assert (outputs(model, inputs) - unmerged).abs().max() <= ATOL

    before = _weights(model)  # after a subtracting unmerge: equal to original within rounding
    delta.merge(keep_copy=True)
    assert (outputs(model, inputs) - unmerged).abs().max() <= ATOL
    delta.unmerge()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_detach_attach_while_merged_is_exact(arch):
    model, delta = _make("lora", arch)
    inputs = tm.example_inputs(arch)
    delta.detach()
    base, original = outputs(model, inputs), _weights(model)
    delta.attach()
    delta.merge(keep_copy=True)
    merged_weights, merged = _weights(model), outputs(model, inputs)

    delta.detach()  # defined: unmerge (exact with keep_copy), then detach
    assert not delta.is_merged
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert torch.equal(outputs(model, inputs), base)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())

    delta.attach()  # defined: re-merge with the same options: same weights, bit for bit
    assert delta.is_merged and _hook_count(model) == 0
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged_weights.items())
    assert torch.equal(outputs(model, inputs), merged)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", methods(mergeable=True))
def test_merge_and_detach_leaves_a_plain_backbone(method, arch):
    model, delta = _make(method, arch)
    delta.freeze_module()
    inputs = tm.example_inputs(arch)
    unmerged = outputs(model, inputs)
    n_params = len(dict(model.named_parameters()))
    n_delta = len(dict(delta.named_parameters()))

    returned = delta.merge_and_detach()
    assert returned is model
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # Only the host's slot counter stays (run order of layers added later), no hook state.
    assert not any(k.startswith("_opendelta") and k != "_opendelta_next_slot"
                   for m in model.modules() for k in m.__dict__)
    assert not any(".lora." in k or ".bitfit." in k for k in model.state_dict())
    # The state-dict filter is gone: the full backbone is saved again.
    assert set(model.state_dict()) >= {n for n, _ in model.named_parameters()}
    assert (outputs(model, inputs) - unmerged).abs().max() <= ATOL
    created = len(dict(model.named_parameters())) - (n_params - n_delta)
    if method == "bitfit" and arch == "llama":
        assert created == n_delta > 0  # the biases the feed-forward Linears lacked
        assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj").bias, torch.nn.Parameter)
    else:
        assert created == 0
    copy.deepcopy(model)  # a plain module: copies and pickles
    with pytest.raises(RuntimeError, match="merge_and_detach"):
        delta.attach()
    assert not delta.is_attached


def test_bitfit_on_rmsnorm_refuses_even_merge_and_detach():
    model = tm.build("llama", "lm")
    delta = BitFitModel(model, modified_modules=["layer_norm"], common_structure=True)
    with pytest.raises(ValueError, match="forward would not read one"):
        delta.merge_and_detach()
    assert all(not layer.merged for _, layer in delta.delta_layers())
    assert all(not hasattr(m, "bias") or m.bias is None
               for n, m in model.named_modules() if n.endswith("layernorm"))


def test_non_mergeable_delta_refuses():
    model = tm.build("bert", "lm")
    delta = AdapterModel(model)
    with pytest.raises(TypeError, match="AdapterLayer .* not a linear re-parameterisation"):
        delta.merge()
    with pytest.raises(TypeError, match="cannot be merged"):
        delta.merge_and_detach()
    assert _hook_count(model) > 0 and delta.is_attached


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    model, delta = _make("lora", "bert")
    original = _weights(model)
    layer = delta.delta_layers()[-1][1]
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        delta.merge(safe=True)
    assert not delta.is_merged
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_merge_detached_delta_raises():
    model, delta = _make("lora", "bert")
    delta.detach()
    with pytest.raises(RuntimeError, match="attach"):
        delta.merge()


def test_merged_lora_next_to_unmerged_adapter_on_one_module():
    """A merged layer is skipped by the dispatcher while its neighbour still runs."""
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    lora = LoraModel(model, modified_modules=["attn.proj"], common_structure=True)
    adapter = AdapterModel(model, modified_modules=["attn.proj"], common_structure=True)
    perturb(lora, seed=1)
    perturb(adapter, seed=2)
    both = outputs(model, inputs)
    lora.merge()
    host = model.get_submodule("bert.encoder.layer.0.attention.output.dense")
    assert len(host._forward_hooks) == 1 and host._opendelta_post_layers == ("adapter",)
    assert (outputs(model, inputs) - both).abs().max() <= ATOL
    adapter.detach()
    lora.unmerge()
    adapter.attach()
    assert (outputs(model, inputs) - both).abs().max() <= ATOL


def test_two_merged_deltas_unmerged_out_of_order():
    """Copies are used only while valid: out-of-order unmerges fall back to subtraction."""
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    original = _weights(model)
    first = LoraModel(model, name="first")
    second = LoraModel(model, name="second")
    perturb(first, seed=1)
    perturb(second, seed=2)
    both = outputs(model, inputs)
    first.merge(keep_copy=True)
    second.merge(keep_copy=True)
    assert (outputs(model, inputs) - both).abs().max() <= ATOL
    first.unmerge()  # not the last merged: subtracts; second's copy is now stale
    second.unmerge()
    assert _max_rel_error(model, original) <= 1e-6
    assert (outputs(model, inputs) - both).abs().max() <= ATOL


def test_merge_on_meta_device_and_half_precision():
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, vocab_size=96)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    delta = LoraModel(model)
    delta.merge()
    assert delta.is_merged and model.model.layers[0].self_attn.q_proj.weight.is_meta

    model = tm.build("gpt2", "lm").to(torch.bfloat16)
    delta = LoraModel(model)
    perturb(delta, std=0.2)
    original = _weights(model)
    delta.merge(keep_copy=True)
    delta.unmerge()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


# ------------------------------------------------------------------ merge state on the layers
def test_merge_state_lives_on_the_layers_and_is_dropped_on_unmerge():
    model, delta = _make("lora", "bert")
    layer = delta.delta_layers()[0][1]
    assert layer.merge_state == {} and not layer.merge_is_stale()
    delta.merge()
    state = layer.merge_state
    assert state["host"] is model.get_submodule(delta.layer_entries()[0].host_name)
    assert state["tensors"][0] is state["host"].weight and state["backup"] is None
    assert set(state["snapshot"]) == {"lora_A", "lora_B"} and state["fingerprints"][0] is not None
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    assert layer.merge_is_stale()
    delta.unmerge()
    assert layer.merge_state == {} and not layer.merged


def test_merge_brings_stale_layers_up_to_date():
    """An optimizer step on a merged delta shows in the outputs after the next merge()."""
    model, delta = _make("lora", "bert")
    inputs = tm.example_inputs("bert")
    delta.merge()
    with torch.no_grad():
        for p in delta.parameters():
            p.mul_(1.5)
    stale = outputs(model, inputs)
    delta.merge()
    current = outputs(model, inputs)
    delta.unmerge()
    assert (outputs(model, inputs) - current).abs().max() <= ATOL
    assert not torch.allclose(stale, current, atol=ATOL)


def test_merge_and_detach_folds_the_current_values():
    model, delta = _make("lora", "bert")
    inputs = tm.example_inputs("bert")
    delta.merge()
    with torch.no_grad():
        for p in delta.parameters():
            p.mul_(-1.0)
    delta.unmerge()
    expected = outputs(model, inputs)
    delta.merge()
    with torch.no_grad():
        for p in delta.parameters():
            p.mul_(1.0)  # a write of the same values: nothing to re-merge
    delta.merge_and_detach()
    assert (outputs(model, inputs) - expected).abs().max() <= ATOL


def test_attach_that_cannot_merge_again_stays_detached():
    """attach() re-merges a delta detach() unmerged; if the weights were tied meanwhile, the
    merge is refused and attach() leaves the delta detached (all or nothing)."""
    model = tm.build("gpt2", "lm")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    delta = LoraModel(model, modified_modules=["lm_head"])
    perturb(delta, std=0.2)
    delta.merge()
    delta.detach()
    model.lm_head.weight = model.transformer.wte.weight  # tied again
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match="tied weights"):
        delta.attach()
    assert not delta.is_attached and _hook_count(model) == hooks
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_unmerging_the_first_of_two_merges_hands_over_its_fingerprint():
    from opendelta.io.hashing import gen_model_hash

    model = tm.build("bert", "lm")
    clean = gen_model_hash(model)
    first, second = LoraModel(model, name="first"), LoraModel(model, name="second")
    perturb(first, seed=1)
    perturb(second, seed=2)
    first.merge()
    second.merge()
    second_layer = second.delta_layers()[0][1]
    assert second_layer.merge_state["fingerprints"] == [None]  # the first merge recorded it
    first.unmerge()
    assert second_layer.merge_state["fingerprints"][0] is not None
    assert gen_model_hash(model) == clean


def test_merge_refuses_to_jump_over_a_non_additive_layer():
    """A merged LoRA acts inside its host, i.e. before every unmerged layer on it: it may only
    be merged when the layers running before it commute with that (additive ones do)."""
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    adapter = AdapterModel(model, modified_modules=["attention.output.dense"], name="adapter")
    lora = LoraModel(model, modified_modules=["attention.output.dense"], name="lora")
    perturb(adapter, std=0.2)
    perturb(lora, std=0.2, seed=1)
    expected = outputs(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="AdapterLayer of delta 'adapter' runs before it"):
        lora.merge()
    assert not lora.is_merged and torch.equal(outputs(model, inputs), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Additive layers before it (BitFit, another LoRA) commute: merging is exact.
    model2 = tm.build("bert", "lm")
    bitfit = BitFitModel(model2, modified_modules=["attention.output.dense"], name="bias")
    lora2 = LoraModel(model2, modified_modules=["attention.output.dense"], name="lora")
    perturb(bitfit, std=0.2)
    perturb(lora2, std=0.2, seed=1)
    expected2 = outputs(model2, inputs)
    lora2.merge()
    assert (outputs(model2, inputs) - expected2).abs().max() <= ATOL
    # Once the adapter is detached the LoRA merges, and the adapter comes back after it.
    adapter.detach()
    lora.merge(keep_copy=True)
    adapter.attach()
    lora.unmerge()
    assert torch.equal(outputs(model, inputs), expected)
