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
import threading

import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import build, methods

TIMEOUT = 30
METHODS = sorted(set(methods(routable=True)) | {"prefix"})


def _serve(model, jobs):
    """Run ``jobs`` ({thread name: (route, inputs)}) concurrently, interleaved as described
    in the module docstring; returns {thread name: output}."""
    attention = model.distilbert.transformer.layer[0].attention
    barrier, first_done = threading.Barrier(len(jobs), timeout=TIMEOUT), threading.Event()

    def before_value_projection(module, args):
        barrier.wait()
        if threading.current_thread().name != "first" and not first_done.wait(TIMEOUT):
            raise TimeoutError("the first thread did not finish its attention")

    def after_attention(module, args, output):
        if threading.current_thread().name == "first":
            first_done.set()

    handles = [attention.v_lin.register_forward_pre_hook(before_value_projection),
               attention.register_forward_hook(after_attention)]
    results, errors = {}, []

    def run(name, route, inputs):
        try:
            with opendelta.route(route):
                results[name] = outputs(model, inputs)
        except BaseException as err:  # re-raised below with its own traceback
            errors.append(err)
            barrier.abort()
            first_done.set()

    threads = [threading.Thread(target=run, args=(name, *job), name=name) for name, job in jobs.items()]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(2 * TIMEOUT)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads)
    return results


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
        got = _serve(model, {"first": (first, inputs[first]), "second": (second, inputs[second])})
        assert torch.equal(got["first"], expected[first]), (method, first)
        assert torch.equal(got["second"], expected[second]), (method, second)
