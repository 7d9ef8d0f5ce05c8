"""AutoDeltaConfig / AutoDeltaModel: build any registered delta from a config."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from torch import nn

from .base import DeltaBase
from .config import BaseDeltaConfig, read_config_json
from .registry import get_delta_class
from ..io.files import read_config_file
from ..io.hub import resolve_checkpoint_dir
from ..io.loading import build_config


class AutoDeltaConfig:
    """Factory of delta configs; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError("AutoDeltaConfig is a factory: use AutoDeltaConfig.from_dict(...) "
                               "or AutoDeltaConfig.from_finetuned(...)")

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides: Any) -> BaseDeltaConfig:
        """The config of the method named by ``config_dict["delta_type"]``.

        Raises:
            ValueError: missing or unknown ``delta_type`` (the message lists known ones).
        """
        if "delta_type" not in config_dict:
            raise ValueError("the config has no 'delta_type' key; it cannot tell which delta to build")
        delta_class = get_delta_class(config_dict["delta_type"])
        return delta_class.config_class.from_dict(config_dict, **overrides)

    @classmethod
    def from_finetuned(cls, finetuned_model_name_or_path: Union[str, "os.PathLike[str]"],
                       cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                       local_files_only: bool = False, force_download: bool = False,
                       revision: Optional[str] = None, token: Optional[Union[str, bool]] = None,
                       **overrides: Any) -> BaseDeltaConfig:
        """The config saved in a checkpoint directory or Hub repo (``config.json``).

        Resolution as in :meth:`AutoDeltaModel.from_finetuned`; keyword ``overrides`` win.

        Raises:
            CheckpointError: no such directory or repo, missing or invalid ``config.json``,
                unknown ``delta_type`` (the message names the file).
        """
        if os.path.isfile(os.fspath(finetuned_model_name_or_path)):  # the JSON file itself
            source = os.fspath(finetuned_model_name_or_path)
            return build_config(cls, {**read_config_json(source), **overrides}, source)
        directory = resolve_checkpoint_dir(finetuned_model_name_or_path, cache_dir=cache_dir,
                                           local_files_only=local_files_only,
                                           force_download=force_download, revision=revision, token=token)
        config_dict = {**read_config_file(directory), **overrides}
        return build_config(cls, config_dict, os.path.join(directory, "config.json"))


class AutoDeltaModel:
    """Factory of delta models; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError("AutoDeltaModel is a factory: use AutoDeltaModel.from_config(...) "
                               "or AutoDeltaModel.from_finetuned(...)")

    @classmethod
    def from_config(cls, config: Union[BaseDeltaConfig, Dict[str, Any]], backbone_model: nn.Module,
                    **overrides: Any) -> DeltaBase:
        """Apply the delta described by ``config`` to ``backbone_model``.

        Keyword ``overrides`` win over the config's values.
        """
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        delta_class = get_delta_class(config.delta_type)
        return delta_class.from_config(config, backbone_model, **overrides)

    @classmethod
    def from_finetuned(cls, finetuned_model_name_or_path: Union[str, "os.PathLike[str]"], backbone_model: nn.Module,
                       delta_config: Optional[Union[BaseDeltaConfig, Dict[str, Any]]] = None,
                       cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                       state_dict: Optional[Dict[str, Any]] = None, *, check_hash: bool = True,
                       strict_hash: bool = False, local_files_only: bool = False,
                       force_download: bool = False, revision: Optional[str] = None,
                       token: Optional[Union[str, bool]] = None, **overrides: Any) -> DeltaBase:
        """Load a saved delta of any registered type onto ``backbone_model``.

        ``finetuned_model_name_or_path`` is a checkpoint directory (ours, one written by OpenDelta
        0.3.x, or a PEFT LoRA adapter) or a Hugging Face Hub repo id. The backbone is put
        in eval mode. See :meth:`opendelta.io.checkpoint.SaveLoadMixin.from_finetuned`
        for every argument.

        Raises:
            CheckpointError: missing or damaged files, unknown delta_type, a checkpoint that
                does not fit the backbone; the backbone is unchanged after a failure.
        """
        return DeltaBase.from_finetuned(
            finetuned_model_name_or_path, backbone_model, delta_config, cache_dir, state_dict,
            check_hash=check_hash, strict_hash=strict_hash, local_files_only=local_files_only,
            force_download=force_download, revision=revision, token=token, **overrides)
