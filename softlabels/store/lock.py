"""An exclusive, non-blocking lock on a store, held by the job writing it.

The lock is an ``fcntl.flock`` on a sibling file ``STORE.lock`` (a Zarr store is a
directory and an HDF5 file may not exist yet, so the store itself cannot be
locked). The kernel drops a flock when its holder dies, so a lock file left by a
killed job never blocks the next one: only a *live* holder does. A flock belongs to
the open file, which ``fork`` shares: forked children (DataLoader workers) close their
copy at once, so a worker left behind by a killed job never holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path
from typing import Any, Callable

from softlabels.errors import StoreLocked
from softlabels.store.location import store_location

__all__ = ["StoreLock", "lock_path", "store_lock"]

_HELD: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def _drop_in_child() -> None:
    """After ``fork``, in the child: close the inherited descriptors (the parent keeps its lock)."""
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def store_lock(store: str | Path, say: Callable[[str], None] | None = None) -> Any:
    """The guard of one writer for ``store``: this lock for a local store, a
    :class:`~softlabels.store.lease.Lease` (inside the prefix) for one at a URL. Both have
    ``acquire``, ``release`` and ``check``."""
    where = store_location(store)
    if isinstance(where, str):
        from softlabels.store.lease import Lease

        return Lease(where, say=say)
    return StoreLock(where)


def lock_path(store: str | Path) -> Path:
    """``out.zarr`` -> ``out.zarr.lock`` beside the store's *real* path (never inside it).

    Symlinks are resolved first, so every path to one store (a symlink to it, or to a
    folder above it) names the same lock.
    """
    store = Path(os.path.realpath(store))
    return store.with_name(store.name + ".lock")


class StoreLock:
    """``with StoreLock(path):`` holds the store's lock, or raises :class:`StoreLocked`."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.path = lock_path(store)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                try:
                    pid = self.path.read_text().strip()
                except OSError:
                    pid = ""
                holder = f" (pid {pid})" if pid.isdigit() else ""
                raise StoreLocked(
                    f"{str(self.store)!r} is being written by another job{holder} (lock {str(self.path)!r}); "
                    "wait for it to finish or stop it, then rerun"
                ) from None
            # The previous holder may have unlinked the file between our open and our
            # flock; then we hold a lock on a dead inode. Retry on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _HELD.add(self)

    def check(self) -> None:
        """A flock is never taken away from a live holder: nothing to check."""

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one else can own it) and unlock."""
        _HELD.discard(self)
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
