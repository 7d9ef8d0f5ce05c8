"""Hand-sized maths of LowRankAdapter, Compacter, ParallelAdapter and SoftPrompt."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import tiny_models as tm
from opendelta import CompacterModel, LowRankAdapterModel, ParallelAdapterModel, SoftPromptModel
from opendelta.methods.compacter import PHMLinear, kronecker_sum


def gelu_new(v: float) -> float:
    return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


class Block(nn.Module):
    """x -> b(relu(a(x))): two named Linear layers to put deltas on."""

    def __init__(self, d_in=4, d_mid=4, d_out=4):
        super().__init__()
        self.a = nn.Linear(d_in, d_mid)
        self.b = nn.Linear(d_mid, d_out)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def set_(param, values):
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype))


def test_low_rank_adapter_by_hand():
    model = Block()
    set_(model.a.weight, torch.eye(4).tolist())
    set_(model.a.bias, [0.0] * 4)
    delta = LowRankAdapterModel(model, modified_modules=["a"], reduction_factor=2)  # bottleneck 2
    layer = model.a.low_rank_adapter
    set_(layer.down_sampler.W_left, [[1.0], [2.0], [0.0], [-1.0]])
    set_(layer.down_sampler.W_right, [[1.0, -1.0]])
    set_(layer.down_sampler.b, [0.5, 0.0])
    set_(layer.up_sampler.W_left, [[2.0], [3.0]])
    set_(layer.up_sampler.W_right, [[1.0, 0.0, -1.0, 0.5]])
    set_(layer.up_sampler.b, [0.0, 0.0, 0.0, 1.0])
    x = torch.tensor([[1.0, 0.5, 3.0, 2.0]])
    # down weight W_left @ W_right has rows [1,-1], [2,-2], [0,0], [-1,1]:
    # z = x @ W + b = [1 + 1 - 2 + 0.5, -1 - 1 + 2] = [0.5, 0]; act(z) = [g, 0];
    # up weight rows [2,0,-2,1], [3,0,-3,1.5]: up = [2g, 0, -2g, g + 1]; output h + up.
    g = gelu_new(0.5)
    expected = [1 + 2 * g, 0.5, 3 - 2 * g, 2 + g + 1]
    with torch.no_grad():
        assert torch.allclose(model.a(x), torch.tensor([expected]), atol=1e-6)
    assert {n for n, _ in delta.named_parameters()} == {
        f"a.low_rank_adapter.{s}.{p}" for s in ("down_sampler", "up_sampler") for p in ("W_left", "W_right", "b")}


def test_phm_weight_is_a_sum_of_kronecker_products_by_hand():
    # n = 2, in 4, out 2: blocks W_i are [2, 1]; rule_0 = I, rule_1 = [[0, 1], [-1, 0]].
    rule = {"phm_rule": nn.Parameter(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0]]]))}
    w = {"W_left": nn.Parameter(torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])),
         "W_right": nn.Parameter(torch.ones(2, 1, 1))}
    layer = PHMLinear(4, 2, rule, w, bias=True)
    set_(layer.b, [0.5, -0.5])
    # kron(I, [[1],[2]]) + kron([[0,1],[-1,0]], [[3],[4]])
    by_hand = torch.tensor([[1.0, 3.0], [2.0, 4.0], [-3.0, 1.0], [-4.0, 2.0]])
    assert torch.equal(layer.weight(), by_hand)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(layer(x), torch.tensor([[-4.0 + 0.5, 10.0 - 0.5], [1.5, 2.5]]))


def test_compacter_layer_equals_kronecker_formula():
    torch.manual_seed(0)
    model = Block(8, 8, 8)
    CompacterModel(model, modified_modules=["a"], reduction_factor=2, hypercomplex_division=2,
                   phm_rank=2, factorized_phm_rule=True)
    layer = model.a.compactor
    for sampler in (layer.down_sampler, layer.up_sampler):
        rule = sampler.phm_rule_left @ sampler.phm_rule_right            # [2, 2, 2]
        blocks = sampler.W_left @ sampler.W_right                          # [2, in/2, out/2]
        expected = sum(torch.kron(rule[i], blocks[i]) for i in range(2))
        assert torch.allclose(sampler.weight(), expected, atol=1e-7)
        assert torch.allclose(kronecker_sum(rule, blocks), expected, atol=1e-7)
    x = torch.randn(3, 8)
    with torch.no_grad():
        h = model.a.weight @ x.T
        h = h.T + model.a.bias
        z = gelu_tanh(h @ layer.down_sampler.weight() + layer.down_sampler.b)
        expected = h + z @ layer.up_sampler.weight() + layer.up_sampler.b
        assert torch.allclose(model.a(x), expected, atol=1e-6)


def gelu_tanh(t):
    return F.gelu(t, approximate="tanh")


def test_parallel_adapter_adds_scaled_adapter_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    # Across two modules: b's output + 0.5 * adapter(a's input); out size 3 != in size 4.
    model = Block(4, 4, 3)
    with torch.no_grad():
        plain = model(x)
    ParallelAdapterModel(model, modified_modules=["a", "b"], bottleneck_dim=2, non_linearity="relu", scaled=0.5)
    adapter = model.a.parallel_adapter.modulelist
    assert adapter.down_proj.weight.shape == (2, 4) and adapter.up_proj.weight.shape == (3, 2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        by_formula = plain + 0.5 * F.linear(torch.relu(F.linear(x, adapter.down_proj.weight, adapter.down_proj.bias)),
                                            adapter.up_proj.weight, adapter.up_proj.bias)
        assert torch.allclose(model(x), by_formula, atol=1e-6)
    # Around one module: a(x) + adapter(x).
    model = Block(4, 4, 4)
    ParallelAdapterModel(model, modified_modules=["a", "a"], bottleneck_dim=2, non_linearity="relu")
    adapter = model.a.parallel_adapter.modulelist
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        a_out = F.linear(x, model.a.weight, model.a.bias) + adapter.up_proj(torch.relu(adapter.down_proj(x)))
        assert torch.allclose(model(x), model.b(torch.relu(a_out)), atol=1e-6)


def test_soft_prompt_embeddings_come_first():
    model = tm.build("bert", "cls")
    inputs = tm.example_inputs("bert", "cls")
    delta = SoftPromptModel(model, soft_token_num=3, token_init=False, init_range=0.25)
    soft = model.soft_prompt_layer.soft_embeds
    assert soft.shape == (3, tm.HIDDEN) and soft.abs().max() <= 0.25
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    handles = [model.bert.embeddings.register_forward_pre_hook(capture, with_kwargs=True),
               model.bert.register_forward_pre_hook(lambda m, a, k: seen.update(mask=k["attention_mask"]),
                                                   with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    embeds = seen["inputs_embeds"]
    assert seen["input_ids"] is None and embeds.shape == (2, 3 + 7, tm.HIDDEN)
    assert torch.equal(embeds[0, :3], soft) and torch.equal(embeds[1, :3], soft)
    assert torch.equal(embeds[:, 3:], model.bert.embeddings.word_embeddings(inputs["input_ids"]))
    assert torch.equal(seen["mask"], torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], 1))
    assert [n for n, _ in delta.named_parameters()] == ["soft_prompt_layer.soft_embeds"]
