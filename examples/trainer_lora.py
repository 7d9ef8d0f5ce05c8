"""LoRA with an unchanged ``transformers.Trainer`` and :class:`DeltaTrainerCallback`.

Run: python examples/trainer_lora.py [--steps 100] [--model PATH]
     (multi-process: torchrun --nproc_per_node 2 examples/trainer_lora.py)

The Trainer checkpoints (``checkpoint-N/model.safetensors``) hold only the LoRA tensors
and the unfrozen classifier; ``trainer.train(resume_from_checkpoint=...)`` resumes from
them; the callback writes the delta with ``save_finetuned`` to ``<output-dir>/delta``.
"""
import torch
from transformers import Trainer, TrainingArguments

import _tiny
from opendelta import LoraModel
from opendelta.integrations.hf_trainer import DeltaTrainerCallback


def main() -> None:
    args = _tiny.parse_args(__doc__)
    model = _tiny.build_classifier(args.model)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "classifier"])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    training_args = TrainingArguments(
        args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size // world,
        learning_rate=args.lr, save_steps=max(1, args.steps // 2), logging_steps=max(1, args.steps // 5),
        use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=_tiny.dataset(512, seed=0),
                      data_collator=_tiny.collate, callbacks=[DeltaTrainerCallback(delta)])
    trainer.train()
    if trainer.is_world_process_zero():
        test = _tiny.dataset(128, seed=1)
        print(f"test accuracy {_tiny.accuracy(model, test):.3f}; delta saved to {args.output_dir}/delta",
              flush=True)


if __name__ == "__main__":
    main()
