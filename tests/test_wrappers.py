"""Default targets on user models that wrap known backbones (two-tower retrievers,
multi-encoder models): the scenario of the original library's unittest/user_defined.py
(adapted from Tevatron), every method, towers of five architectures, persistence."""
import pytest
import torch
from torch import nn

import tiny_models as tm
from matrix_cases import TABLE
from opendelta import AutoDeltaConfig, AutoDeltaModel, LoraModel, Visualization
from opendelta.core.dispatch import iter_delta_layers

ARCHS = ["bert", "roberta", "gpt2", "t5", "opt"]


class Mymodel(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = a
        self.b = b


def _wrapper(arch_a, arch_b, seed=0):
    return Mymodel(tm.build(arch_a, "base", seed=seed), tm.build(arch_b, "base", seed=seed + 1)).eval()


def _tower_outputs(model, arch_a, arch_b):
    out = []
    for tower, arch in ((model.a, arch_a), (model.b, arch_b)):
        inputs = tm.example_inputs(arch, "base")
        if arch in tm.ENCODER_DECODER:
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
        with torch.no_grad():
            out.append(tower(**inputs).last_hidden_state)
    return out


def _config(method):
    case = TABLE[method]
    return AutoDeltaConfig.from_dict({"delta_type": case.cls.delta_type, **case.kwargs})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(TABLE))
def test_default_configs_on_a_two_tower_wrapper(tmp_path, method, arch):
    model = _wrapper(arch, arch)
    before = _tower_outputs(model, arch, arch)
    delta = AutoDeltaModel.from_config(_config(method), backbone_model=model)
    hosts = {e.host_name.split(".")[0] for e in delta.layer_entries()}
    assert hosts == {"a", "b"}, "both towers are modified"
    assert delta.config.extra["towers"] == {"a": tm.build(arch, "base").config.model_type,
                                            "b": tm.build(arch, "base").config.model_type}
    params = dict(delta.named_parameters())
    assert any(n.startswith("a.") for n in params) and any(n.startswith("b.") for n in params)
    assert not set(p for n, p in params.items() if n.startswith("a.")) & \
        set(p for n, p in params.items() if n.startswith("b.")), "each tower has its own parameters"

    delta.freeze_module(exclude=["deltas"])
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    tuned = _tower_outputs(model, arch, arch)
    for old, new in zip(before, tuned):
        new = new if new.shape == old.shape else new[:, -old.shape[1]:]
        assert not torch.allclose(old, new), "both towers' outputs change"

    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = _wrapper(arch, arch)
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    assert {e.host_name.split(".")[0] for e in loaded.layer_entries()} == {"a", "b"}
    for expected, got in zip(tuned, _tower_outputs(fresh, arch, arch)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixed_towers_get_their_own_defaults():
    model = _wrapper("bert", "gpt2")
    delta = LoraModel(model)
    hosts = sorted(e.host_name for e in delta.layer_entries())
    assert [h for h in hosts if h.startswith("a.")] == [f"a.encoder.layer.{i}.attention.self.{p}"
                                                       for i in (0, 1) for p in ("query", "value")]
    assert [h for h in hosts if h.startswith("b.")] == ["b.h.0.attn.c_attn", "b.h.1.attn.c_attn"]


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "prefix", "soft_prompt", "parallel_adapter"])
def test_restrict_to_one_tower(method):
    case = TABLE[method]
    for kwargs in ({"modified_modules": ["a"]}, {"exclude_modules": ["b"]}):
        if method == "soft_prompt" and "exclude_modules" in kwargs:
            continue
        model = _wrapper("bert", "gpt2")
        delta = case.cls(model, **case.kwargs, **kwargs)
        assert {e.host_name.split(".")[0] for e in delta.layer_entries()} == {"a"}, kwargs
        assert not list(iter_delta_layers(model.b))


def test_wrapper_without_known_backbone_is_a_clear_value_error():
    model = Mymodel(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match=r"no common structure map.*Mymodel.*known backbone.*modified_modules"):
        LoraModel(model)
    delta = LoraModel(model, modified_modules=["a"])
    assert len(delta.layer_entries()) == 1


def test_visualization_shows_the_towers():
    from opendelta.tools.structure_tree import build_structure

    model = _wrapper("bert", "gpt2")
    LoraModel(model)
    tree = build_structure(model)
    assert sorted(n for child in tree.children for n in child.names) == ["a", "b"]
    vis = Visualization(model)
    vis.structure_graph(printTree=False)
    text = vis.export_text()
    assert "a" in text and "b" in text and "lora" in text
