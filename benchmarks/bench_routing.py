"""(d) per-example routing: 4 LoRAs in one batch versus the same batch on one LoRA,
opendelta (``opendelta.route``) next to PEFT's mixed-adapter batch (``adapter_names=``).

Both libraries hold the same four LoRAs (r=8 on query and value; opendelta's weights are
copied into PEFT's), so the routed outputs are also compared: ``max |opendelta - peft|``.
Inference (eval mode, ``torch.inference_mode``): PEFT's mixed batches are inference-only.
"""
from __future__ import annotations

from typing import List

import torch

from common import Row, Settings, batch, classifier, fresh, interleaved

SECTION = "d. routing 4 LoRAs"
QV = ["query", "value"]
NAMES = ["t0", "t1", "t2", "t3"]


def _copy_into_peft(ours_model, peft_model) -> None:
    """Give PEFT's adapters exactly opendelta's LoRA weights (and the same scaling)."""
    ours = dict(ours_model.named_parameters())
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or not isinstance(module.lora_A, torch.nn.ModuleDict):
                continue
            host = name.split("base_model.model.", 1)[1]
            for i, adapter in enumerate(NAMES):
                attr = "lora" if i == 0 else f"lora_{i}"
                module.lora_A[adapter].weight.copy_(ours[f"{host}.{attr}.lora_A"])
                module.lora_B[adapter].weight.copy_(ours[f"{host}.{attr}.lora_B"])


def run(settings: Settings) -> List[Row]:
    from peft import LoraConfig, get_peft_model

    import opendelta
    from opendelta import LoraModel

    base = classifier(settings.smoke).eval()
    size, length = (8, 8) if settings.smoke else (16, 128)
    inputs = batch(base, size, length, labels=False)
    routes = [NAMES[i % 4] for i in range(size)]

    ours = fresh(base)
    g = torch.Generator().manual_seed(0)
    for name in NAMES:
        delta = LoraModel(ours, name=name, modified_modules=QV, lora_r=8, lora_alpha=16)
        with torch.no_grad():
            for _, p in delta.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours.eval()

    config = LoraConfig(r=8, lora_alpha=16, target_modules=QV)
    theirs = get_peft_model(fresh(base), config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        theirs.add_adapter(name, config)
    _copy_into_peft(ours, theirs)
    theirs.set_adapter(NAMES[0])
    theirs.eval()

    def ours_uniform():
        with torch.inference_mode(), opendelta.route(NAMES[0]):
            return ours(**inputs).logits

    def ours_routed():
        with torch.inference_mode(), opendelta.route(routes):
            return ours(**inputs).logits

    def peft_uniform():
        with torch.inference_mode():
            return theirs(**inputs).logits

    def peft_mixed():
        with torch.inference_mode():
            return theirs(**inputs, adapter_names=routes).logits

    diff_routed = (ours_routed() - peft_mixed()).abs().max().item()
    diff_uniform = (ours_uniform() - peft_uniform()).abs().max().item()
    times = interleaved({"ours_uniform": ours_uniform, "ours_routed": ours_routed,
                         "peft_uniform": peft_uniform, "peft_mixed": peft_mixed},
                        settings.warmup, settings.repeats * (1 if settings.smoke else 3), settings.clock)
    shape = f"batch {size}, length {length}"
    return [
        Row(SECTION, "one LoRA for the whole batch", "opendelta", times["ours_uniform"], "s",
            note=f"{shape}; 4 attached, route('t0'); max |opendelta - peft| = {diff_uniform:.1e}",
            extra={"max_abs_diff_vs_peft": diff_uniform, "wall_s": times.wall["ours_uniform"]}),
        Row(SECTION, "4 LoRAs routed per example", "opendelta", times["ours_routed"], "s",
            times["ours_routed"] / times["ours_uniform"], "uniform",
            f"{shape}; opendelta/peft mixed = {times['ours_routed'] / times['peft_mixed']:.3f}; "
            f"max |opendelta - peft| = {diff_routed:.1e}",
            {"vs_peft_mixed": times["ours_routed"] / times["peft_mixed"], "max_abs_diff_vs_peft": diff_routed,
             "wall_s": times.wall["ours_routed"]}),
        Row(SECTION, "one LoRA for the whole batch", "peft", times["peft_uniform"], "s", note=shape,
            extra={"wall_s": times.wall["peft_uniform"]}),
        Row(SECTION, "4 LoRAs routed per example", "peft", times["peft_mixed"], "s",
            times["peft_mixed"] / times["peft_uniform"], "uniform", f"{shape}; adapter_names=",
            {"wall_s": times.wall["peft_mixed"]}),
    ]
