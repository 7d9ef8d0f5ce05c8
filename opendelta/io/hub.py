"""Checkpoints on the Hugging Face Hub: resolving a repo id to a local snapshot, uploading.

huggingface_hub is imported only here, when a repo id is used.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

from .files import (CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME,
                               WEIGHTS_NAME, CheckpointError, PathLike, _env_flag)

#: files fetched from the Hub for a checkpoint (whichever exist).
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME,
             "adapter_model.bin"]
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


def looks_like_repo_id(value: str) -> bool:
    """``"name"`` or ``"org/name"`` in the Hub's alphabet (no ``..``, no ``--``, <= 96 chars)."""
    return bool(_REPO_ID.match(value)) and ".." not in value and "--" not in value and len(value) <= 96


def resolve_checkpoint_dir(path_or_repo_id: PathLike, cache_dir: Optional[PathLike] = None,
                           local_files_only: bool = False, force_download: bool = False,
                           revision: Optional[str] = None, token: Optional[Union[str, bool]] = None) -> str:
    """A local directory holding the checkpoint: ``path_or_repo_id`` itself, or the Hub
    snapshot of repo ``path_or_repo_id`` (downloaded or found in the hub cache).

    ``local_files_only=True`` or the environment variable ``HF_HUB_OFFLINE=1`` resolve from
    the hub cache (``cache_dir``, default the huggingface_hub cache) without any network call.

    Raises:
        CheckpointError: a file instead of a directory, a string that is neither a directory
            nor a repo id, or a repo that cannot be found (offline: not in the cache).
    """
    value = os.fspath(path_or_repo_id)
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise CheckpointError(f"{value} is a file; pass the checkpoint directory that holds "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if cache_dir is not None and os.path.isdir(os.path.join(os.fspath(cache_dir), value)):
        return os.path.join(os.fspath(cache_dir), value)
    if not looks_like_repo_id(value):
        raise CheckpointError(f"{value!r} is neither an existing directory nor a Hugging Face Hub "
                              "repo id ('org/name'); check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = bool(local_files_only) or _env_flag("HF_HUB_OFFLINE")
    try:
        return snapshot_download(repo_id=value, revision=revision, cache_dir=cache_dir,
                                 local_files_only=offline, force_download=force_download,
                                 token=token, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError as err:
        where = cache_dir or "the huggingface_hub cache"
        raise CheckpointError(
            f"{value!r} is not a local directory, and the Hub repo {value!r} is not in {where}"
            + (" (offline: HF_HUB_OFFLINE or local_files_only is set)" if offline else
               f" and could not be downloaded ({err})")) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise CheckpointError(f"{value!r} is not a local directory, and the Hub has no such repo or "
                              f"revision: {err}") from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"cannot download {value!r} from the Hub: {err}") from err
    except Exception as err:  # noqa: BLE001 - network errors of whichever HTTP client the hub uses
        if offline:
            raise
        # huggingface_hub 2.x falls back to its cache by itself on connection errors; older
        # releases raise their HTTP client's error: fall back here, the same way.
        try:
            return snapshot_download(repo_id=value, revision=revision, cache_dir=cache_dir,
                                     local_files_only=True, token=token, allow_patterns=HUB_FILES)
        except LocalEntryNotFoundError:
            raise CheckpointError(f"cannot reach the Hub for {value!r} ({type(err).__name__}: {err}), and it "
                                  f"is not in {cache_dir or 'the huggingface_hub cache'}") from err


def push_checkpoint_to_hub(directory: PathLike, repo_id: str, private: Optional[bool] = None,
                           token: Optional[Union[str, bool]] = None,
                           commit_message: str = "Upload delta checkpoint") -> Any:
    """Create Hub repo ``repo_id`` if needed and upload the checkpoint files of ``directory``.

    Returns:
        huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory), repo_type="model",
                             allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
                             commit_message=commit_message)

