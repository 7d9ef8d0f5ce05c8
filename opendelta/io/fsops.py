"""File-system steps shared by the transactional writers: fsync, removal, advisory locks
that tell a live save's temporaries from leftovers, and post-commit clean-up."""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from typing import Callable, Optional

try:  # POSIX advisory locks: tell leftovers from the temporaries of a save in progress
    import fcntl
except ImportError:  # pragma: no cover - Windows: every leftover is treated as abandoned
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("opendelta.io.transaction")

NO_FD = -1  # "unlocked" where the platform has no flock


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


def remove_path(path: str) -> None:
    """Remove a file or a directory tree; missing is fine, failures are ignored."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def lock(path: str) -> Optional[int]:
    """A descriptor holding an exclusive flock on ``path``; ``None`` if a live save holds
    it (or it vanished). Closing the descriptor releases the lock, and so does the death of
    the process."""
    if fcntl is None:  # pragma: no cover
        return NO_FD
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


def release(fd: Optional[int]) -> None:
    if fd is not None and fd != NO_FD:
        os.close(fd)


def new_ident() -> str:
    """A unique name part; the fixed-width time first makes identifiers sort in creation order."""
    return f"{time.time_ns():016x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def attempt(action: Callable[[], None]) -> bool:
    try:
        action()
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return False
    return True


def after_commit(action: Callable[[], None], what: str) -> None:
    """Run a clean-up step after the switch: the save has succeeded, a failure here only
    leaves a leftover that the next save or load removes."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - logged, recovered later
        logger.warning("checkpoint saved, but %s failed (%s); the next save or load cleans up", what, err)


