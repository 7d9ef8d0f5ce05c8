"""Delta models under torch.distributed: DDP, FSDP2 (``fully_shard``), Accelerate, DeepSpeed.

Delta layers are ordinary child modules with ordinary parameters, so the engines need no
special support to *train* them: freeze the backbone with ``freeze_module`` and the
engines see only the delta (and explicitly unfrozen) parameters as trainable. DDP puts
only those in its reducer (no ``find_unused_parameters`` needed); FSDP2 shards them with
their host's block.

What needs care is *saving* from a sharded model: under FSDP2 every parameter is a
``DTensor`` holding this rank's shard, and gathering one is a collective that every rank
must join. :func:`gather_delta_state_dict` gathers the delta tensors only (never the
frozen backbone), on every rank; :func:`save_finetuned_distributed` then writes one
checkpoint from rank 0.

Every function here works without ``torch.distributed`` initialised (one process).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- processes
def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 without ``torch.distributed``."""
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on global rank 0, and in a single process."""
    return get_rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when distributed, else nothing."""
    if is_distributed():
        torch.distributed.barrier()


# --------------------------------------------------------------------------- models
def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside engine wrappers: DDP / DataParallel / FSDP1 (``.module``)
    and ``torch.compile`` (``._orig_mod``), however nested. FSDP2 needs no unwrapping:
    ``fully_shard`` keeps the module and its parameter names."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (e.g. after ``fully_shard``)."""
    return any(is_sharded(p) for p in model.parameters())


def unsharded_class(module: nn.Module) -> type:
    """The class ``module`` had before ``fully_shard``, which swaps it for a generated
    subclass ``FSDP<Name>`` of ``FSDPModule`` and the original; other modules: their class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return type(module)
    cls = type(module)
    if isinstance(module, FSDPModule):
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of ``tensor``: a ``DTensor`` is all-gathered (a collective: every
    rank of its mesh must call this, in the same order); a plain tensor is returned as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


# --------------------------------------------------------------------------- checkpoints
def gather_delta_state_dict(delta_model: "DeltaBase", include_unfrozen: bool = True,
                            device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Full (unsharded) values of a delta's tensors, gathered from a possibly sharded model.

    Collective under FSDP2: call it on **every** rank. Only the delta's parameters and
    persistent buffers are gathered, plus (``include_unfrozen``) the backbone parameters
    left trainable by ``freeze_module`` (e.g. a classifier head) when the backbone was
    frozen at all, the same selection ``save_finetuned`` makes by itself.

    Args:
        delta_model: a delta model whose backbone may be wrapped by ``fully_shard``.
        include_unfrozen: also gather trainable backbone parameters.
        device: where the gathered copies go (default the CPU, to free device memory).

    Returns:
        ``{backbone name: tensor}`` with names as in the unwrapped backbone
        (``...q_proj.lora.lora_A``); accepted by ``save_finetuned(state_dict=...)``.
    """
    from ..io.hashing import backbone_parameters

    local: Dict[str, torch.Tensor] = {}
    for prefix, layer in delta_model.delta_layers():
        for name, tensor in layer.state_dict(keep_vars=True).items():
            local.setdefault(f"{prefix}.{name}", tensor)
    if include_unfrozen:
        params = list(backbone_parameters(delta_model.backbone_model))
        if not all(p.requires_grad for _, p in params):
            local.update({name: p for name, p in params if p.requires_grad})
    # Gather on the tensor's own device (NCCL cannot gather CPU tensors), then move.
    return {name: full_tensor(t.detach()).to(device, copy=True).contiguous()
            for name, t in local.items()}


def save_finetuned_distributed(delta_model: "DeltaBase", finetuned_delta_path: PathLike,
                               **save_kwargs) -> Optional[str]:
    """``save_finetuned`` from a DDP or FSDP2 job: gather on every rank, write on rank 0.

    ``delta_model.save_finetuned(path)`` calls this by itself when the backbone is sharded
    (FSDP2), so under FSDP2 both spellings work; under DDP this one also keeps the other
    ranks from writing. Collective: call it on every rank. Only the delta tensors are gathered (see
    :func:`gather_delta_state_dict`); rank 0 writes one ordinary checkpoint that
    ``from_finetuned`` loads onto an unsharded backbone; the other ranks wait for it.
    A checkpoint written from a sharded backbone records no backbone hash (computing one
    would gather the whole backbone), so ``from_finetuned`` has nothing to check it against.

    Args:
        delta_model: the delta model (its backbone may be sharded by ``fully_shard``).
        finetuned_delta_path: the checkpoint directory.
        **save_kwargs: passed to ``save_finetuned`` (e.g. ``save_config``).

    Returns:
        the checkpoint directory on rank 0, ``None`` on the other ranks.
    """
    if "state_dict" in save_kwargs:
        raise TypeError("save_finetuned_distributed gathers the state dict itself; call "
                        "delta_model.save_finetuned(path, state_dict=...) on rank 0 instead")
    state_dict = gather_delta_state_dict(delta_model)
    path = None
    if is_main_process():
        path = delta_model.save_finetuned(finetuned_delta_path, state_dict=state_dict, **save_kwargs)
    barrier()  # nobody reads the checkpoint before it is complete
    return path
