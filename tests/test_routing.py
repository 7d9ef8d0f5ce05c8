"""Per-example routing: one batch, a different delta (or none) per row.

Equivalence: the routed batch gives, row by row, the outputs and the parameter gradients of
running each example alone with only its delta attached (tolerance 1e-5 absolute on fp32
logits and gradients: the batched and single-row matrix products round differently).
"""
import copy
import pickle
import threading

import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import build, methods
from opendelta import AdapterModel, LoraModel
from opendelta.core.dispatch import ROUTING_SWITCH
from opendelta.route import current_routes

ATOL = 1e-5


#: every routable row of the case table
METHODS = methods(routable=True)
ROUTES = ["a", None, "b", "a", "c"]  # "c" is attached but used by one row; "d" by none


def _build(method, arch):
    model = tm.build(arch, "lm")
    deltas = {}
    for seed, name in enumerate("abcd"):
        deltas[name] = build(method, model, name=name)
        perturb(deltas[name], std=0.1, seed=seed)
    return model, deltas


def _loss(logits, weights):
    return (logits.float() * weights).sum()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_routed_batch_equals_one_by_one(method, arch):
    model, deltas = _build(method, arch)
    inputs = tm.example_inputs(arch, batch=len(ROUTES))
    vocab_weights = torch.randn(len(ROUTES), 1, tm.VOCAB, generator=torch.Generator().manual_seed(3))

    with opendelta.route(ROUTES) as routing:
        logits = model(**inputs).logits
        _loss(logits, vocab_weights).backward()
    assert routing.matched == {"a", "b", "c"}
    routed_grads = {(k, n): p.grad.clone() for k, d in deltas.items() if k != "d"
                    for n, p in d.named_parameters()}
    # Gradients reach only the deltas the rows used; an unused delta is not in the graph.
    assert all(p.grad is None for _, p in deltas["d"].named_parameters())
    assert all(g.abs().sum() > 0 for g in routed_grads.values())
    model.zero_grad(set_to_none=True)

    # Reference: each example alone, with only its delta attached; grads accumulate.
    for d in deltas.values():
        d.detach()
    reference = []
    for i, name in enumerate(ROUTES):
        if name is not None:
            deltas[name].attach()
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        out = model(**row).logits
        _loss(out, vocab_weights[i:i + 1]).backward()
        reference.append(out.detach())
        if name is not None:
            deltas[name].detach()
    for d in deltas.values():
        d.attach()

    assert (logits.detach() - torch.cat(reference)).abs().max() <= ATOL
    for (k, n), g in routed_grads.items():
        p = dict(deltas[k].named_parameters())[n]
        assert (p.grad - g).abs().max() <= ATOL, (k, n)
    assert all(p.grad is None for _, p in deltas["d"].named_parameters())


def test_routing_in_training_mode_and_uniform_routes():
    model, deltas = _build("lora", "bert")
    inputs = tm.example_inputs("bert", batch=3)
    base_routes = [None, None, None]
    for d in deltas.values():
        d.detach()
    bare = outputs(model, inputs)
    deltas["b"].attach()
    only_b = outputs(model, inputs)
    for name in "acd":
        deltas[name].attach()

    with opendelta.route(base_routes):
        assert torch.equal(outputs(model, inputs), bare)
    with opendelta.route("b"):  # one name for the whole batch: nothing is sliced
        assert torch.equal(outputs(model, inputs), only_b)
    with opendelta.route(["b", "b", "b"]):
        assert torch.equal(outputs(model, inputs), only_b)

    model.train()
    with opendelta.route(["a", "b", "a"]):
        model(**inputs).logits.sum().backward()
    grads = {k: any(p.grad is not None for _, p in d.named_parameters()) for k, d in deltas.items()}
    assert grads == {"a": True, "b": True, "c": False, "d": False}


def test_route_errors():
    model, deltas = _build("lora", "bert")
    inputs = tm.example_inputs("bert", batch=2)
    with pytest.raises(ValueError, match="3 routes but .* shape \\(2, 7"):
        with opendelta.route(["a", "b", "c"]):
            outputs(model, inputs)
    with pytest.raises(ValueError, match="route names \\['typo'\\] matched no attached delta"):
        with opendelta.route(["a", "typo"]):
            outputs(model, inputs)
    with pytest.raises(ValueError, match="match no delta attached"):
        with opendelta.route(["a", "typo"], model=model):
            pass
    with pytest.raises(TypeError, match="delta names"):
        opendelta.route([1, 2]).__enter__()
    with pytest.raises(ValueError, match="empty"):
        opendelta.route([]).__enter__()
    # A layer that cannot run on a subset of rows (Prefix, SoftPrompt) refuses clearly.
    layer = deltas["b"].delta_layers()[0][1]
    layer.supports_routing = False
    with pytest.raises(ValueError, match="cannot run on a subset of the batch"):
        with opendelta.route(["a", "b"]):
            outputs(model, inputs)
    with opendelta.route("b"):  # whole batch: allowed
        outputs(model, inputs)
    assert current_routes() is None
    assert ROUTING_SWITCH.open_blocks == 0  # every block closed, errors included


def test_nested_routes_and_threads():
    model, _ = _build("lora", "bert")
    seen = {}
    with opendelta.route(["a", "b"]):
        with opendelta.route(["c", None]):
            assert current_routes() == ("c", None)
        assert current_routes() == ("a", "b")
        thread = threading.Thread(target=lambda: seen.setdefault("routes", current_routes()))
        thread.start()
        thread.join()
    assert seen["routes"] is None  # a ContextVar: other threads do not inherit the routing
    assert current_routes() is None and ROUTING_SWITCH.open_blocks == 0


def test_delta_names_survive_copy_and_pickle():
    model, _ = _build("lora", "bert")
    inputs = tm.example_inputs("bert", batch=2)
    with opendelta.route(["a", "c"]):
        expected = outputs(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with opendelta.route(["a", "c"]):
            assert torch.equal(outputs(clone, inputs), expected)


def test_routing_mixed_methods_sharing_a_name():
    """Deltas sharing a name form one task: a LoRA and an Adapter both named "t"."""
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert", batch=2)
    lora, adapter = LoraModel(model, name="t"), AdapterModel(model, name="t")
    other = LoraModel(model, name="u")
    for seed, d in enumerate((lora, adapter, other)):
        perturb(d, seed=seed)
    other.detach()
    task = outputs(model, inputs)
    other.attach()
    with opendelta.route(["t", None]):
        out = outputs(model, inputs)
    for d in (lora, adapter, other):
        d.detach()
    bare = outputs(model, inputs)
    assert (out[0] - task[0]).abs().max() <= ATOL
    assert (out[1] - bare[1]).abs().max() <= ATOL
