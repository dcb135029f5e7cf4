"""Object storage under a Zarr store: retries with backoff, an optional local cache, and file operations.

* **Retries.** Every request (zarr's chunk and metadata GETs and PUTs, and the listings and
  reads the backend makes itself) is retried on *transient* errors only (5xx and throttling,
  which s3fs raises as generic ``OSError``; timeouts; dropped connections), with exponential
  backoff from 0.2 s up to 5 s, ``SOFTLABELS_STORAGE_RETRIES`` attempts in all (default 8).
  A retry repeats the whole request: an object is read whole or not at all, so a retry
  can never turn into wrong data (and each unit is checksum-verified as it is read). Past
  the budget: :class:`~softlabels.errors.StorageUnavailable`, one line; rerunning resumes.
  A missing object or a denied access is never retried.
* **Cache** (``SOFTLABELS_CACHE_DIR``, capped at ``SOFTLABELS_CACHE_MAX_BYTES``, default
  10 GiB): chunk objects of a *complete* store read through it are kept as files named
  by a hash of (URL, the store's root metadata, key); a store rewritten under the same URL
  gets new root metadata, so a stale entry is never read. Oldest files go first when the
  cap is passed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from zarr.storage import WrapperStore

from softlabels.errors import StorageUnavailable

__all__ = ["CachedRetryStore", "RemoteFiles", "is_transient", "with_retries"]

T = TypeVar("T")
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = ("Timeout", "Connection", "ServerDisconnected", "ClientPayload", "ClientOS", "IncompleteRead")


def retry_budget() -> int:
    raw = os.environ.get("SOFTLABELS_STORAGE_RETRIES", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 8


def is_transient(err: BaseException) -> bool:
    """A 5xx, throttling, timeout or dropped connection: worth the same request again."""
    if isinstance(err, _PERMANENT):
        return False
    if isinstance(err, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    if any(word in type(err).__name__ for word in _TRANSIENT_NAMES):
        return True
    return type(err) is OSError  # s3fs's translation of a 5xx, SlowDown, ... (others are subclasses)


def _backoff(where: str, attempt: int, budget: int, err: Exception) -> float:
    """The delay before retrying after ``err`` failed attempt ``attempt``; raises when there is no retry."""
    if not is_transient(err):
        raise err
    if attempt + 1 == budget:
        reason = " ".join(str(err).split())[:120]
        raise StorageUnavailable(f"{where}: object storage failed {budget} times in a row ({type(err).__name__}: "
                                 f"{reason}); it is unavailable or overloaded: rerun the same command later, it "
                                 "resumes") from None
    return min(5.0, 0.2 * 2 ** attempt)


def with_retries(where: str, call: Callable[[], T]) -> T:
    """``call()``, repeated on transient errors with backoff (module docstring)."""
    budget = retry_budget()
    for attempt in range(budget):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - _backoff re-raises what is not transient
            time.sleep(_backoff(where, attempt, budget, err))
    raise AssertionError("unreachable")


class CachedRetryStore(WrapperStore):
    """A zarr store whose requests are retried (module docstring), and whose reads go through ``cache`` if any."""

    def __init__(self, store: Any, where: str = "", cache: DiskCache | None = None) -> None:
        super().__init__(store)
        self._where, self._cache = where, cache

    def _with_store(self, store: Any) -> CachedRetryStore:
        return type(self)(store, self._where, self._cache)

    async def _retry(self, call: Callable[[], Any]) -> Any:
        budget = retry_budget()
        for attempt in range(budget):
            try:
                return await call()
            except Exception as err:  # noqa: BLE001 - _backoff re-raises what is not transient
                await asyncio.sleep(_backoff(self._where, attempt, budget, err))

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        cache = self._cache if byte_range is None and not key.endswith("zarr.json") else None
        if cache is not None and (raw := cache.get(key)) is not None:
            return prototype.buffer.from_bytes(raw)
        value = await self._retry(lambda: self._store.get(key, prototype, byte_range))
        if cache is not None and value is not None:
            cache.put(key, value.to_bytes())
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        return await self._retry(lambda: self._store.get_partial_values(prototype, key_ranges))

    async def set(self, key: str, value: Any) -> None:
        await self._retry(lambda: self._store.set(key, value))

    async def exists(self, key: str) -> bool:
        return await self._retry(lambda: self._store.exists(key))


class DiskCache:
    """Whole objects of one store version as local files, the oldest evicted past ``max_bytes``."""

    def __init__(self, folder: str | Path, namespace: str, max_bytes: int) -> None:
        self.folder = Path(folder) / hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root, self.max_bytes = Path(folder), max_bytes

    @classmethod
    def from_env(cls, url: str, root_meta: bytes) -> DiskCache | None:
        folder = os.environ.get("SOFTLABELS_CACHE_DIR")
        if not folder:
            return None
        raw = os.environ.get("SOFTLABELS_CACHE_MAX_BYTES", "")
        cap = int(raw) if raw.isdigit() else 10 << 30
        return cls(folder, url + "\0" + hashlib.sha256(root_meta).hexdigest(), cap)

    def _file(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        try:
            return self._file(key).read_bytes()
        except OSError:
            return None

    def put(self, key: str, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            return
        file = self._file(key)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, file)  # whole or absent, whatever process reads it
        self._evict()

    def _evict(self) -> None:
        files = [(e.stat().st_mtime, e.stat().st_size, e.path) for d in os.scandir(self.root) if d.is_dir()
                 for e in os.scandir(d.path) if e.is_file()]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass


class RemoteFiles:
    """The few file operations the Zarr backend makes itself, on an fsspec filesystem under ``root``,
    retried on transient errors. Paths are relative to the store (``"logits/zarr.json"``)."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def read(self, rel: str, limit: int) -> bytes:
        """The object's bytes (at most ``limit``); FileNotFoundError if absent."""
        return with_retries(self.url, lambda: self.fs.cat_file(self._abs(rel), start=0, end=limit))

    def isfile(self, rel: str) -> bool:
        return with_retries(self.url, lambda: self.fs.isfile(self._abs(rel)))

    def listing(self, rel: str) -> list[tuple[str, bool]]:
        """``(name, is_directory)`` of the entries under ``rel`` (none if absent), fresh from the server."""
        def call() -> list[tuple[str, bool]]:
            self.fs.invalidate_cache()
            try:
                entries = self.fs.ls(self._abs(rel), detail=True)
            except FileNotFoundError:
                return []
            return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory") for e in entries]
        return with_retries(self.url, call)

    def total_bytes(self) -> int:
        self.fs.invalidate_cache()
        return int(with_retries(self.url, lambda: self.fs.du(self.root, total=True)))
