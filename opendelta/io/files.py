"""Files of a delta checkpoint: names, transactional writing, strict reading.

Saves are transactions (:mod:`opendelta.io.transaction`): the directory shows the complete
old checkpoint or the complete new one, never a mixture, even when the process dies. A
directory holding two checkpoints of different formats (written by other tools, or by
earlier versions that updated files one by one) is refused when loading, see
:func:`check_single_format`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from typing import Any, Dict, List, Tuple

import torch

from ..core.config import load_json_object
from .names import (CHECKPOINT_FILES, CONFIG_NAME, FORMATS, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME,
                    PEFT_LEGACY_WEIGHTS_NAME, PEFT_WEIGHTS_NAME, SAVE_ID_KEY, STRUCTURE_HASH_KEY, WEIGHTS_NAME,
                    BackboneHashWarning, CheckpointError, PathLike)
from .transaction import recover_directory, write_file_atomically, write_files_atomically

__all__ = ["CHECKPOINT_FILES", "CONFIG_NAME", "LEGACY_WEIGHTS_NAME", "PEFT_CONFIG_NAME", "PEFT_LEGACY_WEIGHTS_NAME",
           "PEFT_WEIGHTS_NAME", "SAVE_ID_KEY", "STRUCTURE_HASH_KEY", "WEIGHTS_NAME", "BackboneHashWarning",
           "CheckpointError", "PathLike", "check_single_format", "library_versions", "prepare_to_read",
           "read_config_file", "read_json_object", "read_weights", "weights_file", "write_file_atomically",
           "write_files_atomically"]


# =========================================================================== small helpers
def library_versions() -> Dict[str, str]:
    """Versions of the libraries that matter to a checkpoint, read without importing them."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> Tuple[Tuple[str, str], ...]:
    # Installed packages do not change under a running process: read their metadata once.
    from ..version import __version__

    out = {"opendelta_version": __version__, "torch_version": torch.__version__.split("+")[0]}
    for package in ("transformers", "safetensors"):
        try:
            out[f"{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _short_list(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# =========================================================================== reading files
def read_json_object(path: str, missing_hint: str) -> Dict[str, Any]:
    """The JSON object in file ``path``; :class:`CheckpointError` (with ``missing_hint`` if
    the file is absent) when it is missing, not valid JSON or not an object."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {missing_hint}")
    try:
        return load_json_object(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def read_config_file(directory: PathLike) -> Dict[str, Any]:
    """The dict in ``directory/config.json``; :class:`CheckpointError` if absent or invalid."""
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    return read_json_object(os.path.join(os.fspath(directory), CONFIG_NAME),
                            f"a delta checkpoint directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                            f"(found: {present or 'nothing'})")


def check_single_format(directory: PathLike) -> None:
    """Refuse a directory that holds the files of two checkpoint formats (see
    :data:`opendelta.io.names.FORMATS`): which one is current cannot be told, and loading
    the stale one would be silent.

    Raises:
        CheckpointError: naming the files of each format and the fix.
    """
    directory = os.fspath(directory)
    present = {fmt: [f for f in files if os.path.isfile(os.path.join(directory, f))]
               for fmt, files in FORMATS.items()}
    found = {fmt: files for fmt, files in present.items() if files}
    if len(found) > 1:
        listed = "; ".join(f"{fmt}: {', '.join(files)}" for fmt, files in found.items())
        raise CheckpointError(
            f"{directory} holds checkpoints of {len(found)} formats ({listed}); which one is current "
            "cannot be told. Save the delta again (a save replaces every checkpoint file of its "
            "directory) or delete the stale files")


def prepare_to_read(directory: PathLike) -> None:
    """Before loading a local checkpoint directory: clean up leftovers of interrupted saves
    (best effort: a read-only location is read as it is), then refuse mixed formats."""
    try:
        recover_directory(directory)
    except OSError:
        pass
    if os.path.isdir(directory):
        check_single_format(directory)


def weights_file(directory: PathLike) -> str:
    """Path of the weights file of a checkpoint directory (safetensors preferred)."""
    directory = os.fspath(directory)
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{os.path.join(directory, WEIGHTS_NAME)} is missing: the checkpoint "
                          f"directory {directory} holds no {WEIGHTS_NAME} (nor a legacy "
                          f"{LEGACY_WEIGHTS_NAME}); was the save interrupted?")


def read_weights(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a weights file (``.safetensors``, or a legacy ``.bin`` read
    with ``torch.load(weights_only=True)``), on the CPU.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or no tensor mapping inside.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f"{path} cannot be read with torch.load(weights_only=True): {err}. "
                                  "The file is damaged or holds more than tensors.") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
        return dict(state), {}
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}); it is truncated or "
                              "corrupt: save the checkpoint again") from err
    return tensors, metadata


def write_peft_adapter(directory: PathLike, adapter_config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> str:
    """Write a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    as one transaction; returns its absolute path."""
    text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"

    def write_weights(target: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, target, metadata={"format": "pt"})

    def write_config(target: str) -> None:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)

    return write_files_atomically(directory, {PEFT_WEIGHTS_NAME: write_weights, PEFT_CONFIG_NAME: write_config})


def read_peft_adapter(directory: PathLike) -> Tuple[Dict[str, Any], str]:
    """``(adapter_config dict, its path)`` of a PEFT adapter directory, after the same
    preparation as any checkpoint (recovery, one format only).

    Raises:
        CheckpointError: no or a damaged ``adapter_config.json``.
    """
    directory = os.fspath(directory)
    prepare_to_read(directory)
    source = os.path.join(directory, PEFT_CONFIG_NAME)
    return read_json_object(source, "not a PEFT adapter directory"), source


def peft_weights_file(directory: PathLike) -> str:
    """The weights file of a PEFT adapter directory (safetensors preferred).

    Raises:
        CheckpointError: there is none.
    """
    directory = os.fspath(directory)
    for name in (PEFT_WEIGHTS_NAME, PEFT_LEGACY_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{os.path.join(directory, PEFT_WEIGHTS_NAME)} is missing: the PEFT adapter "
                          "directory has no weights")
