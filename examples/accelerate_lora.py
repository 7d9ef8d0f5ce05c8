"""LoRA with Hugging Face Accelerate (DDP on CPU processes or GPUs; DeepSpeed / FSDP by config).

Run on 2 CPU processes (accelerate's torch.distributed launcher; the script picks gloo
when there is no GPU):
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_lora.py [--steps 100]
One process:  python examples/accelerate_lora.py
DeepSpeed ZeRO: see the README ("Training at scale").

``accelerator.prepare`` wraps the model as usual; the delta needs nothing special because
only its parameters (and the unfrozen classifier) require gradients.
"""
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import _tiny
from opendelta import LoraModel
from opendelta.integrations.distributed import save_finetuned_distributed


def main() -> None:
    args = _tiny.parse_args(__doc__)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    model = _tiny.build_classifier(args.model)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "classifier"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    train, test = _tiny.dataset(512, seed=0), _tiny.dataset(128, seed=1)
    # Per-process batches: prepare() shards the loader across processes.
    loader = DataLoader(train, batch_size=args.batch_size // accelerator.num_processes, shuffle=True,
                        collate_fn=_tiny.collate, generator=torch.Generator().manual_seed(0))
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step = 0
    wrapped.train()
    while step < args.steps:
        for batch in loader:
            loss = wrapped(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if accelerator.is_main_process and step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step == args.steps:
                break

    accelerator.wait_for_everyone()
    # The delta object still points at the (unwrapped) backbone; every process calls this.
    path = save_finetuned_distributed(delta, args.output_dir)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(wrapped)
        print(f"processes {accelerator.num_processes}; test accuracy {_tiny.accuracy(model, test):.3f}; "
              f"delta saved to {path}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
