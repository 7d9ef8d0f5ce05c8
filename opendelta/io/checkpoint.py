"""Saving and loading delta checkpoints: ``save_finetuned`` / ``from_finetuned``.

A checkpoint is a directory::

    config.json          delta_type, every hyperparameter, the targets, backbone class,
                         name and hash, library versions
    model.safetensors    the delta's parameters (and persistent buffers) plus the backbone
                         parameters left trainable by ``freeze_module`` (e.g. a classifier
                         head); never pickle

Parameter names are those inside the backbone (``bert.encoder.layer.0.attention.self.query
.lora.lora_A``) with the method's canonical child name (``lora``), even when this delta
lives under ``lora_1`` because the module already hosted another LoRA: a checkpoint loads
onto any fresh copy of the backbone.

A save is a transaction (:mod:`opendelta.io.transaction`): the complete new directory is
written next to the old one, fsynced and switched into place, so the directory shows the
complete old checkpoint or the complete new one, even when the process dies; files that
are no checkpoint files (a README.md) survive. A save replaces every checkpoint file of the
directory (ours, ``pytorch_model.bin``, PEFT's ``adapter_*``), and a load refuses a
directory holding two formats. Weights and config carry the same ``save_id``: a pair from
two different saves (copied by hand) is refused when loading.

Loading is strict and checks everything before touching the backbone: a missing or
unexpected key or a wrong shape raises :class:`CheckpointError` naming the file and the
keys, and the backbone is left as it was.

Directories written by the original OpenDelta 0.3.x (``pytorch_model.bin``, read with
``torch.load(weights_only=True)``) load too, see :mod:`opendelta.io.legacy`; so do LoRA
adapters saved by PEFT (``adapter_config.json``), see :mod:`opendelta.io.peft`.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..core.config import BaseDeltaConfig
from ..core.construction import backbone_name_or_path
from ..core.dispatch import is_delta_parameter_name
from ..core.freezing import covering_modules
from .delta_center import create_default_name, create_delta_center_args
from ..core.fields import check_mapping
from .files import (CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME, SAVE_ID_KEY, STRUCTURE_HASH_KEY, WEIGHTS_NAME,
                    CheckpointError, PathLike, _short_list, library_versions, prepare_to_read, read_config_file,
                    read_weights, weights_file, write_file_atomically, write_files_atomically)
from .hashing import gen_model_hash, has_meta_parameters
from .hub import push_checkpoint_to_hub, resolve_checkpoint_dir
from .loading import DELTA_DTYPE_KEY, build_config, check_backbone_hash, class_for, lora_class_for, with_saved_dtype
from .peft import load_peft_lora, read_peft_config
from .state import (canonical_prefixes, delta_tensors, load_delta_tensors, rename_prefix,
                    trainable_backbone_tensors)

if TYPE_CHECKING:  # pragma: no cover
    from ..core.base import DeltaBase

logger = logging.getLogger(__name__)



def _legacy_writer(save_function: Callable[..., Any], tensors: Dict[str, torch.Tensor]) -> Callable[[str], None]:
    def write(target: str) -> None:
        save_function(tensors, target)
    return write


# =========================================================================== the mixin
class SaveLoadMixin:
    """``save_finetuned`` / ``from_finetuned`` and the lower-level checkpoint helpers of
    :class:`~opendelta.core.base.DeltaBase`."""

    def checkpoint_state_dict(self: "DeltaBase") -> Dict[str, torch.Tensor]:
        """What :meth:`save_checkpoint` writes: delta tensors (canonical names) and the
        trainable backbone parameters, detached, on the CPU."""
        tensors = {**delta_tensors(self), **trainable_backbone_tensors(self)}
        meta = [k for k, v in tensors.items() if v.device.type == "meta"]
        if meta:
            raise CheckpointError(f"cannot save tensors on the meta device ({_short_list(meta)}); "
                                  "materialise the model first (e.g. model.to_empty(device=...) and "
                                  "load real weights)")
        # Clone: safetensors refuses tensors sharing storage, and a snapshot cannot change
        # while the file is written.
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    # ------------------------------------------------------------------ low-level files
    def save_checkpoint(self: "DeltaBase", path: PathLike,
                        state_dict: Optional[Dict[str, torch.Tensor]] = None,
                        metadata: Optional[Dict[str, str]] = None) -> str:
        """Write the weights of this delta as safetensors (atomically), without config.

        Args:
            path: a directory (the file is ``path/model.safetensors``; saved as a
                transaction that replaces every checkpoint file there, ``config.json``
                included) or a path ending with ``.safetensors`` (that file is replaced).
            state_dict: tensors to write instead of :meth:`checkpoint_state_dict`; names of
                this delta's layers are turned into canonical names.
            metadata: extra string metadata for the safetensors header.

        Returns:
            the path of the weights file.
        """
        path = os.fspath(path)
        tensors = self._prepare_state_dict(state_dict)
        writer = self._weights_writer(tensors, metadata or {})
        if path.endswith(".safetensors"):
            return write_file_atomically(path, writer)
        return os.path.join(write_files_atomically(path, {WEIGHTS_NAME: writer}), WEIGHTS_NAME)

    def _prepare_state_dict(self: "DeltaBase", state_dict: Optional[Dict[str, torch.Tensor]]
                            ) -> Dict[str, torch.Tensor]:
        if state_dict is None:
            return self.checkpoint_state_dict()
        prefixes = canonical_prefixes(self)
        out = {}
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
            out[rename_prefix(key, prefixes)] = value.detach().to("cpu", copy=True).contiguous()
        return out

    @staticmethod
    def _weights_writer(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]
                        ) -> Callable[[str], None]:
        def write(target: str) -> None:
            from safetensors.torch import save_file

            save_file(tensors, target, metadata={"format": "pt", **metadata})
        return write

    def load_checkpoint(self: "DeltaBase", path: PathLike, strict: bool = True) -> None:
        """Load weights saved by :meth:`save_checkpoint` (or ``save_finetuned``) into this delta.

        Args:
            path: a checkpoint directory or a weights file (``.safetensors``; a legacy
                ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``).
            strict: a delta tensor missing from the file, or a key that is neither this
                delta's nor a backbone parameter, raises :class:`CheckpointError`.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            prepare_to_read(path)  # leftovers of interrupted saves; two formats are refused
        file = weights_file(path) if os.path.isdir(path) else path
        tensors, _ = read_weights(file)
        legacy = file.endswith(".bin")
        if legacy:
            from .legacy import convert_legacy_state_dict

            tensors = convert_legacy_state_dict(self, tensors)
        self.load_delta_state_dict(tensors, strict=strict, source=file, allow_missing_buffers=legacy)

    def load_delta_state_dict(self: "DeltaBase", state_dict: Dict[str, torch.Tensor], strict: bool = True,
                              source: str = "state_dict", allow_missing_buffers: bool = False) -> None:
        """Copy ``state_dict`` (canonical delta names and backbone parameter names) into this
        delta and the backbone; everything is checked before anything is written (see
        :func:`opendelta.io.state.load_delta_tensors`)."""
        load_delta_tensors(self, state_dict, strict=strict, source=source,
                           allow_missing_buffers=allow_missing_buffers)

    # ------------------------------------------------------------------ save_finetuned
    def save_finetuned(self: "DeltaBase", finetuned_delta_path: PathLike = "./delta_checkpoints/",
                       save_config: bool = True, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                       save_function: Optional[Callable[..., Any]] = None, push_to_dc: bool = False,
                       center_args: Optional[Dict[str, Any]] = None,
                       center_args_pool: Optional[Dict[str, Any]] = None, list_tags: Optional[List[str]] = None,
                       dict_tags: Optional[Dict[str, Any]] = None, delay_push: bool = False,
                       test_result: Any = None, usage: str = "", *, push_to_hub: bool = False,
                       repo_id: Optional[str] = None, private: Optional[bool] = None,
                       token: Optional[Union[str, bool]] = None, commit_message: Optional[str] = None) -> str:
        """Save this delta (weights and config) to a directory, atomically; optionally push
        it to the Hugging Face Hub.

        Args:
            finetuned_delta_path: the checkpoint directory (created if absent). The save is
                a transaction (see :mod:`opendelta.io.transaction`): every checkpoint file
                already there (of any format) is replaced, other files are kept.
            save_config: write ``config.json`` (with the backbone's class, name and hash and
                the library versions). Without it the directory cannot be loaded by
                ``from_finetuned``, only by :meth:`load_checkpoint`.
            state_dict: tensors to save instead of the delta's own and the trainable
                backbone parameters.
            push_to_hub: upload ``config.json`` and ``model.safetensors`` (and a
                ``README.md`` if the directory has one) to the Hub repo ``repo_id``
                (created if needed, ``private`` as given) with huggingface_hub.
            save_function: the original's way to write weights (``torch.save``): given, the
                weights go to ``pytorch_model.bin`` written by ``save_function(state_dict,
                path)`` instead of ``model.safetensors`` (loadable only if it can be read with
                ``torch.load(weights_only=True)``).
            push_to_dc: the DeltaCenter no longer exists: ``True`` raises, pointing to
                ``push_to_hub``. ``center_args``, ``center_args_pool``, ``list_tags``,
                ``dict_tags``, ``delay_push``, ``test_result`` and ``usage`` are accepted
                for old scripts and written nowhere.
            token: Hub token (default: huggingface_hub's login).

        Returns:
            the absolute path of the checkpoint directory.
        """
        if push_to_dc:
            raise ValueError("push_to_dc=True: the DeltaCenter no longer exists; share the checkpoint "
                             "through the Hugging Face Hub with save_finetuned(..., push_to_hub=True, "
                             "repo_id='org/name')")
        if save_function is not None and not callable(save_function):
            raise TypeError(f"save_function must be callable like torch.save(obj, path), got {save_function!r}")
        if push_to_hub and not repo_id:
            raise ValueError("push_to_hub=True needs repo_id='org/name'")
        from ..integrations.distributed import has_sharded_parameters, save_finetuned_distributed

        if state_dict is None and has_sharded_parameters(self.backbone_model):
            # FSDP2: a collective; every rank gathers the delta's shards, rank 0 writes.
            return save_finetuned_distributed(
                self, finetuned_delta_path, save_config=save_config, push_to_hub=push_to_hub,
                repo_id=repo_id, private=private, token=token, commit_message=commit_message)
        save_id = uuid.uuid4().hex
        tensors = self._prepare_state_dict(state_dict)
        if save_function is None:
            writers = {WEIGHTS_NAME: self._weights_writer(
                tensors, {SAVE_ID_KEY: save_id, "delta_type": self.delta_type})}
        else:  # the original's format; its save_id lives in the config only
            writers = {LEGACY_WEIGHTS_NAME: _legacy_writer(save_function, tensors)}
        if save_config:
            delta_keys = set(delta_tensors(self))
            config = self.config_for_saving(skip_parameters=[k for k in tensors if k not in delta_keys])
            config.extra[SAVE_ID_KEY] = save_id
            text = config.to_json_string()

            def write_config(target: str) -> None:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(text)
            writers[CONFIG_NAME] = write_config  # last: a config always has its weights
        directory = write_files_atomically(os.fspath(finetuned_delta_path), writers)
        logger.info("delta checkpoint saved to %s", directory)
        if push_to_hub:
            push_checkpoint_to_hub(directory, repo_id, private=private, token=token,
                                   commit_message=commit_message or f"Upload {self.delta_type} delta")
        return directory

    def create_default_name(self: "DeltaBase", **kwargs: Any) -> str:
        """The original's default checkpoint name: ``<model_path_public_name>_<delta_type>_<dataset>``
        (parts not given are left out; ``delta_type`` defaults to this delta's)."""
        return create_default_name(**{"delta_type": self.delta_type, **kwargs})

    def create_delta_center_args(self: "DeltaBase", center_args: Optional[Dict[str, Any]] = None,
                                 center_args_pool: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The DeltaCenter arguments the original built (``center_args`` wins over
        ``center_args_pool``, which wins over what this delta knows: its type and backbone)."""
        backbone = self.backbone_model
        defaults = {"delta_type": self.delta_type, "backbone_model": type(backbone).__name__,
                    "model_path_public_name": backbone_name_or_path(backbone)}
        return create_delta_center_args(center_args, center_args_pool, defaults)

    def config_for_saving(self: "DeltaBase", skip_parameters: List[str] = ()) -> BaseDeltaConfig:
        """This delta's config with the backbone's class, name and hash and the library
        versions filled in (the hash leaves out the values of ``skip_parameters``, which
        the checkpoint stores itself)."""
        backbone = self.backbone_model
        name = backbone_name_or_path(backbone) \
            or self.config.backbone_checkpoint_name
        from ..integrations.distributed import has_sharded_parameters, unsharded_class

        # FSDP2 (DTensor parameters): hashing values would need a collective gather of the
        # whole backbone, and its classes are renamed (FSDPLlama...): record neither hash.
        sharded = has_sharded_parameters(backbone)
        # A method written the manual's way keeps its hyperparameters as attributes named
        # like its config's fields (``self.rank = rank``): those are what it was built with.
        stored = {n: self.__dict__[n] for n in self.config_class.hyperparameter_names() if n in self.__dict__}
        config = self.config.copy(
            **stored,
            # Backbone parameters saved with the delta were trainable: record their modules
            # so that freeze_module() after from_finetuned() leaves them trainable again.
            unfrozen_modules=covering_modules(self.unfrozen_modules, skip_parameters),
            backbone_class=unsharded_class(backbone).__name__, backbone_checkpoint_name=name or None,
            backbone_hash=None if sharded or has_meta_parameters(backbone)
            else gen_model_hash(backbone, skip_parameters=skip_parameters))
        config.extra.pop(STRUCTURE_HASH_KEY, None)  # never a stale one from a loaded config
        if not sharded:
            config.extra[STRUCTURE_HASH_KEY] = gen_model_hash(backbone, with_parameters=False)
        config.extra.update(library_versions())
        config.extra.pop(DELTA_DTYPE_KEY, None)
        if self.delta_dtype is not None:  # rebuilt in the same dtype by from_finetuned
            config.extra[DELTA_DTYPE_KEY] = str(self.delta_dtype).replace("torch.", "")
        config.extra.pop(SAVE_ID_KEY, None)
        return config

    # ------------------------------------------------------------------ from_finetuned
    @classmethod
    def from_finetuned(cls, finetuned_delta_path: PathLike, backbone_model: nn.Module,
                       delta_config: Optional[Union[BaseDeltaConfig, Dict[str, Any]]] = None,
                       cache_dir: Optional[PathLike] = None,
                       state_dict: Optional[Dict[str, torch.Tensor]] = None, *,
                       check_hash: bool = True, strict_hash: bool = False,
                       local_files_only: bool = False, force_download: bool = False,
                       revision: Optional[str] = None, token: Optional[Union[str, bool]] = None,
                       **overrides: Any) -> "DeltaBase":
        """Rebuild a saved delta on ``backbone_model`` and load its weights strictly.

        The backbone is put in eval mode (``backbone_model.eval()``, dropout off), as in
        OpenDelta; call ``backbone_model.train()`` and ``freeze_module`` to train further.
        The delta is created on the backbone's device and dtype.

        Args:
            finetuned_delta_path: a checkpoint directory, or a Hub repo id (``"org/name"``)
                fetched with huggingface_hub (``cache_dir``, ``local_files_only``,
                ``force_download``, ``revision``, ``token``; ``HF_HUB_OFFLINE=1`` is honoured).
            backbone_model: the model to put the delta on (modified in place).
            delta_config: a config (object or dict) to use instead of ``config.json``.
            state_dict: tensors to load instead of the weights file.
            check_hash: compare the backbone with the hash saved in the config; a mismatch
                warns (:class:`BackboneHashWarning`) naming both hashes. Hashes written by
                OpenDelta 0.3.x use another recipe and are not compared.
            strict_hash: raise :class:`CheckpointError` on a hash mismatch instead.
            **overrides: config fields or constructor arguments (e.g. ``name``) that win over
                the saved config.

        Raises:
            CheckpointError: missing or damaged files, unknown delta_type, a checkpoint
                for another delta type or architecture, missing/unexpected keys. The
                backbone is unchanged after any of these.
        """
        prepare_to_read(finetuned_delta_path)  # leftovers of interrupted saves; two formats are refused
        directory = resolve_checkpoint_dir(finetuned_delta_path, cache_dir=cache_dir,
                                           local_files_only=local_files_only,
                                           force_download=force_download, revision=revision, token=token)
        if os.path.realpath(directory) != os.path.realpath(os.fspath(finetuned_delta_path)):
            prepare_to_read(directory)  # a Hub snapshot or a cache_dir copy
        if delta_config is None and not os.path.isfile(os.path.join(directory, CONFIG_NAME)) \
                and os.path.isfile(os.path.join(directory, PEFT_CONFIG_NAME)):
            delta_class = lora_class_for(cls, read_peft_config(directory))  # refuses another method's class
            delta = load_peft_lora(directory, backbone_model,
                                   delta_class=delta_class if delta_class.delta_type == "lora" else None)
            backbone_model.eval()
            return delta
        config_source = os.path.join(directory, CONFIG_NAME)
        config = read_config_file(directory) if delta_config is None else delta_config
        if isinstance(config, dict):
            try:  # the fields every config has, before anything reads them
                check_mapping(BaseDeltaConfig, config)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{config_source} holds an invalid config: {err}") from err
            from .legacy import is_legacy_config, upgrade_legacy_config

            if is_legacy_config(config):
                config = upgrade_legacy_config(config, backbone_model)
        config = build_config(cls, config, config_source)
        delta_class = class_for(cls, config, config_source)

        if state_dict is None:
            file = weights_file(directory)
            tensors, metadata = read_weights(file)
            legacy = file.endswith(".bin")
            saved_id, config_id = metadata.get(SAVE_ID_KEY), config.extra.get(SAVE_ID_KEY)
            if delta_config is None and saved_id and config_id and saved_id != config_id:
                raise CheckpointError(
                    f"{file} and {config_source} come from two different saves (save_id {saved_id} "
                    f"vs {config_id}): a save was interrupted; save the checkpoint again")
        else:
            file, tensors, legacy = "the state_dict argument", dict(state_dict), False

        if check_hash:
            check_backbone_hash(backbone_model, config, tensors, strict_hash, config_source)

        try:  # a construction that fails takes out what it inserted (DeltaBase.__init__)
            overrides = with_saved_dtype(config, overrides, config_source)
            delta = delta_class.from_config(config, backbone_model, **overrides)
        except Exception as err:
            saved = config.backbone_class
            hint = (f" (the checkpoint was made for a {saved}, this backbone is a "
                    f"{type(backbone_model).__name__})" if saved and saved != type(backbone_model).__name__
                    else "")
            raise CheckpointError(f"{config_source}: cannot rebuild the {config.delta_type} delta on "
                                  f"{type(backbone_model).__name__}{hint}: {err}") from err
        try:
            if legacy:
                from .legacy import convert_legacy_state_dict

                tensors = convert_legacy_state_dict(delta, tensors)
            load_delta_tensors(delta, tensors, strict=True, source=file, allow_missing_buffers=legacy)
        except CheckpointError as err:
            delta.detach()
            saved, current = config.backbone_class, type(backbone_model).__name__
            if saved and saved != current:
                raise CheckpointError(f"{err}. The checkpoint was made for a {saved}, this backbone is "
                                      f"a {current}: load it onto the backbone it was trained on") from None
            raise
        except Exception:
            delta.detach()
            raise
        # A legacy checkpoint's head (classifier.*) stays trainable under freeze_module().
        params = dict(backbone_model.named_parameters())
        backbone_keys = [k for k in tensors if k in params and not is_delta_parameter_name(backbone_model, k)]
        delta.unfrozen_modules = covering_modules(delta.unfrozen_modules, backbone_keys)
        backbone_model.eval()
        return delta
