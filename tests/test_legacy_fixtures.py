"""Checkpoints written by the original OpenDelta 0.3.2 load and reproduce its logits.

The fixtures live in ../shared/fixtures/opendelta-0.3.2 (see its README.md); every case of
its manifest is a test. Cases of methods not registered yet fail with "unknown delta_type".
"""
import collections
import json
import os
import warnings

import pytest
import torch

from opendelta import AutoDeltaModel, BitFitModel
from opendelta.io.files import BackboneHashWarning, CheckpointError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "..", "shared", "fixtures", "opendelta-0.3.2")


def manifest_cases():
    path = os.path.join(FIXTURES, "manifest.json")
    if not os.path.isfile(path):
        return [pytest.param(None, None, id="fixtures-absent")]
    manifest = json.load(open(path))
    return [pytest.param(arch, case, id=f"{arch['arch']}-{case['case']}")
            for arch in manifest["archs"] for case in arch["cases"]]


def load_backbone(fixtures_dir, arch):
    import transformers

    cls = getattr(transformers, arch["backbone_class"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(os.path.join(fixtures_dir, arch["backbone_dir"]))
    return model.eval()


def read_tensors(fixtures_dir, relative):
    from safetensors.torch import load_file

    return load_file(os.path.join(fixtures_dir, relative))


@pytest.mark.parametrize("arch,case", manifest_cases())
def test_original_checkpoint_reproduces_its_logits(fixtures_dir, arch, case):
    atol = json.load(open(os.path.join(fixtures_dir, "manifest.json")))["atol"]
    model = load_backbone(fixtures_dir, arch)
    inputs = read_tensors(fixtures_dir, arch["inputs"])
    with torch.no_grad():
        base = model(**inputs, **arch["forward_kwargs"]).logits
    assert torch.allclose(base, read_tensors(fixtures_dir, arch["base_logits"])["logits"], atol=atol)

    model.train()
    with warnings.catch_warnings():
        # The original's md5 backbone_hash is another recipe: it must not be compared.
        warnings.simplefilter("error", BackboneHashWarning)
        delta = AutoDeltaModel.from_finetuned(os.path.join(fixtures_dir, case["delta_dir"]),
                                              backbone_model=model)
    assert not model.training
    assert delta.delta_type == case["delta_type"]
    with torch.no_grad():
        logits = model(**inputs, **arch["forward_kwargs"]).logits
    expected = read_tensors(fixtures_dir, case["expected_logits"])["logits"]
    assert list(logits.shape) == case["logits_shape"]
    assert not torch.allclose(expected, base, atol=1e-3)  # the delta has a visible effect
    assert (logits - expected).abs().max().item() <= atol

    # The head the original trained stays trainable when training goes on.
    delta.freeze_module()
    head = {k for k in saved_keys(fixtures_dir, case) if k.startswith("classifier.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in delta.named_parameters()} | head

    # Every tensor of the checkpoint found its place: the trained head is the one saved.
    saved = torch.load(os.path.join(fixtures_dir, case["delta_dir"], "pytorch_model.bin"), weights_only=True)
    for name in arch["trainable_head"]:
        for key, value in saved.items():
            if key.startswith(name + "."):
                assert torch.equal(model.get_parameter(key), value), key


def saved_keys(fixtures_dir, case):
    return list(torch.load(os.path.join(fixtures_dir, case["delta_dir"], "pytorch_model.bin"), weights_only=True))


def _bitfit_case(fixtures_dir):
    manifest = json.load(open(os.path.join(fixtures_dir, "manifest.json")))
    for arch in manifest["archs"]:
        for case in arch["cases"]:
            if case["delta_type"] == "bitfit":
                return arch, case
    pytest.skip("no BitFit case in the fixtures")


def test_bitfit_biases_become_deltas(fixtures_dir):
    """The original trained biases in place; ours holds ``b' - b`` in a bias delta."""
    arch, case = _bitfit_case(fixtures_dir)
    model = load_backbone(fixtures_dir, arch)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = AutoDeltaModel.from_finetuned(os.path.join(fixtures_dir, case["delta_dir"]), backbone_model=model)
    assert isinstance(delta, BitFitModel)
    saved = torch.load(os.path.join(fixtures_dir, case["delta_dir"], "pytorch_model.bin"), weights_only=True)
    deltas = dict(delta.named_parameters())
    converted = 0
    for key, value in saved.items():
        host, _, leaf = key.rpartition(".")
        name = f"{host}.bitfit.{leaf}"
        if name in deltas:
            assert torch.allclose(original[key] + deltas[name], value, atol=1e-6, rtol=0)
            converted += 1
    assert converted == sum(1 for k in saved if not k.startswith("classifier."))
    # The backbone's own biases are untouched: detaching gives the original backbone back.
    delta.detach()
    for n, p in model.named_parameters():
        if not n.startswith("classifier."):
            assert torch.equal(p, original[n]), n


def test_legacy_default_targets_that_match_nothing_are_dropped(fixtures_dir):
    """The original saved its whole default list (``lm_head@.proj@`` on a classifier)."""
    arch, case = _bitfit_case(fixtures_dir)
    config = json.load(open(os.path.join(fixtures_dir, case["delta_dir"], "config.json")))
    assert "lm_head@.proj@" in config["modified_modules"]
    from opendelta.io.legacy import upgrade_legacy_config

    upgraded = upgrade_legacy_config(config, load_backbone(fixtures_dir, arch))
    assert "lm_head@.proj@" not in upgraded["modified_modules"]
    assert set(upgraded["modified_modules"]) == set(config["modified_modules"]) - {"lm_head@.proj@"}


class Payload:
    """Not a tensor: a ``weights_only`` load must refuse to build it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_legacy_weights_are_read_with_weights_only(tmp_path, fixtures_dir):
    arch, case = _bitfit_case(fixtures_dir)
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "config.json").write_text(
        open(os.path.join(fixtures_dir, case["delta_dir"], "config.json")).read())
    torch.save(collections.OrderedDict(x=Payload()), directory / "pytorch_model.bin")
    model = load_backbone(fixtures_dir, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"pytorch_model\.bin cannot be read with torch\.load\(weights_only=True\)"
    with pytest.raises(CheckpointError, match=message):
        AutoDeltaModel.from_finetuned(directory, backbone_model=model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_original_gpt2_bitfit_checkpoint_reproduces_its_outputs(tmp_path):
    """A checkpoint as OpenDelta 0.3.2 writes it for GPT-2 BitFit: its default targets
    (``lm_head@.proj@`` overlapping ``exclude_modules: ["lm_head"]``), the trained biases
    under the backbone's own names in pytorch_model.bin. It loads and gives the outputs of
    the backbone with those biases."""
    import tiny_models as tm

    tuned = tm.build("gpt2", "lm")
    state = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith(".bias") and ".h." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
                state[name] = param.detach().clone()
    inputs = tm.example_inputs("gpt2")
    with torch.no_grad():
        expected = tuned(**inputs).logits
    directory = tmp_path / "original"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({
        "delta_type": "bitfit", "opendelta_version": "0.3.2", "backbone_class": "GPT2LMHeadModel",
        "modified_modules": ["attn@", "ff@", "layer_norm@", "lm_head@.proj@"],
        "exclude_modules": ["lm_head"], "unfrozen_modules": ["deltas"], "common_structure": True,
        "backbone_hash": "d41d8cd98f00b204e9800998ecf8427e"}))
    fresh = tm.build("gpt2", "lm")
    delta = AutoDeltaModel.from_finetuned(str(directory), fresh)
    assert isinstance(delta, BitFitModel)
    with torch.no_grad():
        got = fresh(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
