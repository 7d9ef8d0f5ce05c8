"""(a) training step time and (e) its peak memory, opendelta next to PEFT.

One step = forward with labels, backward, AdamW step, ``zero_grad(set_to_none=True)``, in
training mode. Every case starts from a copy of the same backbone; the classifier head is
trainable in every case (it is the floor: "head only").
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from common import Row, Settings, batch, classifier, fresh, interleaved, peak_memory

SECTION_TIME = "a. training step"
SECTION_MEM = "e. training peak memory"
QV = ["query", "value"]
ALL_LINEARS = ["query", "key", "value", "dense"]


def _ours(cls_name: str, **kwargs) -> Optional[Callable[[torch.nn.Module], torch.nn.Module]]:
    import opendelta

    cls = getattr(opendelta, cls_name, None)
    if cls is None:
        return None

    def setup(model: torch.nn.Module) -> torch.nn.Module:
        delta = cls(model, **kwargs)
        delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
        return model
    return setup


def _peft_lora(targets: List[str]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def setup(model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=targets))
        for p in model.classifier.parameters():  # same trainable head as every other case
            p.requires_grad_(True)
        return wrapped
    return setup


def _peft_prompt(tokens: int) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def setup(model: torch.nn.Module) -> torch.nn.Module:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        # SEQ_CLS keeps the classifier trainable (modules_to_save), as the other cases do.
        return get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=tokens))
    return setup


def _full(model: torch.nn.Module) -> torch.nn.Module:
    return model


def _head_only(model: torch.nn.Module) -> torch.nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


def cases() -> List[Tuple[str, str, Optional[Callable]]]:
    """(case, impl, setup) in table order; setup None: the method is not available."""
    return [
        ("head only (floor)", "torch", _head_only),
        ("full fine-tune", "torch", _full),
        ("LoRA r=8 query,value", "opendelta", _ours("LoraModel", modified_modules=QV, lora_r=8, lora_alpha=16)),
        ("LoRA r=8 query,value", "peft", _peft_lora(QV)),
        ("LoRA r=8 all linears", "opendelta", _ours("LoraModel", modified_modules=ALL_LINEARS, lora_r=8,
                                                    lora_alpha=16)),
        ("LoRA r=8 all linears", "peft", _peft_lora(ALL_LINEARS)),
        ("Adapter (defaults)", "opendelta", _ours("AdapterModel")),
        ("Prefix (defaults)", "opendelta", _ours("PrefixModel")),
        ("SoftPrompt (defaults, 100 tokens)", "opendelta", _ours("SoftPromptModel")),
        ("SoftPrompt (defaults, 100 tokens)", "peft", _peft_prompt(100)),
    ]


def _stepper(model: torch.nn.Module, inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def run(settings: Settings) -> List[Row]:
    base = classifier(settings.smoke)
    size, length = (2, 8) if settings.smoke else (16, 128)
    inputs = batch(base, size, length)
    steps, optimizers, models, missing = {}, {}, {}, []
    for case, impl, setup in cases():
        key = (case, impl)
        if setup is None:
            missing.append(key)
            continue
        model = setup(fresh(base)).train()
        models[key] = model
        steps[key], optimizers[key] = _stepper(model, inputs)
    # Steps differ by a few percent: 5 rounds in a full run for a stable median.
    repeats = settings.repeats if settings.smoke else settings.repeats + 2
    times = interleaved(steps, settings.warmup, repeats, settings.clock)
    memory = {key: peak_memory(steps[key], models[key], optimizers[key]) for key in steps}

    floor_t = times[("head only (floor)", "torch")]
    floor_m = memory[("head only (floor)", "torch")]["total"]
    rows: List[Row] = []
    shape = f"batch {size}, length {length}"
    for case, impl, _ in cases():
        key = (case, impl)
        if key in missing:
            for section, unit in ((SECTION_TIME, "s"), (SECTION_MEM, "MiB")):
                rows.append(Row(section, case, impl, None, unit, note="method not available: skipped"))
            continue
        peft_key = (case, "peft")
        note_t = shape
        note_m = f"without parameters {memory[key]['without_params']:.1f} MiB"
        extra_t = {"vs_floor": times[key] / floor_t, "wall_s": times.wall[key]}
        extra_m = dict(memory[key])
        if impl == "opendelta" and peft_key in times:
            # Per-round ratio of the two adjacent calls: steadier than the ratio of medians.
            vs_t = times.paired_ratio(key, peft_key)
            vs_m = memory[key]["total"] / memory[peft_key]["total"]
            note_t += f"; opendelta/peft = {vs_t:.3f}"
            note_m += f"; opendelta/peft = {vs_m:.3f}"
            extra_t["vs_peft"], extra_m["vs_peft"] = vs_t, vs_m
        rows.append(Row(SECTION_TIME, case, impl, times[key], "s", times[key] / floor_t, "floor",
                        note_t, extra_t))
        rows.append(Row(SECTION_MEM, case, impl, memory[key]["total"], "MiB",
                        memory[key]["total"] / floor_m, "floor", note_m, extra_m))
    # Memory rows after the time rows, in the same case order.
    return [r for r in rows if r.section == SECTION_TIME] + [r for r in rows if r.section == SECTION_MEM]
