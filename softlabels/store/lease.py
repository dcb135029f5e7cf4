"""One writer per store on object storage: a lease object, created conditionally, with a heartbeat.

Object stores have no ``flock`` and no atomic rename, but S3 (and fsspec's memory and
local filesystems) can create an object only if it does not exist yet (``If-None-Match: *``).
The lease is a numbered object inside the store's prefix, ``_lease/<generation>``, holding
the holder's host, pid and its last heartbeat (``renewed_at``, seconds since the epoch on
the holder's clock). To write, a job creates generation 0, or, when the newest
generation is *stale* (no heartbeat for ``SOFTLABELS_LEASE_TIMEOUT`` seconds, default 60),
the next one, conditionally: of two jobs racing for one generation exactly one wins, and
the other is refused. A live holder's lease is refused with its host, pid and age; a stale
one is taken over and said so. So is, at once, the lease of a holder that has exited on this
very machine: same host, boot (``/proc/sys/kernel/random/boot_id``) and pid namespace, and no
process with its pid (a rerun after a kill or a crash need not wait out the timeout; where any
of the three is unknown or differs, only the timeout decides). The holder renews its object every quarter of the timeout
and checks that no later generation exists; one that does means its lease was taken over
(it stalled past the timeout), and its next commit raises instead of writing.

Clocks: staleness compares the holder's ``renewed_at`` with the newcomer's clock, so the
machines' clocks must agree to well within the timeout (NTP does). Where a filesystem
cannot create conditionally (an fsspec filesystem whose ``pipe_file`` lacks
``mode="create"``), the lease falls back to check-then-create: two jobs started within the
same instant could both proceed; that is said once when the lease is taken.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from softlabels.errors import StoreLocked
from softlabels.store.objects import LEASE_DIR, files_for
from softlabels.store.remote import with_retries

__all__ = ["Lease", "lease_timeout"]


def lease_timeout() -> float:
    """Seconds without a heartbeat after which a lease is stale (``SOFTLABELS_LEASE_TIMEOUT``, default 60)."""
    try:
        value = float(os.environ.get("SOFTLABELS_LEASE_TIMEOUT", "60"))
    except ValueError:
        value = 60.0
    return value if value > 0 else 60.0


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


class Lease:
    """``with Lease(url):`` holds the store's lease, or raises :class:`StoreLocked` (module docstring)."""

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

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
