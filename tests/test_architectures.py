"""Every row of the case table on the architectures of issue 16: ViT, CLIP, Whisper, Gemma 3
(text), Phi-3, Qwen3 and ModernBERT (tiny models: tests/tiny_models.py, NEW_ARCH_NAMES).

The generic checks of tests/test_matrix.py, test_generic.py, test_persistence.py,
test_merge.py and test_routing.py, on these models: build, gradients and freezing, exact
detach/attach, save/load, deepcopy, meta device, bf16 with float32 deltas, merge where
mergeable, routing where routable, generate() for the generators; a method that does not
apply raises the error its row's ``unsupported`` field names.
"""
import copy

import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb, trainable_names
from matrix_cases import TABLE, UNSUPPORTED, build, methods, real_positions
from opendelta import AutoDeltaModel
from opendelta.core.dispatch import iter_delta_layers

ARCHS = tm.NEW_ARCH_NAMES
GENERATORS = ["whisper", "gemma3_text", "phi3", "qwen3"]


def cases(method_names=None, archs=ARCHS, unsupported=False, forward=True):
    """``(method, arch)`` params of the rows on ``archs`` (with the unsupported pairs if asked);
    ``forward`` is kept for callers; every pair runs."""
    out = []
    for method in method_names or list(TABLE):
        for arch in archs:
            if (method, arch) in UNSUPPORTED and not unsupported:
                continue
            out.append(pytest.param(method, arch, id=f"{method}-{arch}"))
    return out


def _scalar(out):
    """A differentiable scalar of a model output (CLIP has similarity logits, no ``logits``)."""
    logits = out.logits if getattr(out, "logits", None) is not None else out.logits_per_image
    return logits.float().pow(2).mean()


@pytest.mark.parametrize("method, arch", cases(unsupported=True))
def test_every_row_on_every_new_architecture(method, arch):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)
    if (method, arch) in UNSUPPORTED:
        error, message = UNSUPPORTED[method, arch]
        with pytest.raises(error, match=message):
            build(method, model)
        assert not list(iter_delta_layers(model)) and torch.equal(outputs(model, inputs), base)
        return
    delta = build(method, model)
    assert len(delta.delta_layers()) > 0
    delta.freeze_module(exclude=["deltas"])
    delta_names = {n for n, _ in delta.named_parameters()}
    assert delta_names and trainable_names(model) == delta_names
    fresh = outputs(model, inputs)
    if TABLE[method].exact_at_init:
        assert torch.equal(fresh, base)
    _scalar(model(**inputs)).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == delta_names
    assert any(p.grad.abs().sum() > 0 for _, p in delta.named_parameters())
    perturb(delta)
    tuned = outputs(model, inputs)
    assert not torch.allclose(real_positions(tuned, method, arch), base)
    for _ in range(2):
        delta.detach()
        assert torch.equal(outputs(model, inputs), base) and not list(iter_delta_layers(model))
        delta.attach()
        assert torch.equal(outputs(model, inputs), tuned)


@pytest.mark.parametrize("method, arch", cases(archs=["gemma3_text", "phi3", "qwen3", "modernbert"],
                                               forward=False))
def test_task_wrappers_get_default_targets(method, arch):
    wrapped = build(method, tm.build(arch, "cls"))
    bare = build(method, tm.build(arch, "base"))
    assert len(wrapped.delta_layers()) == len(bare.delta_layers()) > 0


@pytest.mark.parametrize("method, arch", cases())
def test_save_load_deepcopy_and_meta(tmp_path, method, arch):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    delta = build(method, model)
    delta.freeze_module()
    perturb(delta, std=0.1)
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = tm.build(arch, "lm")
    loaded = AutoDeltaModel.from_finetuned(path, fresh)
    assert type(loaded) is type(delta) and torch.equal(outputs(fresh, inputs), expected)
    twin = copy.deepcopy(model)
    delta.detach()
    assert torch.equal(outputs(twin, inputs), expected)
    with torch.device("meta"):
        meta = tm.build(arch, "lm")
    params = list(build(method, meta).parameters())
    assert params and all(p.device.type == "meta" for p in params)


@pytest.mark.parametrize("method, arch", cases(archs=["vit", "whisper", "qwen3"]))
def test_bf16_backbone_with_float32_deltas(method, arch):
    model = tm.build(arch, "lm").to(torch.bfloat16)
    delta = build(method, model, delta_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in delta.parameters())
    delta.freeze_module()
    perturb(delta, std=0.05)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tm.example_inputs(arch).items()}
    out = model(**inputs)
    assert (out.logits if hasattr(out, "logits") else out[0]).dtype == torch.bfloat16
    _scalar(out).backward()
    grads = [p.grad for p in delta.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method, arch", cases(methods(mergeable=True)))
def test_merge_unmerge(method, arch):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    delta = build(method, model)
    perturb(delta, std=0.2)
    layers = {id(layer) for _, layer in delta.delta_layers()}
    original = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    unmerged = outputs(model, inputs)
    if method == "bitfit" and arch in ("whisper", "gemma3_text", "phi3", "qwen3", "modernbert"):
        with pytest.raises(ValueError, match="no bias to fold"):  # bias-free Linears (Whisper's k_proj)
            delta.merge()
        return
    delta.merge()
    assert delta.is_merged and (outputs(model, inputs) - unmerged).abs().max() <= 1e-5
    delta.unmerge()
    state = model.state_dict()
    worst = max(((state[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in original.items())
    assert worst <= 1e-6 and len(layers) == len(delta.delta_layers())


@pytest.mark.parametrize("method, arch", cases(methods(routable=True)))
def test_routed_batch_equals_one_by_one(method, arch):
    model = tm.build(arch, "lm")
    routes = ["a", None, "b"]
    deltas = {}
    for seed, name in enumerate("ab"):
        deltas[name] = build(method, model, name=name)
        perturb(deltas[name], std=0.1, seed=seed)
    inputs = tm.example_inputs(arch, batch=len(routes))
    with opendelta.route(routes):
        routed = outputs(model, inputs)
    for d in deltas.values():
        d.detach()
    rows = []
    for i, name in enumerate(routes):
        if name is not None:
            deltas[name].attach()
        rows.append(outputs(model, {k: v[i:i + 1] for k, v in inputs.items()}))
        if name is not None:
            deltas[name].detach()
    # CLIP's logits compare every image with every text: keep row i's own column.
    expected = torch.cat(rows)
    got = torch.stack([routed[i, i] for i in range(len(routes))])[:, None] if arch == "clip" else routed
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method, arch", cases(archs=GENERATORS))
def test_generate_equals_greedy_steps(method, arch):
    model = tm.build(arch, "lm")
    perturb(build(method, model, **({"lora_r": 4} if method == "lora" else {})), std=0.1)
    inputs = tm.example_inputs(arch, batch=1)
    new = 3
    eos = model.generation_config.eos_token_id

    def step(logits):  # min_new_tokens: generate() never picks end-of-sequence here
        logits = logits[:, -1:].clone()
        logits[..., eos] = float("-inf")
        return logits.argmax(-1)

    with torch.no_grad():
        if arch in tm.ENCODER_DECODER:
            inputs.pop("decoder_input_ids")
            generated = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       num_beams=1)
            tokens = torch.tensor([[model.config.decoder_start_token_id]])
            for _ in range(new):
                tokens = torch.cat([tokens, step(model(**inputs, decoder_input_ids=tokens, use_cache=False).logits)], 1)
        else:
            generated = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       num_beams=1, pad_token_id=0)
            tokens = inputs["input_ids"]
            for _ in range(new):
                logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits
                tokens = torch.cat([tokens, step(logits)], 1)
    # Whisper's generate() returns the new tokens without the decoder start token.
    assert torch.equal(generated[:, -new:], tokens[:, -new:])
