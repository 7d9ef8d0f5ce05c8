"""Two threads serving one model at once, each routed to its own delta, forced to
interleave inside the forward pass: each gets exactly its single-threaded result.

A forward hook inside the first attention block waits on a barrier, so both threads are in
the middle of the same forward (past the attention's pre-hooks, before its post-hooks) at
the same time. Values that travel between hooks (ParallelAdapter's result) must go through the call,
never through the shared modules."""
import threading

import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import TABLE, build, methods

TIMEOUT = 60


def _waiting_hook(barrier):
    def hook(module, args, output):
        barrier.wait()  # returns None: the output is unchanged
    return hook


def _serve_concurrently(model, barrier_host, jobs):
    """Run ``jobs`` (route name, inputs) in threads that meet at ``barrier_host``'s forward
    hook; returns their outputs in order."""
    barrier = threading.Barrier(len(jobs), timeout=TIMEOUT)
    handle = barrier_host.register_forward_hook(_waiting_hook(barrier))
    results, errors = [None] * len(jobs), []

    def run(i, name, inputs):
        try:
            with opendelta.route(name):
                results[i] = outputs(model, inputs)
        except BaseException as err:  # reported below, with the thread's own traceback
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, name, inputs)) for i, (name, inputs) in enumerate(jobs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        handle.remove()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", methods(routable=True))
def test_two_threads_two_routes_are_isolated(method, arch):
    model = tm.build(arch, "lm")
    for seed, name in enumerate(("a", "b")):
        perturb(build(method, model, name=name), std=0.2, seed=seed)
    inputs_a = tm.example_inputs(arch, seed=1)
    inputs_b = tm.example_inputs(arch, seed=2)
    with opendelta.route("a"):
        expected_a = outputs(model, inputs_a)
    with opendelta.route("b"):
        expected_b = outputs(model, inputs_b)
    assert not torch.allclose(expected_a, expected_b)

    # Inside the first attention block: between a parallel adapter's input and output hooks.
    inner = model.bert.encoder.layer[0].attention.self if arch == "bert" else model.model.layers[0].self_attn.q_proj
    for _ in range(3):
        got_a, got_b = _serve_concurrently(model, inner, [("a", inputs_a), ("b", inputs_b)])
        assert torch.equal(got_a, expected_a)
        assert torch.equal(got_b, expected_b)


@pytest.mark.parametrize("method", list(TABLE))
def test_threads_without_routing_share_the_attached_deltas(method):
    """No routing: both threads run the same delta layers (and still do not mix values)."""
    model = tm.build("bert", "lm")
    perturb(build(method, model), std=0.2)
    inputs = [tm.example_inputs("bert", seed=s) for s in (1, 2)]
    expected = [outputs(model, x) for x in inputs]
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    handle = model.bert.encoder.layer[0].attention.self.register_forward_hook(_waiting_hook(barrier))
    results = [None, None]

    def run(i):
        results[i] = outputs(model, inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        handle.remove()
    assert torch.equal(results[0], expected[0]) and torch.equal(results[1], expected[1])
