"""Files of a delta checkpoint: names, atomic writing, strict reading.

Writes are atomic: a new checkpoint directory is written under a temporary name and renamed
into place; in an existing directory each file is written to a temporary file and renamed
over the old one, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Tuple, Union

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: safetensors metadata / config key tying a weights file to its config.json.
SAVE_ID_KEY = "opendelta_save_id"
STRUCTURE_HASH_KEY = "backbone_structure_hash"
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the backbone (the message says why)."""


class BackboneHashWarning(UserWarning):
    """The backbone differs from the one the checkpoint was trained on."""


# =========================================================================== small helpers
def library_versions() -> Dict[str, str]:
    """Versions of the libraries that matter to a checkpoint, read without importing them."""
    from ..version import __version__

    out = {"opendelta_version": __version__, "torch_version": torch.__version__.split("+")[0]}
    for package in ("transformers", "safetensors"):
        try:
            out[f"{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _short_list(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_files_atomically(directory: PathLike, writers: Dict[str, Callable[[str], None]]) -> str:
    """Write the files of a checkpoint so that a crash never leaves a half-written one.

    Args:
        directory: the checkpoint directory (created if absent).
        writers: file name -> function writing that file at the path it is given. Files
            are put in place in this order (put the config last).

    A new directory is filled under a temporary name and renamed into place. In an
    existing directory every file is first written to a temporary file next to it, then
    renamed over the old one; other files in the directory are kept.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it is a file; pass a directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if not os.path.exists(directory):
        tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
        try:
            os.chmod(tmp_dir, 0o755)
            for name, write in writers.items():
                target = os.path.join(tmp_dir, name)
                write(target)
                os.chmod(target, 0o644)
                _fsync_file(target)
            _fsync_dir(tmp_dir)
            try:
                os.replace(tmp_dir, directory)
            except OSError:
                if not os.path.isdir(directory):
                    raise
                # Created meanwhile by someone else: fall back to per-file replacement.
                _replace_files(directory, {n: os.path.join(tmp_dir, n) for n in writers})
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _fsync_dir(parent)
        return directory
    temps: Dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
            os.close(fd)
            temps[name] = tmp
            write(tmp)
            os.chmod(tmp, 0o644)
            _fsync_file(tmp)
        _replace_files(directory, temps)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return directory


def _replace_files(directory: str, sources: Dict[str, str]) -> None:
    for name, source in sources.items():
        os.replace(source, os.path.join(directory, name))
    _fsync_dir(directory)


# =========================================================================== reading files
def read_json_object(path: str, missing_hint: str) -> Dict[str, Any]:
    """The JSON object in file ``path``; :class:`CheckpointError` (with ``missing_hint`` if
    the file is absent) when it is missing, not valid JSON or not an object."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {missing_hint}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is damaged") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def read_config_file(directory: PathLike) -> Dict[str, Any]:
    """The dict in ``directory/config.json``; :class:`CheckpointError` if absent or invalid."""
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    return read_json_object(os.path.join(os.fspath(directory), CONFIG_NAME),
                            f"a delta checkpoint directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                            f"(found: {present or 'nothing'})")


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
