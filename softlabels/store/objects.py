"""Zarr stores on object storage: opening one at a URL, and what creating one may replace.

A store at a URL is the set of objects under its prefix. Opening it checks the bucket
first (a missing or forbidden bucket is one line naming the URL), then wraps zarr's
fsspec store in :class:`~softlabels.store.remote.CachedRetryStore`. Creating one empties the
prefix first, but for the writer's lease (:mod:`softlabels.store.lease`), and only if the
prefix holds nothing or a softlabels store: anything else there is refused, with or
without ``--overwrite``. Nothing outside the prefix is ever written.
"""

from __future__ import annotations

import json
import os
from typing import Any

from softlabels.errors import NotAStore, StoreNotFound
from softlabels.store.location import (
    check_root,
    filesystem,
    storage_options,
    store_location,
)
from softlabels.store.remote import (
    CachedRetryStore,
    DiskCache,
    RemoteFiles,
    with_retries,
)

__all__ = ["clear_prefix", "open_remote", "remote_exists", "store_exists"]

LEASE_DIR = "_lease"  # the writer's lease objects (softlabels.store.lease); never a zarr node


def files_for(url: str) -> RemoteFiles:
    """The store's :class:`RemoteFiles`, after checking its bucket."""
    fs, root = filesystem(url)
    with_retries(url, lambda: check_root(fs, url, root))
    return RemoteFiles(fs, root, url)


def store_exists(path: str | os.PathLike[str]) -> bool:
    """Whether a store (or anything else) is at ``path``: a local file or folder, or objects under a URL."""
    where = store_location(path)
    return remote_exists(where) if isinstance(where, str) else where.exists()


def remote_exists(url: str) -> bool:
    """Whether anything lies under the store's prefix (its lease aside)."""
    return any(name != LEASE_DIR for name, _ in files_for(url).listing(""))


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


def clear_prefix(url: str) -> None:
    """Delete the store under ``url`` (its lease kept); refuse a prefix holding anything but a softlabels store."""
    files = files_for(url)
    names = [name for name, _ in files.listing("") if name != LEASE_DIR]
    if not names:
        return
    if not _holds_a_store(files):
        raise _foreign(url, names)
    for name in names:
        path = f"{files.root}/{name}"
        with_retries(url, lambda p=path: files.fs.rm(p, recursive=True))
    files.fs.invalidate_cache()


def open_remote(url: str, mode: str) -> tuple[RemoteFiles, Any]:
    """``(files, zarr store)`` for the store at ``url``; ``mode`` ``"w"`` empties the prefix (:func:`clear_prefix`)."""
    from zarr.storage import FsspecStore

    files = files_for(url)
    cache = None
    if mode == "w":
        clear_prefix(url)
    else:
        try:
            root_meta = files.read("zarr.json", 1 << 24)
        except FileNotFoundError:
            names = [name for name, _ in files.listing("") if name != LEASE_DIR]
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
