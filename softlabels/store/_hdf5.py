"""HDF5 backend (h5py): arrays chunked along N and allocated in full when created (docs/FORMAT.md,
"Rules"); object-valued root attributes stored as JSON strings.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from softlabels.errors import CorruptStore, NotAStore, StoreLocked, StoreWriteError
from softlabels.store.format import ArraySpec, check_read_size, load_json

# object-valued root attributes of either version, stored as JSON strings
JSON_ATTRS: tuple[str, ...] = ("teacher", "source", "created_by", "layout_params", "views", "tokens")


class HDF5Backend:
    kind = "hdf5"

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        try:
            self._f = h5py.File(path, {"r": "r", "r+": "r+", "w": "w"}[mode])
        except BlockingIOError as err:
            raise StoreLocked(f"{str(path)!r} is open for writing by another process; wait for it or stop it") from err
        except OSError as err:
            text = str(err)
            if "unable to lock file" in text.lower():  # not just "lock": a truncated file's text says "sblock"
                raise StoreLocked(f"{str(path)!r} is locked by another process; wait for it or stop it") from err
            if mode == "w":
                raise _write_error(path, err) from err
            raise NotAStore(
                f"{str(path)!r} is not a readable HDF5 file ({_first_line(text)}); check the path or regenerate the store"
            ) from err
        self._ids: dict[str, h5py.h5d.DatasetID] = {}  # the read functions' datasets, low-level
        self._raw: dict[str, int] = {}  # see _raw_rows
        self._whole: dict[str, tuple] = {}  # see write
        self._attrs: list[tuple[str, Any]] | None = None  # the root attributes as stored (read-only handles)
        self._reserve = False  # arrays created without HDF5's zero-fill: reserve their space at the next flush
        if mode != "w":
            escape = _escape(self._f)
            if escape:
                self._f.close()
                raise CorruptStore(f"{str(path)!r}: {escape}, and a store's data must lie inside its own file; "
                                   "nothing was read or written: regenerate the store")

    def attrs(self) -> dict[str, Any]:
        # list() first: raising mid-iteration would leave an h5py generator holding its global
        # lock, and any later HDF5 call from another thread of this process would hang.
        raw = self._attrs
        if raw is None:
            raw = list(self._f.attrs.items())
            if self._f.mode == "r":  # nothing changes them through a read-only handle: read once, decode each call
                self._attrs = raw
        return {k: decode_h5_attr(k, v) for k, v in raw}

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        with self._writing():
            for k, v in attrs.items():
                self._f.attrs[k] = encode_h5_attr(k, v)

    @contextmanager
    def _writing(self):
        """h5py reports a failed write as ValueError/OSError text with an errno inside: name it."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as err:
            raise _write_error(self.path, err) from err

    # The read functions use h5py's low-level dataset ids: a high-level Dataset costs ~0.1 ms to make
    # and each property another call layer, which an open (every array checked) pays per array.
    def _dsid(self, name: str) -> h5py.h5d.DatasetID:
        d = self._ids.get(name)
        if d is None:
            try:
                d = self._ids[name] = h5py.h5d.open(self._f.id, name.encode())
            except KeyError:
                raise CorruptStore(f"array {name!r} is missing from {str(self.path)!r}; regenerate the store") from None
        return d

    def array_names(self) -> list[str]:
        links: list[bytes] = []
        self._f.id.links.iterate(links.append)
        names = []
        for raw in links:
            obj = h5py.h5o.open(self._f.id, raw)
            if isinstance(obj, h5py.h5d.DatasetID):
                names.append(raw.decode("utf-8", "surrogateescape"))
                self._ids.setdefault(names[-1], obj)
        return names

    def array_info(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
        d = self._dsid(name)
        return tuple(d.shape), d.dtype, _chunks(d) or tuple(d.shape)

    def shard_rows(self, name: str) -> int | None:
        return None  # HDF5 has no shards

    def unbacked(self, name: str, *, complete: bool = False) -> str | None:
        """What the array's shape claims beyond the chunks the file has allocated for it (None if backed;
        docs/FORMAT.md, "Limits")."""
        d = self._dsid(name)
        chunks = _chunks(d)
        if chunks is None:
            held, want = d.get_storage_size(), math.prod(d.shape) * d.dtype.itemsize
            return None if held >= want else f"{name} claims {want:,} bytes but the file holds {held:,} for it"
        want = math.prod(-(-n // c) for n, c in zip(d.shape, chunks))
        held = d.get_num_chunks()
        return None if held >= want else f"{name} claims {want:,} chunks but the file holds {held:,} of them"

    def create_array(self, name: str, spec: ArraySpec, *, chunk_rows: int, shard_rows: int | None,
                     compress: bool) -> None:
        # an empty array cannot be chunked in HDF5 (a chunk may not exceed the shape)
        chunks = (max(1, min(chunk_rows, spec.shape[0])),) + spec.shape[1:] if spec.shape[0] else None
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        # The disk space must be reserved at creation: allocated lazily, a full disk strikes
        # mid-job and leaves HDF5 in a state that crashes the process at exit (seen on a full
        # tmpfs: SIGSEGV after ENOSPC). posix_fallocate reserves it without writing the zeros
        # HDF5's fill would write (half the bytes of a whole job); unwritten blocks read as
        # zeros. Compressed chunks keep HDF5's fill: an unfilled one would not decompress.
        reserve = hasattr(os, "posix_fallocate") and not compress  # done by the next flush
        if reserve:
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        with self._writing():
            self._f.create_dataset(
                name, shape=spec.shape, dtype=spec.dtype, chunks=chunks, fillvalue=0, dcpl=dcpl,
                compression="gzip" if compress else None, shuffle=compress,
            )
        self._reserve |= reserve

    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        d = self._dsid(name)
        shape = d.shape
        if out is None:
            check_read_size(self.path, name, (max(0, min(stop, shape[0]) - start),) + shape[1:], d.dtype)
            out = np.empty((stop - start,) + shape[1:], dtype=d.dtype)
        if stop > start:
            try:
                if self._raw_rows(name, d) == stop - start and start % (stop - start) == 0 and out.flags.c_contiguous:
                    # one whole uncompressed chunk: its bytes are the rows (H5Dread_chunk, ~3x H5Dread here)
                    d.read_direct_chunk((start,) + (0,) * (len(shape) - 1), out=out.reshape(-1).view(np.uint8))
                else:
                    # the low-level read: read_direct's selection logic costs as much as a small array's read
                    space = d.get_space()
                    space.select_hyperslab((start,) + (0,) * (len(shape) - 1), (stop - start,) + shape[1:])
                    d.read(h5py.h5s.create_simple(out.shape), space, out)
            except (OSError, RuntimeError) as err:
                raise CorruptStore(
                    f"cannot read rows {start}..{stop} of {name!r} in {str(self.path)!r} ({_first_line(str(err))}); "
                    "the file is damaged: regenerate it with 'softlabels generate --overwrite'"
                ) from err
        return out

    def _raw_rows(self, name: str, d: h5py.h5d.DatasetID) -> int:
        """Rows per chunk when a chunk's stored bytes are exactly its rows (no filter, native order,
        chunked along N only), else 0."""
        rows = self._raw.get(name)
        if rows is None:
            chunks = _chunks(d)
            plain = (chunks is not None and chunks[1:] == d.shape[1:] and d.dtype.isnative
                     and d.get_create_plist().get_nfilters() == 0)
            rows = self._raw[name] = chunks[0] if plain else 0
        return rows

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        stop = start + len(data)
        whole = self._whole.get(name)
        if whole is None:  # h5py's shape and dtype properties cost more than a chunk's write
            d = h5py.Dataset(self._dsid(name))
            whole = self._whole[name] = (d, self._raw_rows(name, d.id), d.shape[0], d.dtype, (0,) * (d.ndim - 1))
        d, rows, n, dtype, rest = whole
        with self._writing():
            whole_rows = 0  # the rows written as whole chunks
            if rows and start % rows == 0 and data.dtype == dtype and data.flags.c_contiguous:
                # whole uncompressed chunks: their rows are their stored bytes (H5Dwrite_chunk, no chunk
                # cache, no selection: ~2.5x H5Dwrite). Chunks are allocated at creation and unfiltered,
                # so HDF5 overwrites each in place: the file's bytes are those H5Dwrite would leave.
                whole_rows = (min(stop, n) - start) // rows * rows
                for at in range(0, whole_rows, rows):
                    d.id.write_direct_chunk((start + at, *rest), data[at:at + rows])
            if whole_rows < len(data):  # the rest (a partial or edge chunk, a filtered or converted array)
                d[start + whole_rows:stop] = data[whole_rows:]

    def flush(self) -> None:
        with self._writing():
            self._f.flush()
            fd = self._f.id.get_vfd_handle()
            if self._reserve:  # after HDF5's flush has set the file's size: fallocate must not change it
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
                self._reserve = False
            os.fsync(fd)  # "done" must mean on disk, not in the page cache

    def close(self) -> None:
        self._ids.clear()
        self._raw.clear()
        self._whole.clear()
        if self._f.id.valid:
            with self._writing():  # closing flushes: a full disk can fail here too
                self._f.close()

    def size_on_disk(self) -> int:
        return self.path.stat().st_size


def encode_h5_attr(name: str, value: Any) -> Any:
    """HDF5 attribute value: objects as JSON strings, scalars as themselves."""
    return json.dumps(value, sort_keys=True) if name in JSON_ATTRS else value


def decode_h5_attr(name: str, value: Any) -> Any:
    """Inverse of :func:`encode_h5_attr`; parses JSON only (never evaluates)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if name in JSON_ATTRS and isinstance(value, str):
        return load_json(value, where=f"root attribute {name!r}", fix="regenerate the store")
    return value


_MAX_DEPTH = 16  # a store's arrays lie at its root: deeper nesting (or a hard-link loop) is refused


def _escape(group: h5py.Group, prefix: str = "/", depth: int = 0) -> str | None:
    """The first link or dataset whose data lies outside this file (or elsewhere in it), or None
    (docs/SECURITY.md). Walked with h5py's low-level calls: the high-level objects cost ~0.1 ms per
    array, and every open walks."""
    if depth > _MAX_DEPTH:
        return f"{prefix} lies {depth} groups deep (a link loop, or nesting no store has)"
    gid = group.id
    names: list[bytes] = []
    gid.links.iterate(names.append)  # link names: listing resolves no link
    for raw in names:
        name = raw.decode("utf-8", "surrogateescape")
        where = f"{prefix}{name}"
        if gid.links.get_info(raw).type != h5py.h5l.TYPE_HARD:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                return f"{where} is an external link to {link.filename}:{link.path}"
            if isinstance(link, h5py.SoftLink):
                return f"{where} is a soft link to {link.path}"
            return f"{where} is a link of an unknown kind"
        obj = h5py.h5o.open(gid, raw)
        if isinstance(obj, h5py.h5g.GroupID):
            found = _escape(h5py.Group(obj), where + "/", depth + 1)
            if found:
                return found
        elif isinstance(obj, h5py.h5d.DatasetID):
            dcpl = obj.get_create_plist()
            if dcpl.get_layout() == h5py.h5d.VIRTUAL:
                return f"{where} is a virtual dataset (its data comes from other datasets or files)"
            if dcpl.get_external_count():
                files = (dcpl.get_external(i)[0].decode("utf-8", "replace") for i in range(dcpl.get_external_count()))
                return f"{where} keeps its data in external file(s) {', '.join(files)}"
    return None


def _chunks(d: h5py.h5d.DatasetID) -> tuple[int, ...] | None:
    """A dataset's chunk shape, or None when it is not chunked (h5py's ``Dataset.chunks``)."""
    dcpl = d.get_create_plist()
    return dcpl.get_chunk() if dcpl.get_layout() == h5py.h5d.CHUNKED else None


def _write_error(path: Path, err: BaseException) -> StoreWriteError:
    """h5py reports failed writes as text with an errno inside; name the reason on one line."""
    found = re.search(r"errno = (\d+)", str(err))
    if isinstance(err, OSError) and err.errno:  # from the OS itself (posix_fallocate, fsync)
        reason = os.strerror(err.errno)
    else:
        reason = os.strerror(int(found.group(1))) if found else _first_line(str(err))
    return StoreWriteError(f"cannot write {str(path)!r}: {reason}; free space or fix permissions (or choose "
                           "another --out), then rerun the same command to resume")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
