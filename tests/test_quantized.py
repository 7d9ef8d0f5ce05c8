"""Deltas on quantized backbones: tiny Llama and BERT loaded through transformers'
``BitsAndBytesConfig`` (4-bit NF4, 8-bit) and quantized by torchao (int8 weight-only).

The tiny models have hidden size 64: bitsandbytes 0.50's CPU 4-bit kernels round-trip weights
wrongly when ``in_features`` is below the block size (64). On CPUs with AVX512-BF16,
bitsandbytes also repacks a 4-bit weight *in place* at its first inference forward (absmax
to bf16, lossy) and ``state_dict()`` unpacks it again (lossy too); the fixtures switch that
repacking off so that exact comparisons are about opendelta (one test keeps it on).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import matrix_cases as mc  # noqa: E402
from helpers import outputs, perturb  # noqa: E402
from opendelta import AutoDeltaModel, LoraModel, prepare_for_kbit_training, route  # noqa: E402
from opendelta.core.quantized_merge import is_quantized, merge_report, weight_codec  # noqa: E402
from opendelta.integrations.quantized import quantized_training  # noqa: E402

BACKENDS = ["nf4", "int8", "torchao"]
ARCHS = ["llama", "bert"]
METHODS = ["lora", "adapter", "low_rank_adapter", "compacter", "parallel_adapter", "bitfit", "prefix", "soft_prompt"]
HIDDEN = 64


def _float_model(arch: str):
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=96, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, **common)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, **common)
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        out[arch] = str(tmp_path_factory.mktemp(arch))
        _float_model(arch).save_pretrained(out[arch])
    return out


_PRISTINE: dict = {}


def load(saved, arch: str, backend: str, repack: bool = False, **kwargs):
    """The tiny ``arch`` model quantized with ``backend``, in eval mode (a copy of one loaded
    once per module: quantized loading is the slow part)."""
    key = (arch, backend, repack, tuple(sorted(kwargs.items())))
    if key not in _PRISTINE:
        _PRISTINE[key] = _load(saved, arch, backend, repack, **kwargs)
    return copy.deepcopy(_PRISTINE[key])


def _load(saved, arch: str, backend: str, repack: bool = False, **kwargs):
    auto = transformers.AutoModelForCausalLM if arch == "llama" else transformers.AutoModelForSequenceClassification
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = auto.from_pretrained(saved[arch], **kwargs)
        quantize_(model, Int8WeightOnlyConfig())
        return model.eval()
    config = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32)
              if backend == "nf4" else transformers.BitsAndBytesConfig(load_in_8bit=True))
    model = auto.from_pretrained(saved[arch], quantization_config=config, device_map="cpu", **kwargs)
    if not repack:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model.eval()


def batch(arch: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (4, 7), generator=g)
    labels = ids if arch == "llama" else torch.randint(0, 3, (4,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _quantized_names(model):
    return {n for n, m in model.named_modules() if is_quantized(m)}


@pytest.fixture(autouse=True)
def _quiet_bitsandbytes(recwarn):
    """bitsandbytes warns at every 8-bit matmul that inputs are cast to fp16."""


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_method_trains_saves_loads_and_detaches_on_a_quantized_backbone(backend, arch, method, saved, tmp_path):
    model = load(saved, arch, backend)
    quantized = _quantized_names(model)
    assert quantized, "the backbone has quantized layers"
    inputs, labels = batch(arch)
    reference = outputs(model, inputs)
    delta = mc.build(method, model)
    delta.freeze_module()
    delta_params = {f"{n}" for n, _ in delta.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad and with_grad <= delta_params, sorted(with_grad - delta_params)[:3]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert _quantized_names(model) == quantized  # nothing was dequantized
    model.eval()
    trained = outputs(model, inputs)
    delta.save_finetuned(tmp_path / "delta")
    from safetensors.torch import load_file

    saved_tensors = load_file(tmp_path / "delta" / "model.safetensors")
    assert set(saved_tensors) and all(t.dtype == torch.float32 for t in saved_tensors.values())
    assert len(saved_tensors) == len(delta.state_dict())  # the deltas, nothing of the backbone
    fresh = load(saved, arch, backend)
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert torch.equal(outputs(fresh, inputs), trained)
    delta.detach()
    assert torch.equal(outputs(model, inputs), reference)
    delta.attach()
    assert torch.equal(outputs(model, inputs), trained)


def test_sizes_are_read_without_dequantizing(saved, monkeypatch):
    import bitsandbytes.functional as bnbf
    from torchao.quantization import Int8Tensor

    def forbidden(*args, **kwargs):
        raise AssertionError("dequantized")

    models = [load(saved, "llama", b) for b in BACKENDS]
    monkeypatch.setattr(bnbf, "dequantize_4bit", forbidden)
    monkeypatch.setattr(Int8Tensor, "dequantize", forbidden)
    for model in models:
        lora = LoraModel(model, modified_modules=["k_proj"], name="l")
        adapter = mc.build("adapter", model, name="a")
        assert {tuple(layer.lora_A.shape) for _, layer in lora.delta_layers()} == {(8, HIDDEN)}
        assert {tuple(layer.lora_B.shape) for _, layer in lora.delta_layers()} == {(32, 8)}
        assert all(layer.parts()[0].in_features == HIDDEN for _, layer in adapter.delta_layers())


def test_deltas_in_delta_dtype_on_a_bf16_quantized_backbone(saved, tmp_path):
    model = load(saved, "llama", "nf4", dtype=torch.bfloat16)
    delta = LoraModel(model, delta_dtype=torch.float32)
    delta.freeze_module()
    inputs, labels = batch("llama")
    model.train()
    model(**inputs, labels=labels).loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in delta.parameters())
    delta.save_finetuned(tmp_path / "d")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "d" / "model.safetensors").values()} == {torch.float32}


def test_routing_gives_each_row_its_own_delta(saved):
    model = load(saved, "llama", "nf4")
    a, b = LoraModel(model, name="a"), LoraModel(model, name="b")
    perturb(a, seed=1)
    perturb(b, seed=2)
    inputs, _ = batch("llama")
    with route(["a", "b", None, "a"]):
        routed = outputs(model, inputs)
    b.detach()
    only_a = outputs(model, inputs)
    a.detach()
    plain = outputs(model, inputs)
    b.attach()
    only_b = outputs(model, inputs)
    for row, expected in enumerate([only_a, only_b, plain, only_a]):
        torch.testing.assert_close(routed[row], expected[row], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- merging
def _same(a, b) -> bool:
    """Bit-equal tensors (torchao's Int8Tensor: equal codes and scales)."""
    if hasattr(a, "qdata"):
        return torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    return torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_reports_an_error_within_its_bound_and_unmerge_is_bit_exact(backend, saved):
    model = load(saved, "llama", backend)
    delta = LoraModel(model)
    perturb(delta, std=0.05)
    inputs, _ = batch("llama")
    unmerged = outputs(model, inputs)
    hosts = {e.host_name: model.get_submodule(e.host_name) for e in delta.layer_entries()}
    originals = {name: host.weight for name, host in hosts.items()}
    dequantized = {name: weight_codec(host).dequantize(host).float() for name, host in hosts.items()}
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    delta.merge()
    report = merge_report(model)
    assert set(report) == set(hosts)
    for name, error in report.items():
        host, layer = hosts[name], model.get_submodule(name).lora
        codec = weight_codec(host)
        exact = dequantized[name] + layer.delta_weight().float()
        measured = (codec.dequantize(host).float() - exact).abs().max().item()
        assert error.weight == pytest.approx(measured, rel=1e-6, abs=1e-9)
        assert 0 < error.weight <= error.bound, (name, error)
        assert host.weight is not originals[name]
    merged = outputs(model, inputs)
    assert 0 < (merged - unmerged).abs().max() < 0.5
    delta.unmerge()
    assert all(hosts[n].weight is originals[n] for n in hosts)
    after = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    assert before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)
    assert torch.equal(outputs(model, inputs), unmerged)
    delta.detach()  # merged, then detached: the backbone computes what it did before
    delta.attach()
    delta.merge()
    delta.detach()
    assert all(hosts[n].weight is originals[n] for n in hosts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_detach_can_write_a_full_precision_model(backend, saved, tmp_path):
    model = load(saved, "llama", backend)
    delta = LoraModel(model)
    perturb(delta, std=0.05)
    inputs, _ = batch("llama")
    expected = outputs(model, inputs)
    full = delta.merge_and_detach(dequantize=True)
    assert not _quantized_names(full) and getattr(full, "hf_quantizer", None) is None
    assert all(type(p) is torch.nn.Parameter for p in full.parameters())
    got = outputs(full, inputs)
    tolerance = {"nf4": 1e-4, "int8": 5e-2, "torchao": 1e-4}[backend]  # bnb int8 matmuls in fp16
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    full.save_pretrained(tmp_path / "full")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    assert not _quantized_names(reloaded)
    torch.testing.assert_close(outputs(reloaded, inputs), got, rtol=0, atol=1e-6)


def test_merging_into_repacked_4bit_weights(saved):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    model = load(saved, "llama", "nf4", repack=True)
    delta = LoraModel(model)
    perturb(delta, std=0.05)
    inputs, _ = batch("llama")
    unmerged = outputs(model, inputs)  # the first inference forward repacks the weights
    host = model.model.layers[0].self_attn.q_proj
    original = host.weight
    assert original.quant_state.packing_format_for_cpu
    delta.merge()
    assert all(e.weight <= e.bound for e in merge_report(model).values())
    assert 0 < (outputs(model, inputs) - unmerged).abs().max() < 0.5
    delta.unmerge()
    assert host.weight is original and torch.equal(outputs(model, inputs), unmerged)


# --------------------------------------------------------------------------- training helpers
def test_prepare_for_kbit_training_with_gradient_checkpointing_trains_a_4bit_llama(saved):
    model = load(saved, "llama", "nf4", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.gradient_checkpointing
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj", "down_proj"], delta_dtype=torch.float32)
    inputs, labels = batch("llama")
    model.train()
    optimizer = torch.optim.AdamW(delta.parameters(), lr=2e-2)
    losses = []
    for _ in range(10):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is not None for p in delta.parameters())


def test_the_trainer_trains_a_delta_on_a_quantized_model(saved, tmp_path):
    from torch.utils.data import Dataset

    model = load(saved, "llama", "nf4")
    delta = LoraModel(model)
    delta.freeze_module()
    inputs, labels = batch("llama")

    class Rows(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": inputs["input_ids"][i], "labels": labels[i]}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=Rows())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with quantized_training(model):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    assert not getattr(model, "_hf_peft_config_loaded", False)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".lora." in n for n in changed)


def test_import_opendelta_imports_neither_bitsandbytes_nor_torchao():
    code = ("import sys, opendelta; print(sorted(m for m in ('bitsandbytes', 'torchao') if m in sys.modules)); "
            "print(callable(opendelta.prepare_for_kbit_training))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_options_are_read_from_quantized_layers(backend, saved):
    from opendelta.core.shapes import tensor_options

    model = load(saved, "llama", backend, dtype=torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.q_proj  # no bias: only the quantized weight tells
    options = tensor_options(q_proj)
    assert options["device"] == torch.device("cpu")
    assert options.get("dtype") == {"nf4": torch.bfloat16, "int8": None, "torchao": torch.bfloat16}[backend]
    assert tensor_options(q_proj, torch.float32)["dtype"] == torch.float32
    assert tensor_options(model.model.layers[0])["dtype"] == torch.bfloat16  # its norms
