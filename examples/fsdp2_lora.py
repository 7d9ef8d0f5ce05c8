"""LoRA with FSDP2 (``torch.distributed.fsdp.fully_shard``) on a tiny Llama classifier.

Run: torchrun --nproc_per_node 2 examples/fsdp2_lora.py [--steps 100] [--model PATH]

Each decoder block is sharded on its own, then the root: frozen backbone weights and
trainable LoRA weights (children of q_proj / v_proj, run by forward hooks) live in the
same shard groups. Saving gathers the LoRA tensors only (never the frozen backbone) and
rank 0 writes one ordinary checkpoint, loaded here onto an unsharded model.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import _tiny
from opendelta import LoraModel
from opendelta.integrations.distributed import is_main_process, save_finetuned_distributed


def main() -> None:
    args = _tiny.parse_args(__doc__)
    if "RANK" not in os.environ:  # plain `python examples/fsdp2_lora.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    world = dist.get_world_size()

    model = _tiny.build_classifier(args.model, arch="llama").to(device)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "score"])
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)

    train, test = _tiny.dataset(512, seed=0), _tiny.dataset(128, seed=1)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, collate_fn=_tiny.collate)
    # Parameters are DTensors now; the optimizer steps on this rank's shards.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    step, epoch = 0, 0
    model.train()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()  # gradients are reduce-scattered to their shards
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if is_main_process() and step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    path = save_finetuned_distributed(delta, args.output_dir)  # every rank: gathers LoRA shards
    if is_main_process():
        fresh = _tiny.build_classifier(args.model, arch="llama")  # unsharded, on the CPU
        LoraModel.from_finetuned(path, fresh)
        print(f"reloaded unsharded: test accuracy {_tiny.accuracy(fresh, test):.3f}; delta saved to {path}",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
