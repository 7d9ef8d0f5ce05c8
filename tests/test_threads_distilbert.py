"""Issue 13, defect 10: two serving threads on one DistilBERT, each routed to its own delta,
forced to interleave inside the forward pass, for every method that can be routed there
(LoRA, Adapter, ParallelAdapter, LowRankAdapter, Compacter, BitFit) and Prefix.

Before: two threads running one model with different routes through ParallelAdapter shared
its stored intermediate (one got a RuntimeError, the other a silently wrong result); the
DistilBERT Prefix path did the same.

The interleaving is forced with hooks inside the first attention block: both threads wait at
a barrier before the value projection (past the attention's pre-hooks, the query and key
projections and their deltas' hooks), then the first thread finishes the whole attention
(its post-hooks included) while the second is still held before its value projection.
Each thread's output equals its single-threaded reference, bit for bit.
"""
import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb, serve_interleaved_distilbert
from matrix_cases import build, methods

METHODS = sorted(set(methods(routable=True)) | {"prefix"})


@pytest.mark.parametrize("method", METHODS)
def test_two_threads_two_routes_on_distilbert_are_isolated(method):
    model = tm.build("distilbert", "lm")
    for seed, name in enumerate(("a", "b")):
        perturb(build(method, model, name=name), std=0.3, seed=seed)
    inputs = {"a": tm.example_inputs("distilbert", seed=1),
              "b": tm.example_inputs("distilbert", batch=3, length=5, seed=2)}
    expected = {}
    for route in ("a", "b"):
        with opendelta.route(route):
            expected[route] = outputs(model, inputs[route])
    with opendelta.route("b"):  # the routes really differ on the same inputs
        assert not torch.allclose(outputs(model, inputs["a"]), expected["a"])

    for first, second in (("a", "b"), ("b", "a")):  # either route finishes its attention first
        got = serve_interleaved_distilbert(model, {"first": (first, inputs[first]), "second": (second, inputs[second])})
        assert torch.equal(got["first"], expected[first]), (method, first)
        assert torch.equal(got["second"], expected[second]), (method, second)
