"""Inputs that stay in a file: ``.npz``, ``.npy`` (memory-mapped), HDF5 and Zarr arrays.

:func:`open_array_file` picks the reader by suffix; a :class:`LazyArray` (shared with token
files) opens its file lazily in each process, so it is safe to send to DataLoader workers,
and reads rows with few, contiguous reads (:func:`_read_rows`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import zarr

from softlabels.errors import DataError, one_line
from softlabels.inputs.files import require_regular
from softlabels.inputs.arrays import ArrayDataset

__all__ = ["FileKind", "LazyArray", "file_kind", "open_array_file", "read_npz"]

FileKind = Literal["npy", "hdf5", "zarr"]
"""Array files read lazily by :class:`LazyArray`."""


def _read_rows(array: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any order, repeats allowed) from an HDF5/Zarr array, which need sorted unique
    coordinates: a dense-enough request is one contiguous slab read, sliced in memory."""
    if idx.size == 0:
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    uniq, inverse = np.unique(idx, return_inverse=True)
    if (uniq[0] < 0) or (uniq[-1] >= array.shape[0]):
        raise IndexError(f"indices out of range for a dataset of {array.shape[0]} items")
    lo, hi = int(uniq[0]), int(uniq[-1]) + 1
    if 4 * uniq.size >= hi - lo:
        rows = np.asarray(array[lo:hi])[uniq - lo]
    else:
        rows = np.asarray(array.oindex[uniq] if isinstance(array, zarr.Array) else array[uniq])
    return rows[inverse]


# What parsing a damaged numpy/HDF5/Zarr file raises (a zip member cut short, a bad header ...).
_GARBAGE = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def _array_names(path: str, kind: str) -> list[str]:
    """Names of every array in an HDF5 file or Zarr group (nested ones as ``a/b``)."""
    names: list[str] = []
    try:
        if kind == "hdf5":
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            return names
        node = zarr.open(path, mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read '{path}' as {kind} ({err}); check that the file is intact") from err
    if isinstance(node, zarr.Array):
        return [""]
    return [name for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array)]


class LazyArray:
    """A ``.npy`` (memory-mapped), HDF5 or Zarr array opened on first use in each process (the
    handle is dropped when pickled), so it is safe to send to DataLoader workers. A damaged file
    raises :class:`DataError` at construction; rows of an index array are read with
    :func:`_read_rows`."""

    def __init__(self, path: str, kind: FileKind, name: str = "") -> None:
        self.path, self.kind, self.name = path, kind, name
        self._handle: Any = None
        self._array: Any = None
        self._pid: int | None = None
        try:
            array = self._open()
            self.shape, self.dtype = tuple(int(s) for s in array.shape), np.dtype(array.dtype)
        except _GARBAGE as err:
            raise DataError(f"cannot read '{path}' as {kind} ({one_line(err)}); check that the file is "
                            "intact and written by numpy.save, h5py or zarr") from err
        finally:
            self.close()  # never hold an open handle across a fork

    def _open(self) -> Any:
        if self._pid != os.getpid():  # a handle inherited from another process is unsafe: reopen here
            self._handle = None
            if self.kind == "npy":
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            elif self.kind == "hdf5":
                self._handle = h5py.File(self.path, "r")
                self._array = self._handle[self.name]
            else:
                self._array = zarr.open_array(self.path, path=self.name, mode="r")
            self._pid = os.getpid()
        return self._array

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray) and self.kind != "npy":  # rows in any order: HDF5 needs them sorted
            return _read_rows(self._open(), key)
        return np.asarray(self._open()[key])

    def read(self) -> np.ndarray:
        """The whole array, the file closed again."""
        try:
            return self[...]
        finally:
            self.close()

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._array = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_array": None, "_pid": None}


_FILE_KINDS = {".npz": "npz", ".npy": "npy", ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr"}
"""Input file suffixes and the kind of array file each one is."""


def file_kind(path: str, what: str, suffixes: str) -> str:
    """The kind of the array file ``path`` (by its suffix), which must exist and, but for a Zarr folder, be
    a regular file; ``what`` (``data file``) and ``suffixes`` word the messages."""
    kind = _FILE_KINDS.get(Path(path.rstrip("/")).suffix.lower())
    if kind is None:
        raise DataError(f"unsupported {what} '{path}'; use a {suffixes} file")
    if not Path(path).exists():
        raise DataError(f"{what} '{path}' does not exist; check the path in --data")
    if kind != "zarr":  # a Zarr store is a folder
        require_regular(path)
    return kind


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, read now (an object array is refused, never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except _GARBAGE as err:
        raise DataError(f"cannot read '{path}' as .npz ({one_line(err)}); write it with numpy.savez") from err


def open_array_file(path: str | os.PathLike[str], name: str | None = None, labels_name: str | None = None, *,
                    num_classes: int | None = None) -> ArrayDataset:
    """Open inputs stored in a ``.npz``, ``.npy``, HDF5 (``.h5``/``.hdf5``) or ``.zarr`` file:
    arrays ``x`` and ``y`` (when present) by default, else ``name`` and ``labels_name``. ``.npz`` is
    read now; the others stay in the file (:class:`LazyArray`)."""
    path = str(path)
    kind = file_kind(path, "data file", ".npz, .npy, .h5/.hdf5 or .zarr")
    if kind == "npy" and (name is not None or labels_name is not None):
        raise DataError(f"'{path}' is a .npy file holding only inputs; drop ':{name}' from the spec")
    arrays = read_npz(path) if kind == "npz" else None
    found = [""] if kind == "npy" else list(arrays) if arrays is not None else _array_names(path, kind)
    if name is None:  # defaults: arrays x and (if present) y, a Zarr store that is one array, or the .npy
        name, labels_name = ("", None) if found == [""] else ("x", "y" if "y" in found else None)
    if missing := [n for n in (name, labels_name) if n is not None and n not in found]:
        raise DataError(f"no array '{missing[0]}' in '{path}'; arrays found: "
                        f"{', '.join(found) or '(none)'}; name them as {path}:INPUTS[,LABELS]")
    source = f"{path}:{name}" if name else path
    if arrays is not None:
        x, labels = arrays[name], None if labels_name is None else arrays[labels_name]
    else:  # the inputs stay in the file; labels (small) are read now
        x = LazyArray(path, kind, name)
        labels = None if labels_name is None else LazyArray(path, kind, labels_name).read()
    return ArrayDataset(x, labels, num_classes=num_classes, source=source)
