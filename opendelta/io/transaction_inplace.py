"""In-place checkpoint transactions, for a directory that cannot be switched by a rename: a
mount point (a container volume) or a directory whose parent is not writable.

The new checkpoint files are written into a hidden sub-directory ``.opendelta-tmp-<id>``
with a manifest of their names, fsynced, and committed by renaming it
``.opendelta-new-<id>``. Then they are moved over the old files one by one, and the
checkpoint files the new checkpoint lacks are removed (the *apply*). A process that dies
during the apply leaves the committed sub-directory behind: the next save or load of the
directory first finishes the apply (roll forward), so our loaders always read the complete
old checkpoint or the complete new one. Other programs reading the directory while an apply
runs may see a mixture; :mod:`opendelta.io.transaction`'s switch by rename has no such
window and is used wherever it can be.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Tuple

from .fsops import after_commit, fsync_dir, fsync_file, lock, new_ident, release, remove_path
from .names import CHECKPOINT_FILES

MANIFEST = ".opendelta-manifest.json"
_PREFIX = ".opendelta-"


def inner_leftovers(directory: str) -> List[Tuple[str, str]]:
    """``(kind, path)`` of the hidden sub-directories of in-place saves in ``directory``,
    oldest first; ``kind`` is ``"tmp"`` (incomplete) or ``"new"`` (committed)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(_PREFIX) and name != MANIFEST:
            kind, sep, ident = name[len(_PREFIX):].partition("-")
            if kind in ("tmp", "new") and sep and ident:
                found.append((ident, kind, os.path.join(directory, name)))
    return [(kind, path) for _, kind, path in sorted(found)]


def is_inner_entry(name: str) -> bool:
    """A hidden entry of an in-place save (never carried into a new checkpoint)."""
    return name.startswith(_PREFIX)


def _apply(directory: str, new: str) -> None:
    """Move the committed files of ``new`` into ``directory`` and remove the checkpoint files
    it lacks; idempotent, so that recovery can finish an interrupted apply."""
    with open(os.path.join(new, MANIFEST), encoding="utf-8") as f:
        names = set(json.load(f))
    for name in CHECKPOINT_FILES:
        source, target = os.path.join(new, name), os.path.join(directory, name)
        if name in names:
            if os.path.lexists(source):
                os.replace(source, target)
        elif os.path.lexists(target):
            os.remove(target)
    fsync_dir(directory)
    remove_path(new)


def recover_in_place(directory: str) -> None:
    """Finish the newest committed in-place save of ``directory`` and remove the other
    leftovers (those a live save holds are left alone)."""
    held: List[int] = []
    try:
        free = []
        for kind, path in inner_leftovers(directory):
            fd = lock(path)
            if fd is None:
                continue
            held.append(fd)
            free.append((kind, path))
        committed = [path for kind, path in free if kind == "new"]
        if committed:
            _apply(directory, committed[-1])
        for _, path in free:
            if not committed or path != committed[-1]:
                remove_path(path)
    finally:
        for fd in held:
            release(fd)


def save_in_place(directory: str, writers: Dict[str, Callable[[str], None]]) -> str:
    """Save a checkpoint into ``directory`` by the in-place transaction (module docs)."""
    os.makedirs(directory, exist_ok=True)
    recover_in_place(directory)
    ident = new_ident()
    tmp, new = (os.path.join(directory, f"{_PREFIX}{kind}-{ident}") for kind in ("tmp", "new"))
    os.mkdir(tmp, 0o700)
    fd = lock(tmp)
    try:
        try:
            for name, write in writers.items():
                target = os.path.join(tmp, name)
                write(target)
                os.chmod(target, 0o644)
                fsync_file(target)
            manifest = os.path.join(tmp, MANIFEST)
            with open(manifest, "w", encoding="utf-8") as f:
                json.dump(sorted(writers), f)
            fsync_file(manifest)
            fsync_dir(tmp)
            os.replace(tmp, new)  # the commit: from here on the save rolls forward
            fsync_dir(directory)
        except BaseException:
            remove_path(tmp)
            remove_path(new)
            raise
        after_commit(lambda: _apply(directory, new), "moving the new files into place (the next load finishes it)")
    finally:
        release(fd)
    return directory
