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

One writer at a time per directory: two processes saving into the same directory at once
are not supported (the later switch wins). The parent directory must be writable.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

from .names import CHECKPOINT_FILES, CheckpointError, PathLike

try:  # POSIX advisory locks: tell leftovers from the siblings of a save in progress
    import fcntl
except ImportError:  # pragma: no cover - Windows: every leftover is treated as abandoned
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_KINDS = ("tmp", "new", "old")
_NO_FD = -1  # "unlocked" where the platform has no flock


# =========================================================================== small helpers
def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """fsync a directory, so that the entries created or renamed in it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def _lock(path: str) -> Optional[int]:
    """A descriptor holding an exclusive flock on ``path``; ``None`` if a live save holds
    it (or it vanished). Closing the descriptor releases the lock."""
    if fcntl is None:  # pragma: no cover
        return _NO_FD
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: Optional[int]) -> None:
    if fd is not None and fd != _NO_FD:
        os.close(fd)


def _sibling(parent: str, base: str, kind: str, ident: str) -> str:
    return os.path.join(parent, f".{base}.opendelta-{kind}-{ident}")


def _new_ident() -> str:
    # Fixed-width time first: identifiers sort in creation order.
    return f"{time.time_ns():016x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    """A temporary file of an earlier per-file save (``.config.json.tmp-x``) inside a
    checkpoint directory: never carried into a new checkpoint."""
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


# =========================================================================== recovery
def recover_directory(directory: PathLike) -> None:
    """Clean up the leftovers of interrupted saves of ``directory`` (see module docs);
    restores the directory from a complete leftover when it is missing."""
    directory = os.path.realpath(os.fspath(directory))
    parent = os.path.dirname(directory)
    held: List[int] = []
    try:
        free = []
        for kind, path in leftovers(directory):
            fd = _lock(path)
            if fd is None:  # a save in progress holds it
                continue
            held.append(fd)
            free.append((kind, path))
        if not free:
            return
        if not os.path.lexists(directory):
            complete = [p for k, p in free if k == "new"] or [p for k, p in free if k == "old"]
            if complete:
                os.replace(complete[-1], directory)
                free = [(k, p) for k, p in free if p != complete[-1]]
        for _, path in free:
            _remove(path)
        fsync_dir(parent)
    finally:
        for fd in held:
            _release(fd)


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
            except OSError:  # no hard links here (another device, FAT, ...)
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


def _attempt(action: Callable[[], None]) -> bool:
    try:
        action()
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return False
    return True


def _after_commit(action: Callable[[], None], what: str) -> None:
    """Run a clean-up step after the switch: the save has succeeded, a failure here only
    leaves a leftover that the next save or load removes."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - logged, recovered later
        logger.warning("checkpoint saved, but %s failed (%s); the next save or load cleans up", what, err)


def _switch(new: str, directory: str, old: str) -> None:
    """Put the complete checkpoint ``new`` at ``directory`` (see module docs, step 4)."""
    parent = os.path.dirname(directory)
    if not os.path.lexists(directory):
        try:
            os.replace(new, directory)
        except BaseException:
            _remove(new)
            raise
        _after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")
        return
    old_lock = _lock(directory)  # keeps recovery by another process off the old copy
    try:
        try:
            exchanged = _exchange(new, directory)
        except BaseException:
            _remove(new)
            raise
        if exchanged:  # ``new`` now names the old directory
            def retire() -> None:
                try:
                    os.replace(new, old)
                except OSError:
                    _remove(new)
                    raise
                _remove(old)
            _after_commit(retire, "removing the previous checkpoint")
        else:
            try:
                os.replace(directory, old)
            except BaseException:
                _remove(new)
                raise
            try:
                os.replace(new, directory)
            except BaseException:
                if _attempt(lambda: os.replace(old, directory)):  # rolled back
                    _remove(new)
                # else: the path is missing; the next save or load rolls ``new`` forward
                raise
            _after_commit(lambda: _remove(old), "removing the previous checkpoint")
    finally:
        _release(old_lock)
    _after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")


def write_files_atomically(directory: PathLike, writers: Dict[str, Callable[[str], None]]) -> str:
    """Save a checkpoint directory as one transaction (see module docs).

    Args:
        directory: the checkpoint directory (created if absent; a symlink is followed).
        writers: file name -> function writing that file at the path it is given.

    Returns:
        the absolute path of the directory.

    Raises:
        CheckpointError: ``directory`` is a file, or its parent is not writable. Any error
            of a writer or of the file system before the switch propagates with the
            directory unchanged.
    """
    directory = os.path.realpath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it is a file; pass a directory")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    recover_directory(directory)
    ident = _new_ident()
    tmp, new, old = (_sibling(parent, base, kind, ident) for kind in _KINDS)
    try:
        os.mkdir(tmp, 0o700)
    except PermissionError as err:
        raise CheckpointError(f"cannot save to {directory}: its parent {parent} is not writable ({err}). "
                              "A checkpoint is written next to its directory and switched into place by "
                              "a rename; choose a directory whose parent you can write") from err
    lock = _lock(tmp)
    try:
        try:
            _fill(tmp, directory, writers)
            os.replace(tmp, new)  # the commit of the content: ``new`` is a complete checkpoint
            fsync_dir(parent)
        except BaseException:
            _remove(tmp)
            _remove(new)
            raise
        _switch(new, directory, old)
    finally:
        _release(lock)
    return directory


def write_file_atomically(path: PathLike, write: Callable[[str], None]) -> str:
    """Write one file through a temporary file next to it, fsync and ``os.replace``:
    readers see the old file or the new one, never a partial one."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{_new_ident()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _after_commit(lambda: fsync_dir(parent), "fsync of the parent directory")
    return path
