"""One writer per store: an exclusive flock beside a local store, a lease object inside a store at a URL.

Local: an ``fcntl.flock`` on the sibling file ``STORE.lock`` (a Zarr store is a directory and an HDF5
file may not exist yet). The kernel drops a flock when its holder dies, so only a *live* holder blocks;
forked children (DataLoader workers) close their copy at once. At a URL: the lease protocol of
docs/FORMAT.md ("Stores at URLs"): a numbered object ``_lease/<generation>`` created conditionally,
renewed by a heartbeat, taken over when stale or when its holder has exited on this machine.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

from softlabels.errors import StoreLocked
from softlabels.store.location import store_location
from softlabels.store.remote import LEASE_DIR, files_for, with_retries

__all__ = ["Lease", "StoreLock", "lock_path", "store_lock"]

_HELD: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def _drop_in_child() -> None:
    """After ``fork``, in the child: close the inherited descriptors (the parent keeps its lock)."""
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def store_lock(store: str | Path, say: Callable[[str], None] | None = None) -> StoreLock | Lease:
    """The guard of one writer for ``store``: this lock for a local store, a
    :class:`Lease` (inside the prefix) for one at a URL. Both have
    ``acquire``, ``release`` and ``check``."""
    where = store_location(store)
    return Lease(where, say=say) if isinstance(where, str) else StoreLock(where)


def lock_path(store: str | Path) -> Path:
    """``out.zarr`` -> ``out.zarr.lock`` beside the store's *real* path (never inside it), so every
    path to one store (a symlink to it, or to a folder above it) names the same lock."""
    store = Path(os.path.realpath(store))
    return store.with_name(store.name + ".lock")


class _Guard:
    """``with guard:`` holds it (``acquire``, or :class:`StoreLocked`), then ``release``s it."""

    def __enter__(self) -> Any:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StoreLock(_Guard):
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


def lease_timeout() -> float:
    """Seconds without a heartbeat after which a lease is stale (``SOFTLABELS_LEASE_TIMEOUT``, default 60;
    a value that is not a number in (0, 1e9) is the default)."""
    try:
        value = float(os.environ.get("SOFTLABELS_LEASE_TIMEOUT", "60"))
    except ValueError:
        value = 60.0
    return value if 0 < value < 1e9 else 60.0  # NaN and inf fail too: a heartbeat's timestamp must exist


@functools.cache  # read once per process, not at every heartbeat
def _machine() -> dict[str, str | None]:
    """What makes a holder's pid comparable with this process's: the host, its boot and the pid namespace."""
    try:
        boot: str | None = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    try:
        namespace: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot_id": boot, "pid_ns": namespace}


def _number(value: object, default: float) -> float:
    """A lease field as a float (a torn or hand-edited one: ``default``)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return default


def _exited_here(info: dict) -> bool:
    """Whether the lease's holder was a process of this machine (host, boot, pid namespace) that no longer exists."""
    here = _machine()
    pid = info.get("pid")
    if any(v is None or info.get(k) != v for k, v in here.items()) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # it exists, as another user's process; or no pid of this kernel
        return False
    return False


class Lease(_Guard):
    """``with Lease(url):`` holds the store's lease, or raises :class:`StoreLocked` (docs/FORMAT.md)."""

    def __init__(self, url: str, say: Callable[[str], None] | None = None) -> None:
        self.url, self.say = url, say or (lambda _line: None)
        self.timeout = lease_timeout()
        self.owner = uuid.uuid4().hex
        self.generation: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files = files_for(url)

    def _key(self, generation: int) -> str:
        return f"{self._files.root}/{LEASE_DIR}/{generation:010d}"

    def _generations(self) -> list[int]:
        return sorted(int(n) for n, is_dir in self._files.listing(LEASE_DIR) if not is_dir and n.isdigit())

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, **_machine(), "pid": os.getpid(), "renewed_at": time.time(),
                           "timeout_s": self.timeout}).encode()

    def _create(self, generation: int) -> bool:
        """Conditionally create the generation's object; False if it exists (another writer won)."""
        fs, key = self._files.fs, self._key(generation)
        try:
            with_retries(self.url, lambda: fs.pipe_file(key, self._body(), mode="create"))
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # no conditional create here: the documented fallback
            self.say(f"{self.url}: this filesystem cannot create an object conditionally; the lease is checked, "
                     "then created (two writers started at the same instant could both proceed)")
            if with_retries(self.url, lambda: fs.exists(key)):
                return False
            with_retries(self.url, lambda: fs.pipe_file(key, self._body()))
            return True

    def _read(self, generation: int) -> dict | None:
        try:
            info = json.loads(self._files.read(f"{LEASE_DIR}/{generation:010d}", 1 << 16))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign: treat as a lease with no heartbeat
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> None:
        for _ in range(5):
            generations = self._generations()
            stale = None
            if generations:
                top = generations[-1]
                info = self._read(top)
                if info is None:  # released meanwhile
                    continue
                age = time.time() - _number(info.get("renewed_at"), 0.0)
                limit = _number(info.get("timeout_s"), self.timeout)
                limit = limit if limit > 0 else self.timeout
                who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
                exited = _exited_here(info)
                if age < limit and not exited:
                    raise StoreLocked(
                        f"{self.url!r} is being written by another job ({who}, heartbeat {max(age, 0):.0f} s ago); "
                        f"wait for it to finish or stop it, then rerun (a lease without a heartbeat for {limit:.0f} s "
                        "is taken over)")
                why = "the process has exited" if exited else f"no heartbeat for {age:.0f} s"
                stale, generation = (who, why), top + 1
            else:
                generation = 0
            if not self._create(generation):
                continue  # another job took this generation first: look again
            self.generation = generation
            if stale is not None:
                self.say(f"{self.url}: took over the lease of a writer that stopped ({stale[0]}, {stale[1]})")
            self._thread = threading.Thread(target=self._beat, name="softlabels-lease", daemon=True)
            self._thread.start()
            return
        raise StoreLocked(f"{self.url!r}: other jobs keep taking its lease; stop them, then rerun")

    def _beat(self) -> None:
        period = max(0.2, self.timeout / 4)
        while not self._stop.wait(period):
            try:
                if any(g > self.generation for g in self._generations()):
                    self.lost = True
                    return
                with_retries(self.url, lambda: self._files.fs.pipe_file(self._key(self.generation), self._body()))
            except Exception:  # noqa: BLE001 - a missed heartbeat: the next one tries again
                continue

    def check(self) -> None:
        """Raise if another job has taken the lease over (this one stalled past the timeout)."""
        if self.lost:
            raise StoreLocked(f"{self.url!r}: this job stalled for over {self.timeout:.0f} s and another job took its "
                              "lease over; nothing more was written: let that job finish, or stop it and rerun")

    def release(self) -> None:
        """Stop the heartbeat and delete this lease and the stale ones before it (never a later one)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is None or self.lost:
            return
        for g in self._generations():
            if g <= self.generation:
                try:
                    with_retries(self.url, lambda g=g: self._files.fs.rm(self._key(g)))
                except FileNotFoundError:
                    pass
        self.generation = None
