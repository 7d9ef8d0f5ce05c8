"""The main job done the obvious other way: PEFT LoRA + ``transformers.Trainer`` on the
data, split, model and settings ``opendelta train`` uses (the counterpart of
``python -m opendelta train`` in section h of the benchmarks).

    python benchmarks/e2e_peft_trainer.py --output-dir /tmp/peft-job [--train-size N --test-size N]

Same as ``opendelta train``'s defaults: the bundled MiniLM with a 5-label head, the BBC news
corpus with its seeded stratified 80/20 split (read by opendelta's own loader, so the
examples are identical), LoRA r=8, alpha 16, no dropout, on query and value, the head
trained too; 1 epoch, batch 16, sequences truncated to 128 tokens and padded per batch,
AdamW with lr 5e-3 and weight decay 0.01, a linear decay to 0 without warm-up, no
gradient clipping, seed 0. Writes ``metrics.json`` (test accuracy, times) to the output
directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's opendelta (its data loader)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train-size", type=int, default=0)
    parser.add_argument("--test-size", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from opendelta.cli.train import default_model_path, load_bbc_news

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    data = load_bbc_news(0.2, 0)
    train = data.train[:args.train_size] if args.train_size else data.train
    test = data.test[:args.test_size] if args.test_size else data.test
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"]))

    def encode(examples):
        texts, labels = zip(*examples)
        encoded = tokenizer(list(texts), truncation=True, max_length=args.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)]

    train_set, test_set = encode(train), encode(test)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"), num_train_epochs=args.epochs,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=5e-3, weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=0.0, seed=0, save_strategy="no",
        eval_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer))
    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    predictions = trainer.predict(test_set)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    model.save_pretrained(os.path.join(args.output_dir, "adapter"))
    metrics = {"accuracy_after": accuracy, "train_examples": len(train_set), "test_examples": len(test_set),
               "train_seconds": train_seconds, "seconds": time.perf_counter() - started,
               "training_loss": result.training_loss}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
