"""The goals table of issue 14, filled from a run's rows (PEFT, opendelta, goal, met).

    python benchmarks/goals.py [benchmarks/results.json]     # from a saved run

``run.py`` prints it after the full table and stores it in the JSON (``"goals"``). A goal
whose rows the run did not produce (a section left out with ``--only``) reads "not run".
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

Rows = List[Dict[str, Any]]


def _find(rows: Rows, section: str, case: str, impl: str) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r["section"] == section and r["case"] == case and r["impl"] == impl), None)


def _routing(rows: Rows) -> Dict[str, Any]:
    got = {impl: [_find(rows, "f. many deltas routed", f"BERT h=256, K={k}", impl) for k in (4, 16, 64)]
           for impl in ("peft", "opendelta")}
    goal = (0.95, 0.92, 0.90)
    if any(r is None for rs in got.values() for r in rs):
        return {"figure": "K LoRAs routed, mixed / single throughput, K = 4 / 16 / 64", "met": "not run"}
    ours = [r["ratio"] for r in got["opendelta"]]
    return {"figure": "K LoRAs routed, mixed / single throughput, K = 4 / 16 / 64",
            "peft": " / ".join(f"{r['ratio']:.2f}" for r in got["peft"]),
            "opendelta": " / ".join(f"{v:.2f}" for v in ours), "goal": ">= 0.95 / 0.92 / 0.90",
            "met": " / ".join("yes" if v >= g else "no" for v, g in zip(ours, goal))}


def _save_load(rows: Rows) -> Dict[str, Any]:
    figure = "save + load, MiniLM LoRA q,v checkpoint, hash check on (CPU s)"
    parts = {(what, impl): _find(rows, "g. save and load", what, impl) for what in ("save", "load")
             for impl in ("peft", "opendelta")}
    if any(r is None for r in parts.values()):
        return {"figure": figure, "met": "not run"}
    text = {impl: f"{parts[('save', impl)]['value']:.3f} + {parts[('load', impl)]['value']:.3f} s"
            for impl in ("peft", "opendelta")}
    total = {impl: parts[("save", impl)]["value"] + parts[("load", impl)]["value"] for impl in ("peft", "opendelta")}
    return {"figure": figure, "peft": text["peft"], "opendelta": text["opendelta"], "goal": "<= PEFT",
            "met": "yes" if total["opendelta"] <= total["peft"] else "no"}


def _prompt(rows: Rows) -> Dict[str, Any]:
    figure = "prompt tuning, 100 soft tokens, train step (MiniLM, bs16, s128)"
    ours = _find(rows, "a. training step", "SoftPrompt (defaults, 100 tokens)", "opendelta")
    theirs = _find(rows, "a. training step", "SoftPrompt (defaults, 100 tokens)", "peft")
    if ours is None or theirs is None or not ours["value"] or not theirs["value"]:
        return {"figure": figure, "met": "not run"}
    ratio = ours["extra"].get("vs_peft", ours["value"] / theirs["value"])
    return {"figure": figure, "peft": "1", "opendelta": f"{ratio:.2f}x PEFT", "goal": "<= 1.00x",
            "met": "yes" if ratio <= 1.0 else "no"}


def _apply(rows: Rows) -> Dict[str, Any]:
    figure = "apply LoRA q,v / Adapter to a Llama-2-7B / OPT-6.7B config, meta device"
    found = {(method, model, impl): _find(rows, "c. apply a delta", f"{method} -> {model} config, meta device", impl)
             for method in ("LoRA", "Adapter") for model in ("Llama-2-7B", "OPT-6.7B")
             for impl in ("peft", "opendelta")}
    ours = {k: r for k, r in found.items() if k[2] == "opendelta"}
    if any(r is None for r in ours.values()):
        return {"figure": figure, "met": "not run"}

    def fmt(method: str, impl: str) -> str:
        values = [found[(method, model, impl)] for model in ("Llama-2-7B", "OPT-6.7B")]
        return "/".join("none" if r is None or r["value"] is None else f"{r['value']:.3f}" for r in values)
    met = all(ours[(m, model, "opendelta")]["value"] <= limit for m, limit in (("LoRA", 0.010), ("Adapter", 0.020))
              for model in ("Llama-2-7B", "OPT-6.7B"))
    return {"figure": figure + " (s, Llama/OPT)", "peft": f"LoRA {fmt('LoRA', 'peft')}, Adapter none",
            "opendelta": f"LoRA {fmt('LoRA', 'opendelta')}, Adapter {fmt('Adapter', 'opendelta')}",
            "goal": "LoRA <= 0.010, Adapter <= 0.020", "met": "yes" if met else "no"}


def goals(rows: Rows) -> List[Dict[str, Any]]:
    """The four rows of issue 14's table, from the rows of a run (dicts as in the JSON)."""
    return [_routing(rows), _save_load(rows), _prompt(rows), _apply(rows)]


def format_goals(table: List[Dict[str, Any]]) -> str:
    header = ("figure", "peft", "opendelta", "goal", "met")
    body = [tuple(str(g.get(k, "")) for k in header) for g in table]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in body)])


def markdown_goals(table: List[Dict[str, Any]]) -> str:
    lines = ["| figure | PEFT | opendelta | goal | met |", "|---|---|---|---|---|"]
    lines += [f"| {g['figure']} | {g.get('peft', '')} | {g.get('opendelta', '')} | {g.get('goal', '')} | "
              f"{g['met']} |" for g in table]
    return "\n".join(lines)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "results.json")
    with open(path) as f:
        table = goals(json.load(f)["rows"])
    print(format_goals(table))
    print()
    print(markdown_goals(table))
