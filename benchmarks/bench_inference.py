"""(b) inference latency: bare backbone, LoRA unmerged and merged, opendelta next to PEFT.

LoRA r=8 on query and value, eval mode, ``torch.inference_mode``. PEFT's merged case is
``merge_adapter()`` (its LoRA wrappers stay in place, as a merged opendelta delta stays
attached); the unmerged overhead is ``latency / bare - 1``.
"""
from __future__ import annotations

from typing import List

import torch

from common import Row, Settings, batch, classifier, fresh, interleaved

SECTION = "b. inference latency"
QV = ["query", "value"]


def _models(base):
    from peft import LoraConfig, get_peft_model

    from opendelta import LoraModel

    models = {"bare": ("torch", fresh(base))}
    for merged in (False, True):
        model = fresh(base)
        delta = LoraModel(model, modified_modules=QV, lora_r=8, lora_alpha=16)
        if merged:
            delta.merge()
        models["LoRA merged" if merged else "LoRA unmerged"] = ("opendelta", model)
        wrapped = get_peft_model(fresh(base), LoraConfig(r=8, lora_alpha=16, target_modules=QV))
        if merged:
            wrapped.merge_adapter()
        models[("peft", merged)] = ("peft", wrapped)
    return models


def run(settings: Settings) -> List[Row]:
    base = classifier(settings.smoke).eval()
    models = _models(base)
    shapes = [(2, 8), (1, 4)] if settings.smoke else [(16, 128), (1, 32)]
    rows: List[Row] = []
    for size, length in shapes:
        inputs = batch(base, size, length, labels=False)
        # Short calls need more rounds for a stable median.
        repeats = settings.repeats * (1 if settings.smoke else (3 if size > 1 else 20))
        warmup = settings.warmup * (1 if settings.smoke else 3)

        def call(model, inputs=inputs):
            def run_once():
                with torch.inference_mode():
                    model(**inputs)
            return run_once
        cases = {key: call(model.eval()) for key, (_, model) in models.items()}
        times = interleaved(cases, warmup, repeats, settings.clock)
        bare = times["bare"]
        shape = f"batch {size}, length {length}"
        peft_over = times[("peft", False)] / bare - 1
        for key, (impl, _) in models.items():
            merged = key[1] if isinstance(key, tuple) else key == "LoRA merged"
            case = "bare backbone" if key == "bare" else ("LoRA merged" if merged else "LoRA unmerged")
            note = shape
            if key == "LoRA unmerged":
                note += f"; overhead {times[key] / bare - 1:+.1%} (peft {peft_over:+.1%})"
            rows.append(Row(SECTION, case, impl, times[key], "s", times[key] / bare, "bare", note,
                            {"batch": size, "length": length, "wall_s": times.wall[key]}))
    return rows
