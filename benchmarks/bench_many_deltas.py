"""(f) many deltas in one batch: K LoRAs routed per example, opendelta (``opendelta.route``)
next to PEFT (``adapter_names=``), K = 1, 4, 16, 64, 256.

Workload of issue 14: a BERT encoder (hidden 256, 4 layers, 4 heads, feed-forward 1024),
64 rows x 32 tokens, LoRA r=16 (alpha 32) on query, value, attention.output.dense,
intermediate.dense and output.dense; row ``i`` uses delta ``i % K``. Plus a Llama-like
shape (hidden 1024, feed-forward 2816, 4 layers, 16 heads), LoRA r=16 on q/k/v/o,
32 rows x 64 tokens, K = 4, 16, 64. Inference (eval, ``torch.inference_mode``).

For each K both libraries hold the same K LoRAs (random, opendelta's weights copied into
PEFT's) and run the same batch twice: every row through delta 0 (*single*; opendelta
``route("t0")``, PEFT ``set_adapter("t0")``) and rows mixed (*mixed*). The figure of merit is
**mixed-over-single throughput** = time(single) / time(mixed) (1.0: mixing costs nothing),
the median over rounds of the two calls timed back to back in one round (the ratio of the
medians and of the minima are in the JSON). At K = 1 both calls run the same code: its
distance from 1.0 is the measurement noise of the run.
Outputs are compared (``max |opendelta - peft|``). Peak memory: tensor bytes alive during
one mixed forward plus what is resident (parameters and buffers).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from common import Row, Settings, interleaved, peak_forward_memory

SECTION = "f. many deltas routed"
BERT_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _bert(smoke: bool) -> torch.nn.Module:
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    if smoke:
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=1000)).eval()
    return tf.BertModel(tf.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024)).eval()


def _llama(smoke: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    hidden, ff, heads = (32, 64, 4) if smoke else (1024, 2816, 16)
    return tf.LlamaModel(tf.LlamaConfig(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=2 if smoke else 4,
                                        num_attention_heads=heads, num_key_value_heads=heads,
                                        vocab_size=1000)).eval()


def _names(k: int) -> List[str]:
    return [f"t{i}" for i in range(k)]


def _ours(base: torch.nn.Module, k: int, targets: List[str]) -> torch.nn.Module:
    import copy

    from opendelta import LoraModel

    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(k)
    for name in _names(k):
        delta = LoraModel(model, name=name, modified_modules=targets, lora_r=16, lora_alpha=32)
        with torch.no_grad():
            for _, p in delta.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _peft(base: torch.nn.Module, ours: torch.nn.Module, k: int, targets: List[str]) -> torch.nn.Module:
    import copy

    from peft import LoraConfig, get_peft_model

    names = _names(k)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    params = dict(ours.named_parameters())
    with torch.no_grad():  # opendelta's i-th LoRA on a host is lora, lora_1, lora_2, ...
        for module_name, module in model.named_modules():
            if not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
                continue
            host = module_name.split("base_model.model.", 1)[1]
            for i, name in enumerate(names):
                attr = "lora" if i == 0 else f"lora_{i}"
                module.lora_A[name].weight.copy_(params[f"{host}.{attr}.lora_A"])
                module.lora_B[name].weight.copy_(params[f"{host}.{attr}.lora_B"])
    model.set_adapter(names[0])
    return model.eval()


def _measure(label: str, base: torch.nn.Module, targets: List[str], ks: List[int], shape: Tuple[int, int],
             settings: Settings, memory: bool) -> List[Row]:
    import opendelta

    rows_n, length = shape
    ids = torch.randint(5, base.config.vocab_size, (rows_n, length), generator=torch.Generator().manual_seed(0))
    rows: List[Row] = []
    for k in ks:
        routes = [f"t{i % k}" for i in range(rows_n)]
        ours = _ours(base, k, targets)
        theirs = _peft(base, ours, k, targets)

        def ours_single(m=ours):
            with torch.inference_mode(), opendelta.route("t0"):
                return m(input_ids=ids).last_hidden_state

        def ours_mixed(m=ours, routes=routes):
            with torch.inference_mode(), opendelta.route(routes):
                return m(input_ids=ids).last_hidden_state

        def peft_single(m=theirs):
            with torch.inference_mode():
                return m(input_ids=ids).last_hidden_state

        def peft_mixed(m=theirs, routes=routes):
            with torch.inference_mode():
                return m(input_ids=ids, adapter_names=routes).last_hidden_state

        diff = (ours_mixed() - peft_mixed()).abs().max().item()
        # Each library's two calls alternate (single, mixed / mixed, single), so the two
        # calls of a round are adjacent; opendelta first, then PEFT.
        times = interleaved({"os": ours_single, "om": ours_mixed}, settings.warmup, settings.repeats,
                            settings.clock)
        theirs_times = interleaved({"ps": peft_single, "pm": peft_mixed}, settings.warmup, settings.repeats,
                                   settings.clock)
        times.update(theirs_times)
        times.wall.update(theirs_times.wall)
        times.samples.update(theirs_times.samples)
        mem: Dict[str, Any] = {}
        if memory:
            mem = {"opendelta": peak_forward_memory(ours_mixed, ours), "peft": peak_forward_memory(peft_mixed, theirs)}
        for impl, single, mixed in (("opendelta", "os", "om"), ("peft", "ps", "pm")):
            ratio = times.paired_ratio(single, mixed)
            note = f"{label}; {rows_n} x {length}; single {times[single] * 1e3:.1f} ms"
            extra: Dict[str, Any] = {"k": k, "single_s": times[single], "mixed_s": times[mixed],
                                     "ratio_of_medians": times[single] / times[mixed],
                                     "ratio_of_minima": min(times.samples[single]) / min(times.samples[mixed]),
                                     "wall_single_s": times.wall[single], "wall_mixed_s": times.wall[mixed],
                                     "model": label}
            if impl == "opendelta":
                note += f"; max |opendelta - peft| = {diff:.1e}"
                extra["max_abs_diff_vs_peft"] = diff
            if mem:
                note += f"; peak {mem[impl]['total']:.0f} MiB"
                extra["peak_mib"] = mem[impl]["total"]
            rows.append(Row(SECTION, f"{label}, K={k}", impl, times[mixed], "s", ratio, "single / mixed",
                            note, extra))
        del ours, theirs
    return rows


def run(settings: Settings) -> List[Row]:
    ks = [1, 4, 16, 64] if settings.smoke else [1, 4, 16, 64, 256]
    # Ratios of a few percent: 15 rounds per case for the BERT shape (about 0.15 s a call),
    # the default rounds for the Llama-like one (about 1.5 s a call).
    narrow = settings if settings.smoke else Settings.make(False, repeats=settings.repeats * 5, clock=settings.clock)
    rows = _measure("BERT h=256", _bert(settings.smoke), BERT_TARGETS, ks,
                    (8, 8) if settings.smoke else (64, 32), narrow, memory=True)
    wide = settings
    rows += _measure("Llama-like h=1024", _llama(settings.smoke), LLAMA_TARGETS, [4] if settings.smoke else [4, 16, 64],
                     (4, 8) if settings.smoke else (32, 64), wide, memory=False)
    return rows
