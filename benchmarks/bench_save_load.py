"""(g) saving and loading a delta checkpoint, opendelta next to PEFT.

The MiniLM classifier (5 labels) with LoRA r=8 on query and value and a trainable head:
opendelta ``save_finetuned`` then ``from_finetuned`` onto a built backbone with the backbone
check on (``check_hash=True``, the default); PEFT ``save_pretrained`` then
``PeftModel.from_pretrained`` onto a built backbone (``task_type=SEQ_CLS``: the head is
saved too). Each round writes into the same directory (an update in place) and loads onto
the same backbone object, detached / unloaded again after each load (not timed).

Times are **process CPU time** (all threads: the backbone hash reads large tensors in
worker threads) with the wall-clock medians beside them (wall includes the ``fsync`` calls
of opendelta's atomic writes, which PEFT does not make). The first save and the first load
of a process read every backbone tensor once (SHA-256 of 90 MB); later ones reuse the
remembered digests (:mod:`opendelta.io.hashing`): both are reported.
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Tuple

from common import Row, Settings, classifier

SECTION = "g. save and load"
QV = ["query", "value"]


def _timed(call: Callable[[], None]) -> Tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    call()
    return time.process_time() - c0, time.perf_counter() - w0


def _rounds(cases: Dict[str, Tuple[Callable[[], None], Callable[[], None]]], rounds: int
            ) -> Dict[str, Tuple[float, float]]:
    """Median (cpu, wall) of each case's timed call, interleaved; the second callable of a
    case undoes what the first did (not timed)."""
    samples: Dict[str, List[Tuple[float, float]]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, undo = cases[name]
            samples[name].append(_timed(call))
            undo()
    return {name: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s))
            for name, s in samples.items()}


def run(settings: Settings) -> List[Row]:
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    from opendelta import LoraModel

    base = classifier(settings.smoke)
    root = tempfile.mkdtemp(prefix="opendelta-bench-")
    try:
        ours_dir, peft_dir = os.path.join(root, "opendelta"), os.path.join(root, "peft")
        ours = copy.deepcopy(base)
        delta = LoraModel(ours, modified_modules=QV, lora_r=8, lora_alpha=16)
        delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=QV,
                                                                task_type=TaskType.SEQ_CLS))
        ours_target, peft_target = copy.deepcopy(base), copy.deepcopy(base)

        # The first save and load of the process: every backbone tensor is read.
        cold_save = _timed(lambda: delta.save_finetuned(ours_dir))
        loaded: List[object] = []
        cold_load = _timed(lambda: loaded.append(LoraModel.from_finetuned(ours_dir, ours_target)))
        loaded.pop().detach()
        theirs.save_pretrained(peft_dir)

        def ours_load() -> None:
            loaded.append(LoraModel.from_finetuned(ours_dir, ours_target))

        def peft_load() -> None:
            loaded.append(PeftModel.from_pretrained(peft_target, peft_dir))

        def ours_unload() -> None:
            loaded.pop().detach()

        def peft_unload() -> None:
            loaded.pop().unload()

        def nothing() -> None:
            pass

        rounds = 2 if settings.smoke else 5 * settings.repeats
        times = _rounds({"ours_save": (lambda: delta.save_finetuned(ours_dir), nothing),
                         "peft_save": (lambda: theirs.save_pretrained(peft_dir), nothing),
                         "ours_load": (ours_load, ours_unload), "peft_load": (peft_load, peft_unload)}, rounds)
        size = sum(os.path.getsize(os.path.join(ours_dir, f)) for f in os.listdir(ours_dir))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_params = sum(p.numel() for p in base.parameters())
    label = f"{'tiny BERT' if settings.smoke else 'MiniLM'} ({n_params / 1e6:.1f}M params), LoRA q,v + head"
    rows: List[Row] = []
    total = {impl: times[f"{impl}_save"][0] + times[f"{impl}_load"][0] for impl in ("ours", "peft")}
    for what in ("save", "load"):
        for impl, name in (("ours", "opendelta"), ("peft", "peft")):
            cpu, wall = times[f"{impl}_{what}"]
            other = times[f"{'peft' if impl == 'ours' else 'ours'}_{what}"][0]
            note = f"{label}; wall {wall * 1e3:.1f} ms"
            if impl == "ours":
                note += f"; hash check on; opendelta/peft = {cpu / other:.2f}"
            rows.append(Row(SECTION, what, name, cpu, "s", cpu / times[f"peft_{what}"][0], "peft", note,
                            {"wall_s": wall, "checkpoint_bytes": size if impl == "ours" else None}))
    for impl, name in (("ours", "opendelta"), ("peft", "peft")):
        rows.append(Row(SECTION, "save + load", name, total[impl], "s", total[impl] / total["peft"], "peft",
                        label))
    for what, (cpu, wall) in (("first save of the process", cold_save), ("first load of the process", cold_load)):
        rows.append(Row(SECTION, what, "opendelta", cpu, "s", note=f"{label}; wall {wall * 1e3:.1f} ms; "
                        "reads every backbone tensor once (SHA-256)", extra={"wall_s": wall}))
    return rows
