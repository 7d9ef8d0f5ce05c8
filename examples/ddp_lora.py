"""LoRA with DistributedDataParallel (gloo on CPU, NCCL on GPUs).

Run: torchrun --nproc_per_node 2 examples/ddp_lora.py [--steps 100] [--model PATH]

Only the LoRA parameters (and the unfrozen classifier) require gradients after
``freeze_module``, so DDP puts only those in its reducer: no ``find_unused_parameters``.
Rank 0 saves the delta with ``save_finetuned``; any process can load it with
``LoraModel.from_finetuned``.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import _tiny
from opendelta import LoraModel
from opendelta.integrations.distributed import is_main_process, save_finetuned_distributed


def main() -> None:
    args = _tiny.parse_args(__doc__)
    if "RANK" not in os.environ:  # plain `python examples/ddp_lora.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    world = dist.get_world_size()

    model = _tiny.build_classifier(args.model).to(device)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "classifier"])
    ddp = DDP(model, device_ids=[device.index] if cuda else None)

    train, test = _tiny.dataset(512, seed=0), _tiny.dataset(128, seed=1)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, collate_fn=_tiny.collate)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)

    step, epoch = 0, 0
    ddp.train()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = ddp(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()  # gradients of the delta parameters are all-reduced here
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if is_main_process() and step % 10 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    path = save_finetuned_distributed(delta, args.output_dir)
    if is_main_process():
        print(f"test accuracy {_tiny.accuracy(model.cpu(), test):.3f}; delta saved to {path}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
