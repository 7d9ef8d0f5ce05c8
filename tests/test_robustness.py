"""Issue 13, one test per numbered defect: each runs the defect's reproduction, then asserts
the fixed behaviour. Failure cases assert the exception type and message, an unchanged
backbone (parameters, buffers, flags, hooks, state_dict keys, module tree) and an unchanged
directory (:mod:`invariants`). The concurrency defect (10) is in test_threads_distilbert.py.

Tolerances: merged vs unmerged outputs within 1e-4 (fp32 logits of order 1 with updates of
std 0.3); a subtracting unmerge restores weights within a relative error of 1e-6 per
merge/unmerge round trip; with ``keep_copy`` bit for bit.
"""
import json
import os
import re
import warnings

import pytest
import torch
from torch import nn

import tiny_models as tm
from helpers import outputs, perturb
from invariants import assert_same, delta_state, directory_state, model_state
from opendelta import (AdapterModel, AutoDeltaModel, BackboneHashWarning, CheckpointError, LoraModel,
                       save_peft_lora)
from opendelta.core.fields import ChoiceError, ConfigFieldError
from opendelta.io.hashing import gen_model_hash

ATOL = 1e-4


def _max_rel_error(model, reference):
    params = dict(model.named_parameters())
    return max(((params[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in reference.items())


def _backbone_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}


def _tuned(seed, arch="bert", **kwargs):
    model = tm.build(arch, "lm")
    delta = LoraModel(model, **kwargs)
    perturb(delta, std=0.3, seed=seed)
    return model, delta


# ----------------------------------------------------------------------------- 1
WRITES = ["delta.load_state_dict", "load_checkpoint", "load_delta_state_dict", "backbone.load_state_dict",
          "optimizer step"]


@pytest.mark.parametrize("keep_copy", [False, True], ids=["subtract", "keep_copy"])
@pytest.mark.parametrize("write", WRITES)
def test_1_writes_to_a_merged_delta_are_applied_and_detach_restores_the_backbone(tmp_path, write, keep_copy):
    """Before: d.merge(); d.load_checkpoint(other); d.detach() kept the old update in the
    outputs and left the backbone weights off by about 0.5."""
    inputs = tm.example_inputs("bert")
    model = tm.build("bert", "lm")
    base, original = outputs(model, inputs), _backbone_weights(model)
    delta = LoraModel(model)
    perturb(delta, std=0.3, seed=1)
    other_model, other = _tuned(seed=2)
    expected = outputs(other_model, inputs)
    path = other.save_finetuned(tmp_path / "other")

    delta.merge(keep_copy=keep_copy)
    if write == "delta.load_state_dict":
        delta.load_state_dict(other.state_dict())
    elif write == "load_checkpoint":
        delta.load_checkpoint(path)
    elif write == "load_delta_state_dict":
        delta.load_delta_state_dict(other.checkpoint_state_dict())
    elif write == "backbone.load_state_dict":
        model.load_state_dict({k: v for k, v in other_model.state_dict().items() if ".lora." in k}, strict=False)
    else:
        optimizer = torch.optim.SGD(delta.parameters(), lr=1.0)
        for own, theirs in zip(delta.parameters(), other.parameters()):
            own.grad = (own - theirs).detach()  # one step lands exactly on the other's values
        optimizer.step()
        delta.merge()  # a merged delta written to by a step is brought up to date by merge()
    assert delta.is_merged
    assert (outputs(model, inputs) - expected).abs().max() <= ATOL  # the merged weights follow the write

    delta.detach()
    if keep_copy:
        assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
        assert torch.equal(outputs(model, inputs), base)
    else:  # two subtracting round trips (the write re-merged): twice the rounding of one
        assert _max_rel_error(model, original) <= 2e-6
        assert (outputs(model, inputs) - base).abs().max() <= ATOL


def test_1_from_finetuned_onto_a_merged_backbone_then_detach(tmp_path):
    """A second delta loaded onto a backbone holding a merged one; both come out exactly."""
    inputs = tm.example_inputs("bert")
    model = tm.build("bert", "lm")
    base, original = outputs(model, inputs), _backbone_weights(model)
    first = LoraModel(model, name="first")
    perturb(first, std=0.3, seed=1)
    other_model, other = _tuned(seed=2, modified_modules=["query"])
    path = other.save_finetuned(tmp_path / "other")
    first.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneHashWarning)  # the hash describes the backbone itself
        second = LoraModel.from_finetuned(path, model, name="second")
    both = outputs(model, inputs)
    first.unmerge()
    assert (outputs(model, inputs) - both).abs().max() <= ATOL
    first.merge()
    first.detach()
    second.detach()
    assert _max_rel_error(model, original) <= 1e-6
    assert (outputs(model, inputs) - base).abs().max() <= ATOL


def test_1_a_failed_load_into_a_merged_delta_changes_nothing(tmp_path):
    model, delta = _tuned(seed=1)
    delta.merge()
    before, own = model_state(model), delta_state(delta)
    bad = {k: v[..., :1] for k, v in delta.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for .*Nothing was loaded"):
        delta.load_state_dict(bad)
    partial = dict(list(delta.state_dict().items())[:1])
    with pytest.raises(RuntimeError, match=r"missing key\(s\)"):
        delta.load_state_dict({k: torch.zeros_like(v) for k, v in partial.items()})
    assert_same(before, model_state(model), "backbone")
    assert_same(own, delta_state(delta), "delta")


# ----------------------------------------------------------------------------- 2
def test_2_merging_into_a_tied_weight_is_refused():
    """Before: LoraModel(gpt2_lm, modified_modules=["lm_head"]).merge() also changed the input
    embeddings sharing the weight: the logits moved by 34.7."""
    model = tm.build("gpt2", "lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = tm.example_inputs("gpt2")
    delta = LoraModel(model, modified_modules=["lm_head"])
    perturb(delta, std=0.3)
    unmerged = outputs(model, inputs)
    before, own = model_state(model), delta_state(delta)
    message = (r"cannot merge 'lora' into 'lm_head': the tensor it would change is shared by the backbone "
               r"parameters \['transformer.wte.weight', 'lm_head.weight'\] \(tied weights\).*Nothing was merged")
    with pytest.raises(ValueError, match=message):
        delta.merge()
    with pytest.raises(ValueError, match=message):
        delta.merge_and_detach()
    assert_same(before, model_state(model), "backbone")
    assert_same(own, delta_state(delta), "delta")
    assert torch.equal(outputs(model, inputs), unmerged)

    # Untied, the same delta merges and leaves the embeddings alone.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    embeddings = model.transformer.wte.weight.detach().clone()
    delta.merge()
    assert torch.equal(model.transformer.wte.weight, embeddings)
    assert (outputs(model, inputs) - unmerged).abs().max() <= ATOL


# ----------------------------------------------------------------------------- 3
@pytest.mark.parametrize("layout", ["opendelta", "original (no save id)"])
def test_3_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, layout):
    """Before: a failing config.json rename left new weights next to the old config; without a
    save id, new weights (alpha 32) loaded silently with the old config (alpha 16)."""
    inputs = tm.example_inputs("bert")
    model, delta = _tuned(seed=1, lora_alpha=16)
    kwargs = {"save_function": torch.save} if layout != "opendelta" else {}
    path = delta.save_finetuned(tmp_path / "ckpt", **kwargs)
    saved = outputs(model, inputs)
    before = directory_state(path)
    newer_model, newer = _tuned(seed=2, lora_alpha=32)

    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    committed = 0
    for fail_at in range(1, 8):
        calls.update(n=0, fail_at=fail_at)
        try:
            newer.save_finetuned(path, **kwargs)
        except OSError as err:
            assert err.errno == 28 and "No space left" in str(err)
            assert directory_state(path) == before  # files and parent, no leftover
        else:
            committed = fail_at
            break
    monkeypatch.undo()
    assert committed >= 2  # at least the commit rename and the switch could each fail
    fresh = tm.build("bert", "lm")
    loaded = LoraModel.from_finetuned(path, fresh)
    assert loaded.config.lora_alpha == 32 and torch.equal(outputs(fresh, inputs), outputs(newer_model, inputs))
    assert not torch.equal(saved, outputs(fresh, inputs))


# ----------------------------------------------------------------------------- 4
def test_4_one_format_per_directory(tmp_path):
    """Before: a PEFT export into a save_finetuned directory left both, and from_finetuned
    silently returned the older delta."""
    inputs = tm.example_inputs("bert")
    old_model, old = _tuned(seed=1, modified_modules=["query", "value"])
    new_model, new = _tuned(seed=2, modified_modules=["query", "value"])
    path = old.save_finetuned(tmp_path / "ckpt")
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("notes")
    save_peft_lora(new, path)  # the rule: a save replaces every checkpoint file of the directory
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh = tm.build("bert", "lm")
    AutoDeltaModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), outputs(new_model, inputs))
    old.save_finetuned(path)  # and back: the PEFT files go
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]

    # Two formats written by other means (files copied by hand): refused, nothing changed.
    peft_dir = save_peft_lora(new, tmp_path / "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(peft_dir, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    fresh = tm.build("bert", "lm")
    before_dir, before = directory_state(path), model_state(fresh)
    message = (r"holds checkpoints of 2 formats \(opendelta \(config.json \+ model.safetensors\): "
               r"model.safetensors; PEFT adapter .*: adapter_config.json, adapter_model.safetensors\)")
    for load in (lambda: AutoDeltaModel.from_finetuned(path, fresh), lambda: LoraModel.from_finetuned(path, fresh)):
        with pytest.raises(CheckpointError, match=message):
            load()
    assert_same(before, model_state(fresh), "backbone")
    assert directory_state(path) == before_dir


# ----------------------------------------------------------------------------- 5
@pytest.mark.parametrize("keep_copy", [False, True])
def test_5_saving_while_merged_records_the_backbone_hash(tmp_path, keep_copy):
    """Before: the hash of backbone + merged delta was saved; a fresh, correct backbone then
    warned BackboneHashWarning and strict_hash=True refused it."""
    inputs = tm.example_inputs("bert")
    model, delta = _tuned(seed=1)
    unmerged_hash = gen_model_hash(model)
    assert unmerged_hash == gen_model_hash(tm.build("bert", "lm"))
    expected = outputs(model, inputs)
    delta.merge(keep_copy=keep_copy)
    assert gen_model_hash(model) == unmerged_hash
    path = delta.save_finetuned(tmp_path / "ckpt")
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["backbone_hash"] == unmerged_hash
    fresh = tm.build("bert", "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneHashWarning)
        LoraModel.from_finetuned(path, fresh, strict_hash=True)
    assert (outputs(fresh, inputs) - expected).abs().max() <= ATOL
    # Two deltas merged into the same weights: the hash holds while either is merged, the
    # first out being the last merged (copies restore) or not (subtraction).
    second = LoraModel(model, name="second")
    perturb(second, std=0.3, seed=3)
    second.merge(keep_copy=keep_copy)
    assert gen_model_hash(model) == unmerged_hash
    first_out, last_out = (second, delta) if keep_copy else (delta, second)
    first_out.unmerge()
    assert gen_model_hash(model) == unmerged_hash
    last_out.unmerge()
    if keep_copy:  # in reverse order with copies: the weights themselves are back, bit for bit
        assert gen_model_hash(model) == unmerged_hash


# ----------------------------------------------------------------------------- 6
def test_6_freeze_module_with_a_bad_key_changes_nothing():
    """Before: exclude=["deltas", "classifer"] changed requires_grad before raising, and
    exclude="fc2" froze everything and complained about ['f', 'c', '2']."""
    model = tm.build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query"])
    before = model_state(model)
    for exclude, key in ((["deltas", "classifer"], "classifer"), ("fc2", "fc2"), (["[r](unclosed"], None)):
        if key is None:
            match = r"exclude entry '\[r\]\(unclosed' is not a valid regular expression"
        else:
            match = rf"freeze_module exclude entries \['{key}'\] match no module or parameter \(nothing was frozen\)"
        with pytest.raises(ValueError, match=match):
            delta.freeze_module(exclude=exclude)
        assert_same(before, model_state(model), f"backbone after exclude={exclude!r}")
    delta.freeze_module(exclude="classifier")  # a bare string is one key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


# ----------------------------------------------------------------------------- 7
def test_7_a_failed_attach_is_not_half_applied():
    """Before: old.detach(); LoraModel(m, modified_modules=["value"]); old.attach() raised, yet
    old's query layer stayed attached while is_attached was False."""
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    old = LoraModel(model)  # query and value
    perturb(old, std=0.3)
    old.detach()
    new = LoraModel(model, modified_modules=["value"])
    before, own = model_state(model), delta_state(old)
    with pytest.raises(ValueError, match=r"cannot attach 'lora': 'bert.encoder.layer.0.attention.self.value' "
                                         r"now has another child named 'lora' .*Nothing was attached"):
        old.attach()
    assert_same(before, model_state(model), "backbone")
    assert_same(own, delta_state(old), "delta")
    assert not old.is_attached
    assert not any(layer is e.layer for e in old.layer_entries() for _, layer in model.named_modules())
    old.detach()  # harmless
    new.detach()
    old.attach()
    with_old = outputs(model, inputs)
    old.detach()
    assert not torch.equal(with_old, outputs(model, inputs))


# ----------------------------------------------------------------------------- 8
CONSTRUCTOR_CASES = [
    # (class name, field, value, message regex)
    ("LoraModel", "lora_r", True, r"LoraConfig.lora_r must be a positive integer, got True \(bool\); a bool is not"),
    ("AdapterModel", "bottleneck_dim", True, r"AdapterConfig.bottleneck_dim must be a positive integer, got True"),
    ("LowRankAdapterModel", "low_rank_rank", True, r"low_rank_rank must be a positive integer, got True"),
    ("LowRankAdapterModel", "reduction_factor", True, r"reduction_factor must be a positive integer, got True"),
    ("SoftPromptModel", "soft_token_num", True, r"soft_token_num must be a positive integer, got True"),
    ("LoraModel", "lora_alpha", float("nan"), r"LoraConfig.lora_alpha must be a finite number, got nan"),
    ("LoraModel", "lora_alpha", float("inf"), r"LoraConfig.lora_alpha must be a finite number, got inf"),
    ("LoraModel", "lora_alpha", "16", r"LoraConfig.lora_alpha must be a finite number, got '16' \(str\)"),
    ("LoraModel", "lora_dropout", "0.1", r"lora_dropout must be in \[0, 1\) \(a finite number\), got '0.1' \(str\)"),
    ("SoftPromptModel", "init_range", float("nan"), r"SoftPromptConfig.init_range must be in \[0, inf\]"
                                                    r" \(a finite number\), got nan"),
]


@pytest.mark.parametrize("cls_name, field, value, message", CONSTRUCTOR_CASES,
                         ids=[f"{c[1]}={c[2]!r}" for c in CONSTRUCTOR_CASES])
def test_8_constructor_arguments_are_validated_naming_the_field(cls_name, field, value, message):
    import opendelta

    model = tm.build("bert", "lm")
    before = model_state(model)
    with pytest.raises(ConfigFieldError, match=message) as caught:
        getattr(opendelta, cls_name)(model, **{field: value})
    assert type(caught.value) is ConfigFieldError and (caught.value.field, caught.value.value is value) == (field, True)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TypeError)
    assert_same(before, model_state(model), "backbone")


FILE_CASES = [
    ({"lora_r": True}, r"LoraConfig.lora_r must be a positive integer, got True"),
    ({"lora_alpha": float("nan")}, r"LoraConfig.lora_alpha must be a finite number, got nan"),
    ({"lora_dropout": "0.1"}, r"lora_dropout must be in \[0, 1\) \(a finite number\), got '0.1' \(str\)"),
    ({"modified_modules": 5}, r"modified_modules must be a list of strings or None, got 5 \(int\)"),
    ({"modified_modules": [5]}, r"modified_modules\[0\] must be a string, got 5 \(int\)"),
    ({"exclude_modules": "lm_head"}, r"exclude_modules must be a list of strings or None, got 'lm_head' \(str\); "
                                     r"a bare string is not a list: write \['lm_head'\]"),
    ({"common_structure": "yes"}, r"common_structure must be True or False or None, got 'yes' \(str\)"),
]


@pytest.mark.parametrize("change, message", FILE_CASES, ids=[json.dumps(c[0]) for c in FILE_CASES])
def test_8_config_json_fields_are_validated_naming_the_field(tmp_path, change, message):
    _, delta = _tuned(seed=1, modified_modules=["query"])
    path = delta.save_finetuned(tmp_path / "ckpt")
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        data = json.load(f)
    data.update(change)
    with open(config_file, "w") as f:
        f.write(json.dumps(data))  # NaN written as the JSON extension json.load reads back
    fresh = tm.build("bert", "lm")
    before, files = model_state(fresh), directory_state(path)
    with pytest.raises(CheckpointError, match=re.escape(config_file) + ".*" + message):
        LoraModel.from_finetuned(path, fresh)
    assert_same(before, model_state(fresh), "backbone")
    assert directory_state(path) == files


def test_8_unknown_names_are_a_choice_error():
    with pytest.raises(ChoiceError, match=r"unknown non_linearity 'bogus': AdapterConfig.non_linearity must be "
                                          r"one of \[.*'gelu_new'.*\] \(case-insensitive\)"):
        AdapterModel(tm.build("bert", "lm"), non_linearity="bogus")


# ----------------------------------------------------------------------------- 9
def test_9_invalid_regular_expressions_and_unknown_architectures_are_value_errors():
    """Before: "[r](unclosed" raised re.error without naming the key; default targets on an
    unknown architecture raised KeyError."""
    model = tm.build("bert", "lm")
    before = model_state(model)
    for field in ("modified_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=rf"{field} entry '\[r\]\(unclosed' is not a valid regular expression"):
            LoraModel(model, **{field: ["[r](unclosed"]})
        assert_same(before, model_state(model), "backbone")
    delta = LoraModel(model, modified_modules=["query"])
    frozen = model_state(model)
    with pytest.raises(ValueError, match=r"exclude entry '\[r\]\(unclosed' is not a valid regular expression"):
        delta.freeze_module(exclude=["[r](unclosed"])
    assert_same(frozen, model_state(model), "backbone")

    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = model_state(plain)
    with pytest.raises(ValueError, match=r"LoraModel: no common structure map for architecture 'Sequential'.*"
                                         r"Pass modified_modules with the model's own module names"):
        LoraModel(plain)
    assert_same(before, model_state(plain), "module")
    assert len(LoraModel(plain, modified_modules=["0"]).layer_entries()) == 1
