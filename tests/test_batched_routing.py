"""Batched routing (opendelta.batched_routing): one batch, up to 64 deltas, every routable
method; outputs and parameter gradients equal running each example alone with its delta.

The per-example reference runs row ``i`` alone (a batch of one) with ``route(name)``, the
uniform path, which runs only that delta's layers through their own ``post_forward`` /
``pre_forward`` (tests/test_routing.py ties that path to "only this delta attached").
Tolerances: float64 1e-12 (relative to the largest value compared): the maths is the same;
float32 1e-6 for outputs (matrix products over a batch and over one row round differently)
and 1e-5 for parameter gradients, which sum over every token of the rows routed to a delta
in another order than the one-by-one reference does.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opendelta
import tiny_models as tm
from helpers import perturb
from matrix_cases import build, methods

#: every routable row of the case table (the equality tests run them all)
ROUTABLE = methods(routable=True)
#: those with batched kernels (others, e.g. BitFit, keep the per-delta path)
BATCHED = [m for m in ROUTABLE if m in ("lora", "adapter", "low_rank_adapter", "compacter", "parallel_adapter")]
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _model(method, arch, k, dtype=torch.float32):
    model = tm.build(arch, "lm", **NO_DROPOUT[arch])
    deltas = [build(method, model, name=f"d{i}") for i in range(k)]
    for i, delta in enumerate(deltas):
        perturb(delta, std=0.1, seed=i)
    return model.to(dtype), deltas


def _routes(k, n):
    """``n`` routes over ``k`` deltas: every delta used, some rows unrouted, rows shuffled."""
    names = [f"d{i % k}" for i in range(n - 2)] + [None, None]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(k)).tolist()
    return [names[i] for i in order]


def _close(a, b, dtype, what, tolerances=TOL):
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tolerances[dtype] * scale, f"{what}: max error {err:.3e} (scale {scale:.2f})"


def _forward_backward(model, inputs, weights, routes):
    with opendelta.route(routes):
        logits = model(**inputs).logits
    (logits * weights).sum().backward()
    return logits.detach()


def _one_by_one(model, inputs, weights, routes):
    out = []
    for i, name in enumerate(routes):
        row = {key: value[i:i + 1] for key, value in inputs.items()}
        out.append(_forward_backward(model, row, weights[i:i + 1], name))
    return torch.cat(out)


def _grads(deltas):
    return {(i, n): (p.grad.clone() if p.grad is not None else None)
            for i, d in enumerate(deltas) for n, p in d.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("arch,k,n", [("bert", 1, 5), ("bert", 3, 9), ("bert", 64, 66), ("gpt2", 1, 5),
                                      ("gpt2", 3, 9)], ids=["bert-K1", "bert-K3", "bert-K64", "gpt2-K1", "gpt2-K3"])
@pytest.mark.parametrize("method", ROUTABLE)
def test_training_outputs_and_gradients_equal_one_by_one(method, arch, k, n, dtype):
    model, deltas = _model(method, arch, k, dtype)
    model.train()
    routes = _routes(k, n)
    inputs = tm.example_inputs(arch, batch=n)
    weights = torch.randn(n, 1, tm.VOCAB, generator=torch.Generator().manual_seed(3), dtype=dtype)

    routed = _forward_backward(model, inputs, weights, routes)
    routed_grads = _grads(deltas)
    model.zero_grad(set_to_none=True)
    reference = _one_by_one(model, inputs, weights, routes)
    reference_grads = _grads(deltas)

    _close(routed, reference, dtype, "logits")
    for key, grad in reference_grads.items():
        assert (grad is None) == (routed_grads[key] is None), key
        if grad is not None:
            _close(routed_grads[key], grad, dtype, f"gradient of delta {key[0]}'s {key[1]}", GRAD_TOL)
    assert any(g is not None and g.abs().sum() > 0 for g in routed_grads.values())


@pytest.mark.parametrize("k,n", [(1, 4), (2, 8), (5, 8), (64, 66)], ids=["K1", "K2", "K5", "K64"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ROUTABLE)
def test_inference_outputs_equal_one_by_one(method, arch, k, n):
    """inference_mode: no gradients, the paths that copy rows straight from the parameters
    (few deltas over many rows: stacked once and indexed; else row by row)."""
    model, _ = _model(method, arch, k, torch.float64)
    routes = _routes(k, n)
    inputs = tm.example_inputs(arch, batch=n)
    with torch.inference_mode():
        with opendelta.route(routes):
            routed = model(**inputs).logits
        reference = []
        for i, name in enumerate(routes):
            with opendelta.route(name):
                reference.append(model(**{key: v[i:i + 1] for key, v in inputs.items()}).logits)
    _close(routed, torch.cat(reference), torch.float64, "logits")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_forward(method, k, rows=64):
    model, _ = _model(method, "bert", k)
    inputs = tm.example_inputs("bert", batch=rows)
    routes = [f"d{i % k}" for i in range(rows)]
    counter = _CountOps()
    with torch.inference_mode(), opendelta.route(routes), counter:
        model(**inputs)
    return counter.count


@pytest.mark.parametrize("method", BATCHED)
def test_the_number_of_tensor_operations_does_not_grow_with_k(method):
    # The same number of operations for 8 or 32 deltas (both "few deltas" for 64 rows), and
    # for 40 or 56 (rows copied one by one): a constant number per module, whatever K.
    assert _ops_per_forward(method, 8) == _ops_per_forward(method, 32)
    assert _ops_per_forward(method, 40) == _ops_per_forward(method, 56)


def _reference(model, inputs, routes):
    out = []
    with torch.no_grad():
        for i, name in enumerate(routes):
            with opendelta.route(name):
                out.append(model(**{key: v[i:i + 1] for key, v in inputs.items()}).logits)
    return torch.cat(out)


def _routed(model, inputs, routes):
    with torch.inference_mode(), opendelta.route(routes):
        return model(**inputs).logits


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-foreach", "adamw-fused", "sgd"])
@pytest.mark.parametrize("method", ["lora", "compacter"])
def test_routed_inference_follows_an_optimizer_step(method, optimizer):
    """Weights are read from the parameters on every call: a step between two routed
    inference calls is seen (fused optimizers do not move version counters)."""
    model, deltas = _model(method, "bert", 4, torch.float64)
    model.train()
    routes = _routes(4, 10)
    inputs = tm.example_inputs("bert", batch=10)
    before = _routed(model, inputs, routes)
    params = [p for d in deltas for p in d.parameters()]
    options = {"adamw": {}, "adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True}}
    opt = (torch.optim.SGD(params, lr=0.5) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=0.05, **options[optimizer]))
    with opendelta.route(routes):
        model(**inputs).logits.square().mean().backward()
    opt.step()
    after = _routed(model, inputs, routes)
    assert (after - before).abs().max() > 1e-8  # the step changed the routed outputs (float64)
    _close(after, _reference(model, inputs, routes), torch.float64, "logits after the step")


@pytest.mark.parametrize("method", BATCHED)
def test_routed_inference_follows_load_state_dict(method):
    model, deltas = _model(method, "bert", 3, torch.float64)
    donor, _ = _model(method, "bert", 3, torch.float64)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.05)
    routes = _routes(3, 8)
    inputs = tm.example_inputs("bert", batch=8)
    before = _routed(model, inputs, routes)
    model.load_state_dict(donor.state_dict())
    after = _routed(model, inputs, routes)
    assert (after - before).abs().max() > 1e-4
    _close(after, _routed(donor, inputs, routes), torch.float64, "logits after load_state_dict")
    _close(after, _reference(model, inputs, routes), torch.float64, "logits after load_state_dict")


def test_layers_opting_out_run_per_delta_with_the_same_result():
    """``batched_routing = False`` (class or instance) sends a layer to the per-delta path."""
    model, deltas = _model("lora", "bert", 4, torch.float64)
    routes = _routes(4, 9)
    inputs = tm.example_inputs("bert", batch=9)
    batched = _routed(model, inputs, routes)
    for _, layer in deltas[1].delta_layers():
        layer.batched_routing = False
    _close(_routed(model, inputs, routes), batched, torch.float64, "logits with an opted-out delta")
    from opendelta.batched_routing import post_batch_key
    from opendelta.methods.lora import LoraLayer

    layers = [layer for _, layer in deltas[1].delta_layers()]
    assert all(post_batch_key(layer) is None for layer in layers)
    assert all(post_batch_key(layer) is not None for _, layer in deltas[0].delta_layers())

    class Variant(LoraLayer):  # overrides the maths without saying it can be batched
        def post_forward(self, host, args, kwargs, output):
            return super().post_forward(host, args, kwargs, output)

    class Declared(Variant):
        batched_routing = True

    variant = copy.deepcopy(deltas[0].delta_layers()[0][1])
    variant.__class__ = Variant
    assert post_batch_key(variant) is None
    variant.__class__ = Declared
    assert post_batch_key(variant) is not None


def test_mixed_kinds_on_one_module_and_deltas_sharing_a_name():
    """LoRA and Adapter deltas of different sizes on the same modules, two deltas named
    alike (one task = their sequence), unrouted rows: several kernels per module."""
    model = tm.build("bert", "lm", **NO_DROPOUT["bert"])
    deltas = [opendelta.LoraModel(model, name="a", modified_modules=["attention.output.dense"]),
              opendelta.AdapterModel(model, name="a", modified_modules=["attention.output.dense"]),
              opendelta.AdapterModel(model, name="b", modified_modules=["attention.output.dense"],
                                     bottleneck_dim=8),
              opendelta.LoraModel(model, name="c", modified_modules=["attention.output.dense"], lora_r=4),
              opendelta.BitFitModel(model, name="c", modified_modules=["attention.output.dense"]),
              opendelta.LoraModel(model, name="d", modified_modules=["attention.output.dense"])]
    for i, delta in enumerate(deltas):
        perturb(delta, std=0.1, seed=i)
    model.double()
    routes = ["a", "b", None, "c", "d", "a", "c", "b", "d"]
    inputs = tm.example_inputs("bert", batch=len(routes))
    _close(_routed(model, inputs, routes), _reference(model, inputs, routes), torch.float64, "logits")
