"""Zarr stores on object storage: opening one at a URL, retries with backoff, a local cache, file operations.

A store at a URL is the set of objects under its prefix. Opening it checks the bucket first; creating
one empties the prefix but for the writer's lease, and only if it holds nothing or a softlabels store.
The retry and cache rules are in docs/SCALE.md ("Retries and the cache").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from zarr.storage import WrapperStore

from softlabels.errors import NotAStore, StorageUnavailable, StoreNotFound
from softlabels.store.format import env_int
from softlabels.store.location import (
    check_root,
    filesystem,
    storage_options,
    store_location,
)

__all__ = ["CachedRetryStore", "RemoteFiles", "clear_prefix", "open_remote", "store_exists", "with_retries"]

LEASE_DIR = "_lease"  # the writer's lease objects (softlabels.store.lock); never a zarr node

T = TypeVar("T")
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = ("Timeout", "Connection", "ServerDisconnected", "ClientPayload", "ClientOS", "IncompleteRead")


def retry_budget() -> int:
    return env_int("SOFTLABELS_STORAGE_RETRIES", 8)


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
    """``call()``, repeated on transient errors with backoff (docs/SCALE.md)."""
    budget = retry_budget()
    for attempt in range(budget):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - _backoff re-raises what is not transient
            time.sleep(_backoff(where, attempt, budget, err))
    raise AssertionError("unreachable")


class CachedRetryStore(WrapperStore):
    """A zarr store whose requests are retried (docs/SCALE.md), and whose reads go through ``cache`` if any."""

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
        cap = env_int("SOFTLABELS_CACHE_MAX_BYTES", 10 << 30, low=0)
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


def files_for(url: str) -> RemoteFiles:
    """The store's :class:`RemoteFiles`, after checking its bucket."""
    fs, root = filesystem(url)
    with_retries(url, lambda: check_root(fs, url, root))
    return RemoteFiles(fs, root, url)


def store_exists(path: str | os.PathLike[str]) -> bool:
    """Whether a store (or anything else) is at ``path``: a local file or folder, or objects under a URL
    (the writer's lease aside)."""
    where = store_location(path)
    return bool(_contents(files_for(where))) if isinstance(where, str) else where.exists()


def _contents(files: RemoteFiles) -> list[str]:
    return [name for name, _ in files.listing("") if name != LEASE_DIR]


def _holds_a_store(files: RemoteFiles) -> bool:
    try:
        attrs = json.loads(files.read("zarr.json", 1 << 24)).get("attributes") or {}
    except (FileNotFoundError, ValueError, AttributeError):
        return False
    return "softlabels_format" in attrs


def _foreign(url: str, names: list[str]) -> NotAStore:
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    return NotAStore(f"{url!r} holds other objects ({shown}) and no softlabels store; choose an empty prefix "
                     "(nothing there is replaced, with or without --overwrite)")


def clear_prefix(files: RemoteFiles) -> None:
    """Delete the store under the prefix (its lease kept); refuse a prefix holding anything but a softlabels store."""
    names = _contents(files)
    if not names:
        return
    if not _holds_a_store(files):
        raise _foreign(files.url, names)
    for name in names:
        path = f"{files.root}/{name}"
        with_retries(files.url, lambda p=path: files.fs.rm(p, recursive=True))
    files.fs.invalidate_cache()


def open_remote(url: str, mode: str) -> tuple[RemoteFiles, Any]:
    """``(files, zarr store)`` for the store at ``url``; ``mode`` ``"w"`` empties the prefix (:func:`clear_prefix`)."""
    from zarr.storage import FsspecStore

    files = files_for(url)
    cache = None
    if mode == "w":
        clear_prefix(files)
    else:
        try:
            root_meta = files.read("zarr.json", 1 << 24)
        except FileNotFoundError:
            names = _contents(files)
            if not names:
                raise StoreNotFound(f"no store at {url!r}; check the URL (generate one with 'softlabels generate')") \
                    from None
            raise _foreign(url, names) from None
        if mode == "r" and b'"complete"' in root_meta:
            cache = DiskCache.from_env(url, root_meta)
    try:
        store = FsspecStore.from_url(url, storage_options=storage_options(url), read_only=mode == "r")
    except ImportError as err:  # checked by filesystem() already; an incomplete install of the async stack
        raise StoreNotFound(f"{url!r}: cannot open its filesystem ({err}); reinstall softlabels[s3]") from None
    return files, CachedRetryStore(store, url, cache)
