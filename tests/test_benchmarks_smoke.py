"""The benchmark suite runs end to end in smoke mode and produces every row (no timing asserts)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (section, case, impl) of every row a run must produce, in order.
TRAIN_CASES = [("head only (floor)", "torch"), ("full fine-tune", "torch"),
               ("LoRA r=8 query,value", "opendelta"), ("LoRA r=8 query,value", "peft"),
               ("LoRA r=8 all linears", "opendelta"), ("LoRA r=8 all linears", "peft"),
               ("Adapter (defaults)", "opendelta"), ("Prefix (defaults)", "opendelta"),
               ("SoftPrompt (defaults, 100 tokens)", "opendelta"), ("SoftPrompt (defaults, 100 tokens)", "peft")]
INFERENCE_CASES = [("bare backbone", "torch"), ("LoRA unmerged", "opendelta"), ("LoRA unmerged", "peft"),
                   ("LoRA merged", "opendelta"), ("LoRA merged", "peft")]
APPLY_CASES = [(f"{method} -> {model}", impl) for model in ("Llama-2-7B config, meta device",
                                                            "OPT-6.7B config, meta device",
                                                            "BERT-large, real weights")
               for method, impl in (("LoRA", "opendelta"), ("LoRA", "peft"), ("Adapter", "opendelta"))]
ROUTING_CASES = [("one LoRA for the whole batch", "opendelta"), ("4 LoRAs routed per example", "opendelta"),
                 ("one LoRA for the whole batch", "peft"), ("4 LoRAs routed per example", "peft")]
MANY_DELTAS_CASES = [(f"{model}, K={k}", impl) for model, ks in (("BERT h=256", (1, 4, 16, 64)),
                                                                  ("Llama-like h=1024", (4,)))
                     for k in ks for impl in ("opendelta", "peft")]
SAVE_LOAD_CASES = [(what, impl) for what in ("save", "load", "save + load") for impl in ("opendelta", "peft")] + \
    [("first save of the process", "opendelta"), ("first load of the process", "opendelta")]
E2E_CASES = [("LoRA q,v on MiniLM, BBC news", impl) for impl in ("opendelta", "peft")]
EXPECTED = ([("a. training step", c, i) for c, i in TRAIN_CASES]
            + [("b. inference latency", c, i) for c, i in INFERENCE_CASES * 2]
            + [("c. apply a delta", c, i) for c, i in APPLY_CASES]
            + [("d. routing 4 LoRAs", c, i) for c, i in ROUTING_CASES]
            + [("e. training peak memory", c, i) for c, i in TRAIN_CASES]
            + [("f. many deltas routed", c, i) for c, i in MANY_DELTAS_CASES]
            + [("g. save and load", c, i) for c, i in SAVE_LOAD_CASES]
            + [("h. end-to-end job", c, i) for c, i in E2E_CASES])


@pytest.mark.slow
def test_benchmark_smoke_run_produces_every_row(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--smoke",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["section"], r["case"], r["impl"]) for r in rows] == EXPECTED
    assert result["environment"]["smoke"] is True
    # Every case ran (a method missing from the library would be reported with value None).
    missing = [(r["case"], r["impl"], r["note"]) for r in rows if r["value"] is None]
    assert not missing
    assert all(r["value"] > 0 for r in rows)
    # The routing rows compare outputs with PEFT holding the same weights: they agree.
    routed = [r for r in rows if r["section"][:2] in ("d.", "f.") and r["impl"] == "opendelta"]
    assert len(routed) == 7 and all(r["extra"]["max_abs_diff_vs_peft"] < 1e-5 for r in routed)
    # The goals table of issue 14 is filled from the run (its four figures, both libraries).
    assert [g["figure"].split(",")[0] for g in result["goals"]] == [
        "K LoRAs routed", "save + load", "prompt tuning", "apply LoRA q"]
    assert all(g["met"] != "not run" and g["opendelta"] and g["peft"] for g in result["goals"])
    assert "issue 14 goals" in proc.stdout
    # The printed table names every section.
    for section in {r["section"] for r in rows}:
        assert f"[{section}]" in proc.stdout
