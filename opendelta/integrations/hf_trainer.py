"""``transformers.Trainer`` with delta models: delta-only checkpoints and resumption.

An unchanged ``Trainer`` already trains a delta model: it optimises the parameters that
require gradients, which after ``freeze_module`` are the delta's (and the explicitly
unfrozen ones). Its checkpoints hold what ``model.state_dict()`` returns, which
``freeze_module(set_state_dict=True)`` restricts to those parameters. This callback makes
that so even where ``set_state_dict=False`` was used, makes resumption from such a partial
checkpoint quiet (the frozen backbone parameters are not "missing": they come from the
pretrained backbone), and saves the delta with ``save_finetuned`` at the end::

    delta = LoraModel(model, modified_modules=["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[DeltaTrainerCallback(delta)])
    trainer.train()                                   # or train(resume_from_checkpoint=...)
    # -> args.output_dir/checkpoint-N/model.safetensors: delta + classifier only
    # -> args.output_dir/delta/: loadable by LoraModel.from_finetuned(path, fresh_model)
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

from torch import nn
from transformers import TrainerCallback, __version__ as transformers_version
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.base import set_trainable_state_dict
from .distributed import save_finetuned_distributed

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

#: attribute on the backbone: handle of the load-state-dict hook below.
_LOAD_HOOK = "_opendelta_partial_load_handle"


def _ignore_frozen_missing_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: frozen parameters absent from a state dict are expected.

    ``incompatible_keys.missing_keys`` holds names relative to the module ``load_state_dict``
    was called on (e.g. with a ``module.`` prefix under DDP); names are matched as suffixes.
    """
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}

    def is_frozen(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[i:]) in frozen for i in range(len(parts)))

    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_frozen(key)]


def allow_partial_loading(model: nn.Module) -> None:
    """Make ``model.load_state_dict(..., strict=False)`` stop reporting frozen parameters as
    missing (idempotent); a trainable parameter absent from the state dict still is."""
    if _LOAD_HOOK not in model.__dict__:
        model.__dict__[_LOAD_HOOK] = model.register_load_state_dict_post_hook(_ignore_frozen_missing_keys)


def checkpoint_dir(args: Any, state: Any) -> str:
    """The directory ``Trainer`` writes the checkpoint of ``state.global_step`` to: named
    with Trainer's own prefix (``checkpoint``), not a copy of its spelling."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class DeltaTrainerCallback(TrainerCallback):
    """Delta-only ``Trainer`` checkpoints, quiet resumption, ``save_finetuned`` at the end.

    Args:
        delta_model: the (frozen, see ``freeze_module``) delta model the trainer's model
            carries.
        save_dir: where ``save_finetuned`` writes at the end of training; default
            ``<output_dir>/delta``. ``None`` with ``save_at_end=False``: nothing is written.
        save_at_end: write the delta with ``save_finetuned`` when training ends (from rank
            0; under FSDP2 every rank gathers the delta's shards first).
        save_with_checkpoints: also write a ``from_finetuned`` directory
            ``checkpoint-N/delta`` with every Trainer checkpoint.
    """

    def __init__(self, delta_model: "DeltaBase", save_dir: Optional[Union[str, os.PathLike]] = None,
                 save_at_end: bool = True, save_with_checkpoints: bool = False):
        backbone = delta_model.backbone_model
        if all(p.requires_grad for p in backbone.parameters()):
            raise ValueError("the backbone is not frozen, so Trainer checkpoints would hold the whole "
                             "model; call delta_model.freeze_module(...) before building the callback")
        self.delta_model = delta_model
        self.save_dir = save_dir
        self.save_at_end = save_at_end
        self.save_with_checkpoints = save_with_checkpoints
        # Trainer saves model.state_dict(): keep it to the trainable parameters.
        set_trainable_state_dict(backbone, True)
        allow_partial_loading(backbone)

    def on_save(self, args, state, control, **kwargs):
        if self.save_with_checkpoints:
            checkpoint = checkpoint_dir(args, state)
            # Trainer calls on_save after writing the checkpoint, so on the processes that
            # write (args.should_save) the directory must be there; if it is not, this
            # Trainer names its checkpoints differently, and the delta must not go elsewhere.
            if args.should_save and not os.path.isdir(checkpoint):
                raise RuntimeError(
                    f"DeltaTrainerCallback(save_with_checkpoints=True): Trainer wrote no {checkpoint} "
                    f"at step {state.global_step}; transformers {transformers_version} names its "
                    "checkpoints differently from the releases opendelta is tested with (README, "
                    "'Supported versions'). Use save_with_checkpoints=False, or a tested release.")
            save_finetuned_distributed(self.delta_model, os.path.join(checkpoint, "delta"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.save_at_end:
            target = self.save_dir if self.save_dir is not None else os.path.join(args.output_dir, "delta")
            save_finetuned_distributed(self.delta_model, target)
        return control
