"""Transactional checkpoint directories: a save is all or nothing, even when the process dies.

A save never writes into the checkpoint directory. It builds the complete new directory
next to it and switches it into place:

1. leftovers of interrupted saves of this directory are cleaned up (recovery, below);
2. a temporary sibling ``.<name>.opendelta-tmp-<id>`` is created; the files of the directory
   that are no checkpoint files (a ``README.md``, ``metrics.json``, sub-directories) are
   hard-linked into it (copied where the file system has no hard links); the checkpoint
   files are written into it and fsynced, then the sibling itself;
3. the sibling is renamed ``.<name>.opendelta-new-<id>``: from here on it is a complete
   checkpoint (the commit of the content);
4. the switch: a new directory is renamed into place; an existing one is atomically
   exchanged with the new one (Linux ``renameat2(RENAME_EXCHANGE)``), so that readers see
   the old directory or the new one, never a mixture and never nothing. Where the file
   system cannot exchange, the old directory is renamed ``.<name>.opendelta-old-<id>`` and
   the new one into place (two renames: in between the path is missing, which recovery
   repairs);
5. the old directory is removed and the parent fsynced.

The previous checkpoint stays intact until the switch. A save that raises before the switch
removes what it created: the directory is exactly as before. After the switch the save has
succeeded; a failure to remove the old copy only leaves a leftover (logged).

**Recovery** (at the start of every save, and of every load of a local directory): siblings
named ``.<name>.opendelta-{tmp,new,old}-<id>`` are leftovers of interrupted saves, unless a
save in progress holds them (an ``flock`` on the sibling, which the kernel releases when a
process dies). With the directory present they are removed. With the directory missing (a
process died between the two renames of the fallback switch, or before its first checkpoint
was in place) the newest complete one (``new``, else ``old``) is renamed into place and the
rest removed. Leftovers are hidden siblings: they are never read as a checkpoint.

**One rule for formats**: a save replaces *every* checkpoint file of the directory
(:data:`~opendelta.io.names.CHECKPOINT_FILES`: ours, the original library's
``pytorch_model.bin``, PEFT's ``adapter_*``); those it does not write are not carried over,
so a stale checkpoint of another format never stays next to the new one. Other files
survive. A load that finds two formats in one directory refuses (see
:func:`opendelta.io.files.check_single_format`).

**In place** (:mod:`opendelta.io.transaction_inplace`): a directory that cannot be switched
by a rename (a mount point, e.g. a container volume, or one whose parent is not writable) is
saved by a committed hidden sub-directory whose files are then moved into place; recovery
finishes an interrupted move before any load.

One writer at a time per directory: two processes saving into the same directory at once
are not supported (the later switch wins).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from typing import Callable, Dict, List, Tuple

from .fsops import (after_commit, attempt, fsync_dir, fsync_file, lock, new_ident, release,
                    remove_path)
from .names import CHECKPOINT_FILES, CheckpointError, PathLike
from .transaction_inplace import is_inner_entry, recover_in_place, save_in_place

_KINDS = ("tmp", "new", "old")
# Names the tests and callers use for the advisory lock of a sibling.
_lock, _release = lock, release


# =========================================================================== names
def _sibling(parent: str, base: str, kind: str, ident: str) -> str:
    return os.path.join(parent, f".{base}.opendelta-{kind}-{ident}")


def leftovers(directory: PathLike) -> List[Tuple[str, str]]:
    """``(kind, path)`` of the siblings of interrupted (or running) saves of ``directory``,
    oldest first; ``kind`` is ``"tmp"``, ``"new"`` or ``"old"``."""
    parent, base = os.path.split(os.path.realpath(os.fspath(directory)))
    prefix = f".{base}.opendelta-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith(prefix):
            continue
        kind, sep, ident = name[len(prefix):].partition("-")
        if kind in _KINDS and sep and ident:
            found.append((ident, kind, os.path.join(parent, name)))
    return [(kind, path) for _, kind, path in sorted(found)]


def is_stale_temporary(name: str) -> bool:
    """A temporary entry of an earlier save inside a checkpoint directory (a per-file
    ``.config.json.tmp-x``, an in-place save's hidden sub-directory): never carried over."""
    if is_inner_entry(name):
        return True
    return name.startswith(".") and any(name.startswith(f".{f}.") for f in CHECKPOINT_FILES) \
        and (".tmp-" in name or name.endswith(".tmp"))


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the platform or file system cannot (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def _needs_in_place(directory: str) -> bool:
    """The directory cannot be switched by a rename: a mount point, or its parent is not
    writable (then no sibling can be made)."""
    if not os.path.isdir(directory):
        return False
    parent = os.path.dirname(directory)
    return os.path.ismount(directory) or os.stat(parent).st_dev != os.stat(directory).st_dev \
        or not os.access(parent, os.W_OK | os.X_OK)


# =========================================================================== recovery
def recover_directory(directory: PathLike) -> None:
    """Clean up the leftovers of interrupted saves of ``directory`` (see module docs);
    restores the directory from a complete leftover when it is missing, and finishes an
    interrupted in-place save."""
    directory = os.path.realpath(os.fspath(directory))
    parent = os.path.dirname(directory)
    held: List[int] = []
    try:
        free = []
        for kind, path in leftovers(directory):
            fd = lock(path)
            if fd is None:  # a save in progress holds it
                continue
            held.append(fd)
            free.append((kind, path))
        if free:
            if not os.path.lexists(directory):
                complete = [p for k, p in free if k == "new"] or [p for k, p in free if k == "old"]
                if complete:
                    os.replace(complete[-1], directory)
                    free = [(k, p) for k, p in free if p != complete[-1]]
            for _, path in free:
                remove_path(path)
            fsync_dir(parent)
    finally:
        for fd in held:
            release(fd)
    if os.path.isdir(directory):
        recover_in_place(directory)


# =========================================================================== saving
def _carry(source: str, target: str, top: bool = True) -> None:
    """Hard-link (or copy) the entries of ``source`` that are no checkpoint files into
    ``target``; sub-directories are re-created."""
    for entry in os.scandir(source):
        if top and (entry.name in CHECKPOINT_FILES or is_stale_temporary(entry.name)):
            continue
        destination = os.path.join(target, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            os.mkdir(destination)
            shutil.copymode(entry.path, destination)
            _carry(entry.path, destination, top=False)
            fsync_dir(destination)
        else:
            try:
                os.link(entry.path, destination)
            except OSError:  # no hard links here (FAT, some network file systems)
                shutil.copy2(entry.path, destination)
                fsync_file(destination)


def _fill(tmp: str, directory: str, writers: Dict[str, Callable[[str], None]]) -> None:
    if os.path.isdir(directory):
        _carry(directory, tmp)
    for name, write in writers.items():
        target = os.path.join(tmp, name)
        write(target)
        os.chmod(target, 0o644)
        fsync_file(target)
    mode = os.stat(directory).st_mode & 0o7777 if os.path.isdir(directory) else 0o755
    os.chmod(tmp, mode)
    fsync_dir(tmp)


def _switch(new: str, directory: str, old: str) -> None:
    """Put the complete checkpoint ``new`` at ``directory`` (see module docs, step 4)."""
    parent = os.path.dirname(directory)
    cwd = os.getcwd()
    inside = cwd == directory or cwd.startswith(directory + os.sep)
    if not os.path.lexists(directory):
        try:
            os.replace(new, directory)
        except BaseException:
            remove_path(new)
            raise
        after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")
        return
    old_lock = lock(directory)  # keeps recovery by another process off the old copy
    try:
        try:
            exchanged = _exchange(new, directory)
        except BaseException:
            remove_path(new)
            raise
        if exchanged:  # ``new`` now names the old directory
            def retire() -> None:
                try:
                    os.replace(new, old)
                except OSError:
                    remove_path(new)
                    raise
                remove_path(old)
            after_commit(retire, "removing the previous checkpoint")
        else:
            try:
                os.replace(directory, old)
            except BaseException:
                remove_path(new)
                raise
            try:
                os.replace(new, directory)
            except BaseException:
                if attempt(lambda: os.replace(old, directory)):  # rolled back
                    remove_path(new)
                # else: the path is missing; the next save or load rolls ``new`` forward
                raise
            after_commit(lambda: remove_path(old), "removing the previous checkpoint")
    finally:
        release(old_lock)
    if inside:  # the process's working directory was the old directory (or inside it)
        after_commit(lambda: os.chdir(cwd), "re-entering the working directory")
    after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")


def write_files_atomically(directory: PathLike, writers: Dict[str, Callable[[str], None]]) -> str:
    """Save a checkpoint directory as one transaction (see module docs).

    Args:
        directory: the checkpoint directory (created if absent; a symlink is followed).
        writers: file name -> function writing that file at the path it is given.

    Returns:
        the absolute path of the directory.

    Raises:
        CheckpointError: ``directory`` is a file, or neither it nor its parent can be
            written. Any error of a writer or of the file system before the switch
            propagates with the directory unchanged.
    """
    directory = os.path.realpath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it is a file; pass a directory")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    recover_directory(directory)
    if _needs_in_place(directory):
        return save_in_place(directory, writers)
    ident = new_ident()
    tmp, new, old = (_sibling(parent, base, kind, ident) for kind in _KINDS)
    try:
        os.mkdir(tmp, 0o700)
    except PermissionError as err:
        raise CheckpointError(f"cannot save to {directory}: its parent {parent} is not writable ({err}) "
                              "and the directory does not exist yet; create it first (a checkpoint is "
                              "then saved inside it) or choose a writable location") from err
    fd = lock(tmp)
    try:
        try:
            _fill(tmp, directory, writers)
            os.replace(tmp, new)  # the commit of the content: ``new`` is a complete checkpoint
            fsync_dir(parent)
        except BaseException:
            remove_path(tmp)
            remove_path(new)
            raise
        _switch(new, directory, old)
    finally:
        release(fd)
    return directory


def write_file_atomically(path: PathLike, write: Callable[[str], None]) -> str:
    """Write one file through a temporary file next to it, fsync and ``os.replace``:
    readers see the old file or the new one, never a partial one."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{new_ident()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")
    return path
