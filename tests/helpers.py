"""Shared assertions for the test-suite."""
from __future__ import annotations

import contextlib
import threading

from typing import Dict

import torch
from torch import nn

import opendelta


def outputs(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or first output) under ``no_grad``, for exact comparisons."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def perturb(delta, std: float = 0.1, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter of ``delta`` so it visibly changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def trainable_names(model: nn.Module):
    return {n for n, p in model.named_parameters() if p.requires_grad}


#: ``serve_interleaved_distilbert``'s route for a thread that runs outside ``opendelta.route``
UNROUTED = object()
THREAD_TIMEOUT = 30


def serve_interleaved_distilbert(model, jobs):
    """Run ``jobs`` ({thread name: (route, inputs)}) concurrently on one DistilBERT, forced to
    interleave inside its first attention: all threads wait at a barrier before the value
    projection (past the attention's pre-hooks and the query and key projections), then the
    thread named "first" finishes the whole attention while the others are held. ``route``
    is an ``opendelta.route`` argument, or ``UNROUTED`` for no routing block. Returns
    {thread name: output}."""
    attention = model.distilbert.transformer.layer[0].attention
    barrier, first_done = threading.Barrier(len(jobs), timeout=THREAD_TIMEOUT), threading.Event()

    def before_value_projection(module, args):
        barrier.wait()
        if threading.current_thread().name != "first" and not first_done.wait(THREAD_TIMEOUT):
            raise TimeoutError("the first thread did not finish its attention")

    def after_attention(module, args, output):
        if threading.current_thread().name == "first":
            first_done.set()

    handles = [attention.v_lin.register_forward_pre_hook(before_value_projection),
               attention.register_forward_hook(after_attention)]
    results, errors = {}, []

    def run(name, route, inputs):
        try:
            with (contextlib.nullcontext() if route is UNROUTED else opendelta.route(route)):
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
            thread.join(2 * THREAD_TIMEOUT)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads)
    return results
