"""Method x architecture matrix for the core methods (LoRA, BitFit, Adapter)."""
import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb, trainable_names
from opendelta import AdapterModel, BitFitModel, LoraModel

METHODS = {"lora": LoraModel, "bitfit": BitFitModel, "adapter": AdapterModel}


@pytest.mark.parametrize("arch", tm.ARCH_NAMES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_architecture(method, arch):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)

    delta = METHODS[method](backbone_model=model)
    assert len(delta.delta_layers()) > 0

    delta.freeze_module(exclude=["deltas"])
    delta_names = {n for n, _ in delta.named_parameters()}
    assert delta_names and trainable_names(model) == delta_names

    fresh = outputs(model, inputs)
    if method in ("lora", "bitfit"):  # zero-initialised updates change nothing, exactly
        assert torch.equal(fresh, base)

    # Exactly the delta parameters receive gradients.
    model.train(False)
    out = model(**inputs)
    out.logits.float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == delta_names
    assert any(p.grad.abs().sum() > 0 for _, p in delta.named_parameters())

    perturb(delta)
    tuned = outputs(model, inputs)
    assert not torch.allclose(tuned, base)

    for _ in range(2):
        delta.detach()
        assert torch.equal(outputs(model, inputs), base)
        assert not any("lora" in n or "adapter" in n or "bitfit" in n for n, _ in model.named_parameters())
        delta.attach()
        assert torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "llama"])
def test_task_wrappers_get_default_targets(arch):
    """Default targets are found inside sequence-classification wrappers too."""
    for cls in METHODS.values():
        model = tm.build(arch, "cls")
        bare = tm.build(arch, "base")
        assert len(cls(model).delta_layers()) == len(cls(bare).delta_layers()) > 0
