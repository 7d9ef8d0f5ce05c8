"""Gradient checkpointing, torch.compile, mixed precision and the ``backend`` argument.

Tolerances: checkpointing recomputes the same float32 ops, so gradients match to 1e-6;
inductor fuses and reorders float32 ops, so compiled outputs match eager to 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny_models
from helpers import perturb
from opendelta import AdapterModel, BitFitModel, LoraModel


def _llama_with_deltas(**kw):
    return _add_deltas(tiny_models.build("llama", "lm"), **kw)


def _add_deltas(model, **kw):
    """LoRA (parallel, q/v), adapters (after o_proj/down_proj) and BitFit (linears of the
    MLPs) on a tiny Llama, perturbed so every delta changes the output; backbone frozen."""
    deltas = [LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4, **kw),
              AdapterModel(model, modified_modules=["o_proj", "down_proj"], bottleneck_dim=8, **kw),
              BitFitModel(model, modified_modules=["mlp"], **kw)]
    for i, delta in enumerate(deltas):
        perturb(delta, std=0.05, seed=i)
    deltas[0].freeze_module(exclude=["deltas"])
    return model, deltas


def _lm_inputs(batch=2, length=6, seed=1):
    inputs = tiny_models.example_inputs("llama", "lm", batch=batch, length=length, seed=seed)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _enable_checkpointing(model, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _eager_and_compiled(model, compiled, x):
    with torch.no_grad():
        return model(x), compiled(x)


def _compiled_mlp(**compile_kwargs):
    torch.compiler.reset()
    model = _Mlp()
    delta = LoraModel(model, modified_modules=["fc1", "fc2"], lora_r=2)
    perturb(delta, std=0.5)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    return model, delta, torch.compile(model, backend="aot_eager", **compile_kwargs), x


# --------------------------------------------------------------------------- backend
def test_backend_hf_default_and_bmt_rejected():
    model = tiny_models.build("bert", "cls")
    assert LoraModel(model, modified_modules=["query"]).backend == "hf"
    with pytest.raises(ValueError) as err:
        LoraModel(tiny_models.build("bert", "cls"), modified_modules=["query"], backend="bmt")
    message = str(err.value)
    for engine in ("'bmt'", "hf", "DistributedDataParallel", "FSDP2", "fully_shard", "Accelerate",
                   "DeepSpeed"):
        assert engine in message


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("enable_first", [False, True], ids=["deltas-first", "checkpointing-first"])
def test_gradient_checkpointing_on_frozen_backbone(use_reentrant, enable_first):
    model, _ = _llama_with_deltas()
    model.train()  # checkpointing is active in training mode only (Llama has no dropout)
    inputs = _lm_inputs()
    expected = _grads(model, inputs)

    model = tiny_models.build("llama", "lm").train()
    if enable_first:  # checkpointing enabled on the bare backbone, deltas added afterwards
        _enable_checkpointing(model, use_reentrant)
        model, deltas = _add_deltas(model)
    else:
        model, deltas = _add_deltas(model)
        _enable_checkpointing(model, use_reentrant)
    calls = []  # transformers checkpoints the block's forward: count its first module
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    got = _grads(model, inputs)  # no "element 0 of tensors does not require grad"
    assert len(calls) == 2, "the block ran twice: forward and recomputation in backward"
    assert set(got) == set(expected) == {n for d in deltas for n, _ in d.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- torch.compile
def test_inductor_matches_eager():
    """Inductor-generated code for a model carrying LoRA, an adapter and BitFit (kept small:
    inductor compiles slowly on a CPU)."""
    torch.compiler.reset()
    model = _Mlp()
    for i, delta in enumerate([LoraModel(model, modified_modules=["fc1", "fc2"], lora_r=2),
                               AdapterModel(model, modified_modules=["fc1"], bottleneck_dim=4),
                               BitFitModel(model, modified_modules=["fc2"])]):
        perturb(delta, std=0.3, seed=i)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    eager, comp = _eager_and_compiled(model, torch.compile(model), x)
    torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
    torch.compiler.reset()


def test_compiled_transformer_matches_eager_inference_and_training():
    """Tiny Llama with three deltas through Dynamo and AOTAutograd (aot_eager backend):
    same logits and same delta gradients as eager."""
    torch.compiler.reset()
    model, _ = _llama_with_deltas()
    inputs = _lm_inputs()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    expected = _grads(model, inputs)
    model.zero_grad(set_to_none=True)
    compiled(**inputs).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
    torch.compiler.reset()


def test_compile_traces_delta_hooks_without_graph_breaks():
    """The dispatch hooks are traceable: one graph for the whole model (fullgraph=True)."""
    torch.compiler.reset()
    model, _ = _llama_with_deltas()
    inputs = _lm_inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_compiled_model_after_detach_and_attach():
    """``detach()`` on a compiled model is seen (Dynamo guards on the host's removed child);
    after ``attach()``, ``torch.compiler.reset()`` makes the compiled model right again."""
    model, delta, compiled, x = _compiled_mlp()
    with_delta, comp = _eager_and_compiled(model, compiled, x)
    torch.testing.assert_close(comp, with_delta, atol=0, rtol=0)
    delta.detach()
    without_delta, comp = _eager_and_compiled(model, compiled, x)
    assert not torch.allclose(without_delta, with_delta)
    torch.testing.assert_close(comp, without_delta, atol=0, rtol=0)  # recompiled: guards caught it
    delta.attach()
    torch.compiler.reset()  # the documented step after attach()
    eager, comp = _eager_and_compiled(model, compiled, x)
    torch.testing.assert_close(eager, with_delta, atol=0, rtol=0)
    torch.testing.assert_close(comp, with_delta, atol=0, rtol=0)
    torch.compiler.reset()


def test_compiled_graph_is_stale_after_attach_without_reset():
    """Why the README asks for ``torch.compiler.reset()`` after ``attach()``: PyTorch does
    not guard module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph
    compiled while the delta was detached keeps running without it. If this fails, PyTorch
    guards hooks now: update the torch.compile section of the README."""
    model, delta, compiled, x = _compiled_mlp(fullgraph=True)
    delta.detach()
    without_delta, comp = _eager_and_compiled(model, compiled, x)
    torch.testing.assert_close(comp, without_delta, atol=0, rtol=0)
    delta.attach()
    with_delta, comp = _eager_and_compiled(model, compiled, x)
    assert not torch.allclose(with_delta, without_delta)
    torch.testing.assert_close(comp, without_delta, atol=0, rtol=0)  # stale
    torch.compiler.reset()


def test_compiled_model_with_hook_guards_sees_attach():
    torch.compiler.reset()
    model = _Mlp()
    delta = LoraModel(model, modified_modules=["fc1", "fc2"], lora_r=2)
    perturb(delta, std=0.5)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(model, backend="aot_eager")
        results = []
        for step in ("attached", "detached", "attached"):
            if step == "detached":
                delta.detach()
            elif results:
                delta.attach()
            results.append(_eager_and_compiled(model, compiled, x))
    for eager, comp in results:
        torch.testing.assert_close(comp, eager, atol=0, rtol=0)
    assert not torch.allclose(results[0][0], results[1][0])
    torch.compiler.reset()


# --------------------------------------------------------------------------- mixed precision
def _finite_training_step(model, deltas, inputs, autocast_dtype=None):
    params = [p for d in deltas for _, p in d.named_parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(**inputs)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss.float())
    out.loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad.float()).all()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_backbone_deltas_in_backbone_dtype(dtype):
    model, deltas = _llama_with_deltas()
    model.to(dtype)
    for delta in deltas:
        assert {p.dtype for _, p in delta.named_parameters()} == {dtype}
    out = _finite_training_step(model, deltas, _lm_inputs())
    assert out.logits.dtype == dtype


def _mixed(arch: str, dtype: torch.dtype):
    """A ``dtype`` backbone whose deltas are created in float32 (``delta_dtype``)."""
    model = tiny_models.build(arch, "lm").to(dtype)
    deltas = [LoraModel(model, delta_dtype=torch.float32, lora_r=4),
              AdapterModel(model, delta_dtype=torch.float32, bottleneck_dim=8),
              BitFitModel(model, delta_dtype=torch.float32)]
    for i, delta in enumerate(deltas):
        perturb(delta, std=0.05, seed=i)
    deltas[0].freeze_module(exclude=["deltas"])
    return model, deltas


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_deltas_on_low_precision_backbone_under_autocast(arch, dtype):
    model, deltas = _mixed(arch, dtype)
    for delta in deltas:
        assert {p.dtype for _, p in delta.named_parameters()} == {torch.float32}
    inputs = tiny_models.example_inputs(arch, "lm")
    inputs["labels"] = inputs["input_ids"]
    out = _finite_training_step(model, deltas, inputs, autocast_dtype=dtype)
    assert out.logits.dtype == dtype  # the stream stays in the backbone's dtype


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fp32_deltas_on_bf16_backbone_without_autocast(arch):
    """Without autocast, float32 deltas compute in float32 and hand back the stream's dtype;
    their contribution equals the same deltas computed by hand in float32."""
    model, deltas = _mixed(arch, torch.bfloat16)
    inputs = tiny_models.example_inputs(arch, "lm")
    inputs["labels"] = inputs["input_ids"]
    out = _finite_training_step(model, deltas, inputs)
    assert out.logits.dtype == torch.bfloat16
    lora_layer = next(layer for _, layer in deltas[0].delta_layers())
    x = torch.randn(3, lora_layer.lora_A.shape[1], dtype=torch.bfloat16)
    expected = (x.float() @ lora_layer.lora_A.t() @ lora_layer.lora_B.t() * lora_layer.scaling).bfloat16()
    zero = torch.zeros(3, lora_layer.lora_B.shape[0], dtype=torch.bfloat16)
    assert torch.equal(lora_layer.post_forward(None, (x,), {}, zero), expected)


def test_bf16_autocast_on_fp32_model_is_close_to_fp32():
    model, deltas = _llama_with_deltas()
    inputs = _lm_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**inputs).logits
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), reference, atol=0.05, rtol=0.05)
    _finite_training_step(model, deltas, inputs, autocast_dtype=torch.bfloat16)


def test_delta_dtype_is_validated_and_applied_on_meta():
    with pytest.raises(ValueError, match="floating torch.dtype"):
        LoraModel(tiny_models.build("bert", "cls"), modified_modules=["query"], delta_dtype=torch.int8)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4, dtype=torch.bfloat16))
    delta = LoraModel(model, modified_modules=["0"], delta_dtype=torch.float32)
    assert {(p.device.type, p.dtype) for _, p in delta.named_parameters()} == {("meta", torch.float32)}
