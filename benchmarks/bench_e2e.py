"""(h) the main job end to end: ``python -m opendelta train`` (LoRA fine-tune of the bundled
MiniLM on BBC news, the README's first example) against the same job written with PEFT and
``transformers.Trainer`` (:mod:`e2e_peft_trainer`): same data and split, model, LoRA
settings, epochs, batch size, learning rate and schedule.

Each job runs in its own process with the run's thread count (``OMP_NUM_THREADS``), one
after the other. Reported: the job's wall time (process start to exit, model loading
included), its CPU time (the child's user + system time, steadier on a shared machine),
training samples per second (training loop alone, as each job measures it) and the test
accuracy. ``opendelta train`` also evaluates the model before training (its report shows
the accuracy before and after), which the Trainer job does not: that pass is part of its
wall time. A full run trains on the 1,780 training articles for one epoch; ``--smoke`` on 32
articles of 32 tokens.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch

from common import Row, Settings

SECTION = "h. end-to-end job"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _job(command: List[str], output_dir: str) -> Tuple[Dict[str, float], float, float]:
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cpu0, wall0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall, cpu = time.perf_counter() - wall0, _child_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.load(f), wall, cpu


def run(settings: Settings) -> List[Row]:
    size = ["--train-size", "32", "--test-size", "16", "--max-length", "32"] if settings.smoke else []
    with tempfile.TemporaryDirectory(prefix="opendelta-e2e-") as root:
        ours_dir, peft_dir = os.path.join(root, "opendelta"), os.path.join(root, "peft")
        ours, ours_wall, ours_cpu = _job([sys.executable, "-m", "opendelta", "train", "--output-dir", ours_dir, *size],
                                         ours_dir)
        theirs, peft_wall, peft_cpu = _job([sys.executable, os.path.join(HERE, "e2e_peft_trainer.py"),
                                            "--output-dir", peft_dir, *size], peft_dir)
    rows = []
    for impl, metrics, wall, cpu in (("opendelta", ours, ours_wall, ours_cpu), ("peft", theirs, peft_wall, peft_cpu)):
        samples_s = metrics["train_examples"] / metrics["train_seconds"]
        note = (f"{metrics['train_examples']} train / {metrics['test_examples']} test articles, 1 epoch; "
                f"CPU {cpu:.1f} s; training {samples_s:.2f} samples/s; test accuracy {metrics['accuracy_after']:.4f}")
        if impl == "opendelta":
            before = metrics.get("eval_before_seconds", 0.0)
            note += (f" (before training {metrics['accuracy_before']:.4f}, an evaluation pass of {before:.1f} s "
                     f"the PEFT job does not make; wall without it {(wall - before) / peft_wall:.3f}x PEFT)")
        job = "opendelta train" if impl == "opendelta" else "PEFT + Trainer script"
        rows.append(Row(SECTION, "LoRA q,v on MiniLM, BBC news", impl, wall, "s", wall / peft_wall, "peft",
                        f"{job}; {note}",
                        {"cpu_s": cpu, "train_samples_per_s": samples_s, "accuracy": metrics["accuracy_after"],
                         "train_seconds": metrics["train_seconds"], "job_seconds": metrics["seconds"]}))
    return rows
