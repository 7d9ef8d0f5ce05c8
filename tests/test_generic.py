"""Generic checks that every row of the case table (tests/matrix_cases.py) must pass:
copies and pickles, the meta device, bf16 backbones with float32 deltas, the delta model as
an honest module, generate(), and the run order of deltas across processes."""
import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import TABLE, build, real_positions, supported_pairs
from opendelta import AutoDeltaModel
from opendelta.core.dispatch import iter_delta_layers

ARCHS = ["bert", "gpt2", "t5", "llama"]
GENERATORS = ["gpt2", "t5", "llama"]


def _tuned(method, arch, **kwargs):
    model = tm.build(arch, "lm")
    delta = build(method, model, **kwargs)
    perturb(delta, std=0.1)
    return model, delta


@pytest.mark.parametrize("method, arch", supported_pairs(archs=ARCHS))
def test_deepcopy_and_torch_save_carry_the_delta(method, arch):
    model, delta = _tuned(method, arch)
    inputs = tm.example_inputs(arch)
    expected = outputs(model, inputs)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert torch.equal(outputs(other, inputs), expected)
        assert len(list(iter_delta_layers(other))) == len(list(iter_delta_layers(model)))
    # The copies are independent: detaching the original changes neither.
    delta.detach()
    assert not torch.equal(outputs(model, inputs), expected)
    assert torch.equal(outputs(twin, inputs), expected) and torch.equal(outputs(loaded, inputs), expected)


@pytest.mark.parametrize("method, arch", supported_pairs(archs=["bert", "llama"]))
def test_meta_device(method, arch):
    with torch.device("meta"):
        model = tm.build(arch, "lm")
    delta = build(method, model)
    params = list(delta.parameters())
    assert params and all(p.device.type == "meta" for p in params)


@pytest.mark.parametrize("method, arch", supported_pairs(archs=["bert", "llama", "t5"]))
def test_bf16_backbone_with_float32_deltas_trains_and_round_trips(tmp_path, method, arch):
    model = tm.build(arch, "lm").to(torch.bfloat16)
    delta = build(method, model, delta_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in delta.parameters())
    delta.freeze_module()
    perturb(delta, std=0.05)
    model.train()
    inputs = tm.example_inputs(arch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in delta.named_parameters()}
    out = model(**inputs).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in delta.parameters() if p.grad is not None)
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in delta.named_parameters())
    model.eval()
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = tm.build(arch, "lm").to(torch.bfloat16)
    loaded = AutoDeltaModel.from_finetuned(path, fresh, delta_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(outputs(fresh, inputs), expected)


@pytest.mark.parametrize("method", list(TABLE))
def test_delta_model_is_an_honest_module(method):
    """state_dict / parameters / to / train act on exactly the delta's layers."""
    model, delta = _tuned(method, "bert")
    names = {n for n, _ in model.named_parameters() if ".lora." in n or n in dict(delta.named_parameters())}
    own = dict(delta.named_parameters())
    assert own and set(own) <= {n for n, _ in model.named_parameters()} and set(own) <= names
    state = delta.state_dict()
    assert set(own) <= set(state)
    assert all(state[n].data_ptr() == dict(model.named_parameters())[n].data_ptr() for n in own)
    assert sum(p.numel() for p in delta.parameters()) == delta.num_delta_parameters() > 0
    delta.detach()  # still owned while detached
    assert set(delta.state_dict()) == set(state)
    delta.attach()
    delta.train()
    assert all(layer.training for _, layer in delta.delta_layers())
    delta.eval()
    assert not any(layer.training for _, layer in delta.delta_layers())
    backbone_dtype = next(model.parameters()).dtype
    delta.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in delta.parameters())
    assert all(p.dtype == backbone_dtype for n, p in model.named_parameters() if n not in own)
    # A float64 delta computes in its dtype and returns the backbone's.
    assert outputs(model, tm.example_inputs("bert")).dtype == backbone_dtype


def _no_eos(logits, model):
    """generate(min_new_tokens=...) forbids the end-of-sequence token: so does the loop."""
    eos = model.generation_config.eos_token_id
    logits = logits.clone()
    logits[..., [eos] if isinstance(eos, int) else list(eos)] = float("-inf")
    return logits


@pytest.mark.parametrize("method, arch", supported_pairs(archs=GENERATORS))
def test_generate_equals_greedy_steps(method, arch):
    model, _ = _tuned(method, arch, **({"lora_r": 4} if method == "lora" else {}))
    inputs = tm.example_inputs(arch, batch=1)
    new = 3
    if arch in tm.ENCODER_DECODER:
        inputs.pop("decoder_input_ids")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   num_beams=1, pad_token_id=0)
        if arch in tm.ENCODER_DECODER:
            tokens = torch.tensor([[model.config.decoder_start_token_id]])
            for _ in range(new):
                logits = model(**inputs, decoder_input_ids=tokens, use_cache=False).logits[:, -1:]
                tokens = torch.cat([tokens, _no_eos(logits, model).argmax(-1)], 1)
            assert torch.equal(generated, tokens)
        else:
            tokens = inputs["input_ids"]
            for _ in range(new):
                logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits[:, -1:]
                tokens = torch.cat([tokens, _no_eos(logits, model).argmax(-1)], 1)
            assert torch.equal(generated, tokens)


def test_run_order_survives_save_and_load_in_a_new_process(tmp_path):
    """Deltas "first" and "second" on one module, saved with torch.save; in a fresh
    process a third delta added on the same module runs after both."""
    model = tm.build("bert", "lm")
    from opendelta import AdapterModel

    for name, seed in (("first", 0), ("second", 1)):
        perturb(AdapterModel(model, modified_modules=["attention.output.dense"], name=name), seed=seed)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from opendelta import AdapterModel
        from opendelta.core.dispatch import attached_layers
        model = torch.load({str(path)!r}, weights_only=False)
        AdapterModel(model, modified_modules=["attention.output.dense"], name="third")
        host = model.bert.encoder.layer[0].attention.output.dense
        print(",".join(layer.delta_name for layer in attached_layers(host)))
        print(",".join(host.__dict__["_opendelta_post_layers"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    order, run = result.stdout.split()
    assert order == "first,second,third"
    assert run.split(",")[-1].startswith("adapter") and len(run.split(",")) == 3


@pytest.mark.parametrize("method, arch", supported_pairs(archs=["bert"]))
def test_outputs_of_real_positions_change(method, arch):
    """A perturbed delta changes the outputs of the caller's own positions."""
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)
    delta = build(method, model)
    perturb(delta, std=0.2)
    assert not torch.allclose(real_positions(outputs(model, inputs), method, arch), base)


def test_delta_dtype_is_recorded_and_restored(tmp_path):
    model = tm.build("llama", "lm").to(torch.bfloat16)
    delta = build("lora", model, delta_dtype=torch.float32)
    path = delta.save_finetuned(tmp_path / "ckpt")
    fresh = tm.build("llama", "lm").to(torch.bfloat16)
    loaded = AutoDeltaModel.from_finetuned(path, fresh)
    assert loaded.delta_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
