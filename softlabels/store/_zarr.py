"""Zarr v3 backend (zarr-python 3): arrays chunked along their first axis, optionally sharded, every
chunk file written even when all zeros, new chunk files named ``c.<i>.0`` (docs/FORMAT.md, "Rules").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer.cpu import NDBuffer

from softlabels.errors import CorruptStore, NotAStore, SoftLabelsError, StorageUnavailable
from softlabels.store.format import MAX_JSON_BYTES, ArraySpec, check_read_size, load_json
from softlabels.store.schema import UNIT_CHECKSUMS, UNIT_DONE

_CONFIG = {"write_empty_chunks": True}
_KEYS = {"name": "default", "separator": "."}  # flat chunk file names for new arrays (module docstring)
ZARR_JSON = "zarr.json"
# read from the files present (version 1's chunk_done and checksums: one element per file, chunks (1,))
_BOOKKEEPING = frozenset({UNIT_DONE, UNIT_CHECKSUMS})
_FIX = ("--repair cannot rebuild a store's metadata: regenerate the store with 'softlabels generate --overwrite' "
        "and the original arguments")


class LocalFiles:
    """The backend's own file operations on a local store folder (:class:`~softlabels.store.remote.RemoteFiles`
    on object storage): reads, listings and sizes, relative to the store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, rel: str, limit: int) -> bytes:
        with open(self.root / rel, "rb") as f:
            return f.read(limit)

    def isfile(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def listing(self, rel: str) -> list[tuple[str, bool]]:
        try:
            with os.scandir(self.root / rel) as entries:
                return [(e.name, e.is_dir()) for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


class ZarrBackend:
    kind = "zarr"

    def __init__(self, path: Path | str, mode: str) -> None:
        self.path = path
        self._meta: dict[str, dict[str, Any]] = {}
        if isinstance(path, str):  # a URL (softlabels.store.location)
            from softlabels.store.remote import open_remote

            self._files, store = open_remote(path, mode)
        else:
            self._files, store = LocalFiles(path), str(path)
            if mode != "w":
                escape = _escape(path, writing=mode == "r+")
                if escape:
                    raise CorruptStore(f"{str(path)!r}: {escape}, and every file of a store must lie inside it; "
                                       "nothing was read or written: regenerate the store")
        if mode != "w":
            self._node(None)  # parsed here first, so zarr never meets a damaged document
        try:
            zmode = {"r": "r", "r+": "r+", "w": "w"}[mode]
            if isinstance(path, str) and mode == "w":
                zmode = "a"  # open_remote emptied the prefix but for the lease, which "w" would delete
            self._g = zarr.open_group(store, mode=zmode, zarr_format=3)
        except SoftLabelsError:
            raise
        except Exception as err:  # zarr raises a variety of types for a bad tree
            if mode == "w":
                raise
            raise NotAStore(f"{str(path)!r} is not a readable Zarr v3 group ({type(err).__name__}: {err}); "
                            "check the path or regenerate the store") from err
        self._arrays: dict[str, Any] = {}
        self._read_only, self._present = mode == "r", {}

    def attrs(self) -> dict[str, Any]:
        return dict(self._g.attrs.asdict())

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self._g.attrs.update(attrs)

    def _node(self, name: str | None) -> dict[str, Any]:
        """The parsed ``zarr.json`` of the group (``None``) or of one array, through the one guarded parser."""
        meta = self._meta.get(name or "")
        if meta is None:
            rel = f"{name}/{ZARR_JSON}" if name else ZARR_JSON
            where = repr(_join(self.path, rel))
            try:
                raw = self._files.read(rel, MAX_JSON_BYTES + 1)
            except FileNotFoundError:
                raise NotAStore(f"{where} is missing: this is not a Zarr v3 store; check the path") from None
            meta = load_json(raw, where=where, fix=_FIX)
            if not isinstance(meta, dict):
                raise CorruptStore(f"{where} is damaged (not a JSON object); {_FIX}")
            self._meta[name or ""] = meta
        return meta

    def array_names(self) -> list[str]:
        # Listed from the files, each document parsed by _node: zarr's own listing raises mid-way on damage.
        names = []
        for name, is_dir in self._files.listing(""):
            if is_dir and self._files.isfile(f"{name}/{ZARR_JSON}") and self._node(name).get("node_type") == "array":
                names.append(name)
        return sorted(names)

    def _array(self, name: str):
        a = self._arrays.get(name)
        if a is None:
            if not self._files.isfile(f"{name}/{ZARR_JSON}"):
                raise CorruptStore(f"array {name!r} is missing from {str(self.path)!r}; regenerate the store")
            self._node(name)
            try:
                a = self._arrays[name] = self._g[name]
            except Exception as err:  # valid JSON that zarr still rejects (a bad shape, codec, dtype ...)
                raise CorruptStore(f"{_join(self.path, name + '/' + ZARR_JSON)!r} is damaged ({type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:200]}); {_FIX}") from None
        return a

    def array_info(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
        a = self._array(name)
        return tuple(a.shape), np.dtype(a.dtype), tuple(a.chunks)

    def shard_rows(self, name: str) -> int | None:
        shards = self._array(name).shards
        return None if shards is None else int(shards[0])

    def unbacked(self, name: str, *, complete: bool = False) -> str | None:
        """What a *complete* store's array claims beyond its chunk (or shard) files (None if backed;
        docs/FORMAT.md, "Limits"), counted from one directory listing."""
        a = self._array(name)
        if not complete or not a.shape or not a.shape[0]:
            return None
        rows = int((a.shards or a.chunks)[0])
        want = -(-int(a.shape[0]) // rows)
        where = self._chunk_folder(name)
        try:  # names counted, not parsed: one listing, ~0.2 us a file
            held = sum(1 for f, _ in self._files.listing(where[0]) if f.startswith(where[1])) if where else 0
        except OSError:
            held = 0
        return None if held >= want else f"{name} claims {want:,} chunk files but the store holds {held:,} of them"

    def create_array(self, name: str, spec: ArraySpec, *, chunk_rows: int, shard_rows: int | None,
                     compress: bool) -> None:
        chunks = (chunk_rows,) + spec.shape[1:]  # zarr allows chunks larger than the array
        shards = None if shard_rows is None else (shard_rows,) + spec.shape[1:]
        self._arrays[name] = self._g.create_array(
            name, shape=spec.shape, dtype=spec.dtype, chunks=chunks, shards=shards, fill_value=0,
            compressors=ZstdCodec(level=3) if compress else None, config=_CONFIG, chunk_key_encoding=_KEYS,
        )

    def _chunk_folder(self, name: str) -> tuple[str, str] | None:
        """The folder holding an array's chunk files and their names' prefix (``c.`` or none), from its
        chunk key encoding: ``.`` (new arrays) or ``/`` (arrays written before); None for any other."""
        encoding = self._node(name).get("chunk_key_encoding") or {}
        separator = (encoding.get("configuration") or {}).get("separator", "/")
        if encoding.get("name") != "default" or separator not in (".", "/"):
            return None
        return (name, "c.") if separator == "." else (f"{name}/c", "")

    def _chunks_present(self, name: str) -> list[int] | None:
        """First-axis chunk (or shard) indices of the chunk files present, from one directory listing;
        None for a key encoding softlabels does not write. Raises OSError if the folder cannot be listed."""
        where = self._chunk_folder(name)
        if where is None:
            return None
        if name in self._present:
            return self._present[name]
        folder, prefix = where
        firsts = (f[len(prefix):].partition(".")[0] for f, _ in self._files.listing(folder) if f.startswith(prefix))
        present = [int(first) for first in firsts if first.isdigit()]
        if self._read_only and isinstance(self.path, str):  # one listing per array and handle, not one per read
            self._present[name] = present
        return present

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        a = self._array(name)
        if out is None:
            check_read_size(self.path, name, (max(0, min(stop, a.shape[0]) - start),) + tuple(a.shape[1:]), a.dtype)
        if len(a.shape) == 1 and a.shards is None and (a.chunks == (1,) or name in _BOOKKEEPING) \
                and not isinstance(self.path, str):  # at a URL zarr's concurrent reads beat one request per file
            return self._read_sparse(name, a, start, stop, out)
        try:
            if out is None:
                return a[start:stop]
            # decoded straight into the caller's buffer (a window slice), not into a new array
            a.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
            return out
        except (CorruptStore, StorageUnavailable):
            raise
        except Exception as err:
            raise CorruptStore(
                f"cannot read rows {start}..{stop} of {name!r} in {str(self.path)!r} ({type(err).__name__}: {err}); "
                "a chunk file is damaged: regenerate it with 'softlabels generate --repair' and the original arguments"
            ) from err

    def _read_sparse(self, name: str, a: Any, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        """A bookkeeping array (one element, or one unit group, per file): only the files that exist are read
        (a missing one holds the fill value), not every chunk the metadata claims (~0.2-0.5 ms each in zarr)."""
        stop = min(stop, a.shape[0])
        result = np.zeros(max(0, stop - start), dtype=a.dtype) if out is None else out
        result[...] = a.fill_value
        meta = self._node(name)
        where = self._chunk_folder(name)
        if where is None:
            result[...] = a[start:stop]  # another key layout: zarr's loop
            return result
        folder, prefix = where
        g = int(a.chunks[0])
        present = [i for i in self._chunks_present(name) or () if start < (i + 1) * g and i * g < stop]
        codecs = meta.get("codecs")
        plain = isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict) \
            and codecs[0].get("name") == "bytes" and (codecs[0].get("configuration") or {}).get("endian", "little") \
            == "little"
        item = np.dtype(a.dtype).newbyteorder("<")
        size = g * item.itemsize  # zarr writes the last chunk whole too
        try:
            for i in present:
                lo, hi = max(start, i * g), min(stop, (i + 1) * g)
                if plain:  # an uncompressed chunk file is its elements' bytes: ~20x faster than through zarr
                    raw = self._files.read(f"{folder}/{prefix}{i}", size + 1)
                    if len(raw) != size:
                        raise ValueError(f"chunk file {i} holds {len(raw)} bytes, not {size}")
                    result[lo - start:hi - start] = np.frombuffer(raw, item)[lo - i * g:hi - i * g]
                else:
                    result[lo - start:hi - start] = a[lo:hi]
        except StorageUnavailable:
            raise
        except Exception as err:
            raise CorruptStore(f"cannot read {name!r} in {str(self.path)!r} ({type(err).__name__}: {err}); "
                               "a bookkeeping file is damaged: regenerate it with 'softlabels generate'") from err
        return result

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._array(name)[start:start + len(data)] = data

    def flush(self) -> None:
        """Zarr writes each chunk file atomically on assignment; nothing is buffered."""

    def close(self) -> None:
        self._arrays.clear()

    def size_on_disk(self) -> int:
        return self._files.total_bytes()


def _join(root: Path | str, rel: str) -> str:
    return f"{root}/{rel}" if isinstance(root, str) else str(root / rel)


def _escape(root: Path, *, writing: bool) -> str | None:
    """The first entry of the store tree that leads outside it (docs/SECURITY.md: a symlink resolving
    outside the store's real root, dangling ones included; before writing, a file with a second hard
    link), or None. The walk uses the entries' types: no stat per file when reading (~0.1 s per 20k files).
    """
    top = os.path.realpath(root)
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([top, target]) != top:
                        return f"{os.path.relpath(entry.path, top)} is a symlink to {target}, outside the store"
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)  # a symlinked directory inside the store is walked at its target
                elif writing and entry.stat(follow_symlinks=False).st_nlink > 1:
                    return f"{os.path.relpath(entry.path, top)} has another hard link, which a write would change too"
    return None
