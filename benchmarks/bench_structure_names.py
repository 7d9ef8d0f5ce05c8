"""Time of ``CommonStructureMap.transform`` on every module name of a big model (first pass,
before its per-name cache helps), on the meta device.

    python benchmarks/bench_structure_names.py

Target resolution calls ``transform`` once per module name; a new map is built per delta.
Measured on the 2-core development machine (best of 5), bucketed rules versus the previous
linear scan over all rules (commit 24bdde6):

    Llama-2-7B layout, 32 layers,   legacy 0.85 ms -> 0.42 ms for 423 names
    T5 layout, 24+24 layers,        legacy 8.95 ms -> 1.23 ms for 1071 names
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    import transformers as tf

    from opendelta import CommonStructureMap

    cases = [
        ("Llama-2-7B layout (32 layers)", tf.LlamaForCausalLM,
         tf.LlamaConfig(hidden_size=64, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=100)),
        ("T5 layout (24 + 24 layers)", tf.T5ForConditionalGeneration,
         tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=24, num_heads=4, vocab_size=100)),
    ]
    for label, cls, config in cases:
        with torch.device("meta"):
            model = cls(config)
        names = [name for name, _ in model.named_modules()]
        best = float("inf")
        for _ in range(5):
            mapping = CommonStructureMap(model)
            start = time.perf_counter()
            for name in names:
                mapping.transform(name)
            best = min(best, time.perf_counter() - start)
        print(f"{label}: {len(names)} names, {best * 1e3:.2f} ms first pass "
              f"({best / len(names) * 1e6:.2f} us per name)")


if __name__ == "__main__":
    main()
