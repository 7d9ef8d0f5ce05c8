"""The method x architecture matrix: every delta method on every supported architecture."""
import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb, trainable_names
from matrix_cases import EXACT_AT_INIT, METHODS, UNSUPPORTED, real_positions
from opendelta.core.dispatch import iter_delta_layers


@pytest.mark.parametrize("arch", tm.ARCH_NAMES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_architecture(method, arch):
    cls, kwargs = METHODS[method]
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)
    if (method, arch) in UNSUPPORTED:
        error, message = UNSUPPORTED[method, arch]
        with pytest.raises(error, match=message):
            cls(backbone_model=model, **kwargs)
        assert not list(iter_delta_layers(model)) and torch.equal(outputs(model, inputs), base)
        return

    delta = cls(backbone_model=model, **kwargs)
    assert len(delta.delta_layers()) > 0

    # After freezing, exactly the delta parameters are trainable...
    delta.freeze_module(exclude=["deltas"])
    delta_names = {n for n, _ in delta.named_parameters()}
    assert delta_names and trainable_names(model) == delta_names

    fresh = outputs(model, inputs)
    if method in EXACT_AT_INIT:
        assert torch.equal(fresh, base)

    # ... and exactly they receive gradients.
    model(**inputs).logits.float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == delta_names
    assert any(p.grad.abs().sum() > 0 for _, p in delta.named_parameters())

    perturb(delta)
    tuned = outputs(model, inputs)
    assert not torch.allclose(tuned, fresh)
    assert not torch.allclose(real_positions(tuned, method, arch), base)

    for _ in range(2):
        delta.detach()
        assert torch.equal(outputs(model, inputs), base)
        assert not list(iter_delta_layers(model))
        delta.attach()
        assert torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_task_wrappers_get_default_targets(method, arch):
    """Default targets are found inside sequence-classification wrappers too."""
    cls, kwargs = METHODS[method]
    wrapped = cls(tm.build(arch, "cls"), **kwargs)
    bare = cls(tm.build(arch, "base"), **kwargs)
    assert len(wrapped.delta_layers()) == len(bare.delta_layers()) > 0
