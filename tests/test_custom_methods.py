"""Delta methods written the way the OpenDelta manual documents (1.14.2 / 1.20.2): a
DeltaBase subclass whose __init__ calls DeltaBase.__init__ and add_all_delta_to_backbone,
and whose update_module uses find_module plus one of the three operations. Each gets the
library's whole lifecycle: freeze and gradients, trainable-only state_dict, exact
detach/attach, composition with a built-in delta, deepcopy, save/load through the class."""
import copy
import io
import pytest
import torch
from torch import nn

import tiny_models as tm
from helpers import outputs
from opendelta import BaseDeltaConfig, DeltaBase, LoraModel
from opendelta.core.extension import ReplacementLayer
from opendelta.utils.signature import get_arg_names_inside_func


def _store_arguments(obj, local_values):
    """The manual's pattern: keep each argument of __init__ as an attribute."""
    for name in get_arg_names_inside_func(obj.__init__):
        if not hasattr(obj, name):
            setattr(obj, name, local_values[name])


# --------------------------------------------------------------------------- 1. sequential
class ScaleShiftConfig(BaseDeltaConfig):
    def __init__(self, init_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        _store_arguments(self, locals())


class ScaleShift(nn.Module):
    """Rescales and shifts a Linear's input (pre_forward) and scales its output (post_forward)."""

    def __init__(self, in_features, out_features, init_scale):
        super().__init__()
        self.scale = nn.Parameter(torch.full((in_features,), float(init_scale)))
        self.shift = nn.Parameter(torch.zeros(in_features))
        self.out_scale = nn.Parameter(torch.ones(out_features))

    def pre_forward(self, *args, **kwargs):
        return (args[0] * self.scale + self.shift, *args[1:]), kwargs

    def post_forward(self, output):
        return output * self.out_scale


class ScaleShiftModel(DeltaBase):
    config_class = ScaleShiftConfig
    delta_type = "scale_shift"
    default_modified_modules = ["output.dense"]  # plain names, as in the original

    def __init__(self, backbone_model, init_scale=1.0, modified_modules=None, exclude_modules=None,
                 unfrozen_modules=None, common_structure=False, interactive_modify=False):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules,
                           exclude_modules=exclude_modules, unfrozen_modules=unfrozen_modules,
                           common_structure=common_structure, interactive_modify=interactive_modify)
        _store_arguments(self, locals())
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        _, _, ref = self.find_module(module, key)
        layer = ScaleShift(ref.in_features, ref.out_features, self.init_scale)
        self.insert_sequential_module(ref, delta_module=layer, delta_name="scale_shift")


# --------------------------------------------------------------------------- 2. parallel
class LowRankBranchConfig(BaseDeltaConfig):
    def __init__(self, rank=2, **kwargs):
        super().__init__(**kwargs)
        _store_arguments(self, locals())


class LowRankBranch(nn.Module):
    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states, *args, **kwargs):
        return self.up(self.down(hidden_states))


def _sizes(module):
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # GPT-2's Conv1D: [in, out]


class LowRankBranchModel(DeltaBase):
    config_class = LowRankBranchConfig
    delta_type = "low_rank_branch"
    default_modified_modules = ["attn@.q@", "attn@.v@", "attn@.qkv@"]  # '@': common names

    def __init__(self, backbone_model, rank=2, modified_modules=None, exclude_modules=None,
                 unfrozen_modules=None, common_structure=False, interactive_modify=False):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules,
                           exclude_modules=exclude_modules, unfrozen_modules=unfrozen_modules,
                           common_structure=common_structure, interactive_modify=interactive_modify)
        _store_arguments(self, locals())
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        _, _, ref = self.find_module(module, key)
        self.insert_parallel_module(ref, delta_module=LowRankBranch(*_sizes(ref), self.rank),
                                    delta_name="low_rank_branch")


# --------------------------------------------------------------------------- 3. replacement
class GatedConfig(BaseDeltaConfig):
    def __init__(self, gate_init=0.0, **kwargs):
        super().__init__(**kwargs)
        _store_arguments(self, locals())


class GatedLinear(nn.Module):
    """Wraps the original Linear: ``linear(x) + tanh(gate) * linear(x)``."""

    def __init__(self, original, gate_init):
        super().__init__()
        self.original = original
        self.gate = nn.Parameter(torch.full((original.out_features,), float(gate_init)))

    def forward(self, x):
        y = self.original(x)
        return y + torch.tanh(self.gate) * y


class GatedModel(DeltaBase):
    config_class = GatedConfig
    delta_type = "gated"
    default_modified_modules = ["intermediate.dense"]

    def __init__(self, backbone_model, gate_init=0.0, modified_modules=None, exclude_modules=None,
                 unfrozen_modules=None, common_structure=False, interactive_modify=False):
        DeltaBase.__init__(self, backbone_model, modified_modules=modified_modules,
                           exclude_modules=exclude_modules, unfrozen_modules=unfrozen_modules,
                           common_structure=common_structure, interactive_modify=interactive_modify)
        _store_arguments(self, locals())
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def update_module(self, module, key):
        parent, child_name, child = self.find_module(module, key)
        self.replace_module(parent, child_name, child, GatedLinear(child, self.gate_init), delta_name="gated")


# --------------------------------------------------------------------------- the lifecycle
CASES = {
    "sequential-bert": (ScaleShiftModel, "bert", {"init_scale": 1.5}, "attention.output.dense"),
    "parallel-bert": (LowRankBranchModel, "bert", {"rank": 3}, "attention.self.query"),
    "parallel-gpt2-conv1d": (LowRankBranchModel, "gpt2", {"rank": 3}, "attn.c_attn"),
    "replacement-bert": (GatedModel, "bert", {"gate_init": 0.3}, "intermediate.dense"),
}


def _perturb(delta, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _delta_names(model, delta):
    return {n for n, _ in delta.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_full_lifecycle(tmp_path, case):
    cls, arch, kwargs, target_tail = CASES[case]
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)
    delta = cls(model, **kwargs)
    assert any(e.host_name.endswith(target_tail) or e.child_name == target_tail.rpartition(".")[2]
               for e in delta.layer_entries())

    # Freeze: exactly the user's new parameters train (a replacement keeps the original's frozen).
    delta.freeze_module(exclude=["deltas"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = _delta_names(model, delta) if cls is not GatedModel else {n for n in _delta_names(model, delta)
                                                                     if n.endswith(".gate")}
    assert trainable and trainable == own
    if cls is GatedModel:
        assert all(n.endswith(".gate") for n in trainable)
    assert set(model.state_dict()) == trainable  # trainable-only state_dict
    model(**inputs).logits.pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable

    _perturb(delta)
    tuned = outputs(model, inputs)
    assert not torch.allclose(tuned, base)
    for _ in range(2):
        delta.detach()
        assert torch.equal(outputs(model, inputs), base)
        delta.attach()
        assert torch.equal(outputs(model, inputs), tuned)

    # Composition with a built-in delta on the same modules, and deepcopy.
    lora = LoraModel(model, modified_modules=[target_tail], lora_r=2)
    with torch.no_grad():
        for _, p in lora.named_parameters():
            p.add_(0.05)
    both = outputs(model, inputs)
    assert not torch.allclose(both, tuned)
    twin = copy.deepcopy(model)
    assert torch.equal(outputs(twin, inputs), both)
    lora.detach()
    assert torch.equal(outputs(model, inputs), tuned)

    # Pickling with the backbone.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(outputs(torch.load(buffer, weights_only=False), inputs), tuned)

    # save_finetuned + TheirClass.from_finetuned onto a fresh backbone.
    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = tm.build(arch, "lm")
    loaded = cls.from_finetuned(path, fresh)
    assert type(loaded) is cls
    assert torch.equal(outputs(fresh, inputs), tuned)
    for name in kwargs:
        assert getattr(loaded, name) == kwargs[name]


def test_replacement_detach_puts_back_the_same_object():
    model = tm.build("bert", "lm")
    original = model.bert.encoder.layer[0].intermediate.dense
    delta = GatedModel(model)
    replaced = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(replaced, ReplacementLayer) and replaced is not original
    delta.detach()
    assert model.bert.encoder.layer[0].intermediate.dense is original
    delta.attach()
    assert model.bert.encoder.layer[0].intermediate.dense is replaced


def test_sequential_module_names_and_routing():
    """The user's module keeps its names under the host; routing selects by delta name."""
    import opendelta

    model = tm.build("bert", "lm")
    a = ScaleShiftModel(model)
    names = [n for n, _ in model.named_parameters() if ".scale_shift." in n]
    assert "bert.encoder.layer.0.attention.output.dense.scale_shift.scale" in names
    _perturb(a)
    inputs = tm.example_inputs("bert", batch=2)
    with_delta = outputs(model, inputs)
    a.detach()
    bare = outputs(model, inputs)
    a.attach()
    with opendelta.route(["scale_shift", None]):
        routed = outputs(model, inputs)
    assert torch.allclose(routed[0], with_delta[0], atol=1e-5) and torch.allclose(routed[1], bare[1], atol=1e-5)


def test_user_class_errors_are_clear():
    model = tm.build("bert", "lm")
    delta = ScaleShiftModel(model)
    with pytest.raises(ValueError, match="method must be one of"):
        delta.insert_module(model.cls.predictions.transform.dense, method="diagonal", delta_module=nn.Identity())
    with pytest.raises(ValueError, match="not a module of this delta's backbone"):
        delta.insert_sequential_module(nn.Linear(2, 2), delta_module=ScaleShift(2, 2, 1.0))
    with pytest.raises(TypeError, match="neither pre_forward nor post_forward"):
        delta.insert_sequential_module(model.cls.predictions.transform.dense, delta_module=nn.Identity(),
                                       delta_name="x")
    with pytest.raises(ValueError, match="matches no module"):
        ScaleShiftModel(tm.build("bert", "lm"), modified_modules=["no_such_module"])
    assert delta.find_module(model, "") == (model, "", model)
    with pytest.raises(ValueError, match="no submodule 'bert.nothing'"):
        delta.find_module(model, "bert.nothing.dense")


def test_failed_update_module_leaves_the_backbone_untouched():
    class Failing(ScaleShiftModel):
        calls = 0

        def update_module(self, module, key):
            type(self).calls += 1
            if type(self).calls > 1:
                raise RuntimeError("boom")
            super().update_module(module, key)

    model = tm.build("bert", "lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        Failing(model)
    assert set(model.state_dict()) == set(before)
    assert not any(".scale_shift" in n for n, _ in model.named_modules())
