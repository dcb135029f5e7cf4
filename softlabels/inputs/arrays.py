"""Input datasets (in-memory arrays, array files, the built-in digits) and fingerprinting.

Every dataset is an :class:`InputDataset`: items are ``(x float32 tensor, y int64 scalar)``
with ``y = -1`` for unlabeled items, plus a vectorised :meth:`InputDataset.get_batch`
that the student trainer calls for whole chunks of sample ids.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from softlabels.errors import DataError
from softlabels.inputs.files import require_regular

__all__ = [
    "InputDataset", "ArrayDataset", "FileArrayDataset", "FileKind", "open_array_file",
    "DIGITS_SPLITS", "load_digits_split", "fingerprint", "class_count",
]

DIGITS_SPLITS = ("train", "pool", "test", "all")
"""Splits of the built-in ``digits`` dataset (``digits:<split>`` in a data spec)."""

FileKind = Literal["npy", "hdf5", "zarr"]
"""Array files read lazily by :class:`FileArrayDataset`."""

_DIGITS_SEED = 0
_DIGITS_FRACTIONS = {"train": 0.25, "test": 0.20}  # the pool gets the rest (~55%)


class InputDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset of ``(x float32, y int64 scalar)`` items; ``y = -1`` means unlabeled.

    Subclasses set ``input_shape`` (per item), ``num_classes`` (``None`` when unknown)
    and ``has_labels``, and implement ``__len__``/``__getitem__``; array-backed ones
    override :meth:`get_batch` with a vectorised read.
    """

    input_shape: tuple[int, ...]
    num_classes: int | None
    has_labels: bool

    def __len__(self) -> int:
        raise NotImplementedError

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` as ``(x [B, *input_shape] float32, y [B] int64)``."""
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        if not items:
            return torch.empty((0, *self.input_shape)), torch.empty(0, dtype=torch.int64)
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def without_labels(self) -> InputDataset:
        """The same inputs with every label hidden (``-1``); ``num_classes`` is kept."""
        return _Unlabeled(self)


def class_count(ds: InputDataset) -> int | None:
    """``ds.num_classes``; else, for labeled data (e.g. a factory dataset without a ``num_classes``
    attribute), the largest label + 1, from one pass over the labels; else ``None``."""
    if ds.num_classes is not None or not ds.has_labels:
        return ds.num_classes
    top = -1
    for start in range(0, len(ds), 4096):
        _, y = ds.get_batch(np.arange(start, min(start + 4096, len(ds)), dtype=np.int64))
        top = max(top, int(y.max()) if len(y) else -1)
    return top + 1 if top >= 0 else None


class _Unlabeled(InputDataset):
    """View of another dataset with all labels replaced by ``-1``."""

    def __init__(self, base: InputDataset) -> None:
        self.base = base
        self.input_shape = base.input_shape
        self.num_classes = base.num_classes
        self.has_labels = False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base[index][0], torch.tensor(-1, dtype=torch.int64)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.get_batch(indices)
        return x, torch.full_like(y, -1)


def _check_labels(y: Any, n: int, source: str) -> np.ndarray:
    """Validate labels (one integer >= -1 per input) and return them as int64."""
    y = np.asarray(y)
    integer = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
    if integer and y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
        raise DataError(f"labels of {source} reach {y.max()}, beyond int64 (they would wrap to negative ids); "
                        "store class ids as int64")
    if y.shape != (n,) or not integer or (n and y.min() < -1):
        low = y.min() if integer and y.size else None  # strings and objects have no usable minimum
        raise DataError(
            f"labels of {source} have shape {y.shape}, dtype {y.dtype}, minimum {low}; "
            f"pass {n} integer class ids >= 0, one per input (-1 for unlabeled)"
        )
    return y.astype(np.int64)


def _check_inputs(dtype: np.dtype, shape: tuple[int, ...], source: str) -> None:
    real = np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    if len(shape) < 1 or not (real or dtype == np.bool_):
        raise DataError(
            f"inputs of {source} have shape {shape} and dtype {dtype}; "
            "store a real-valued numeric array with one row per sample"
        )


class ArrayDataset(InputDataset):
    """Dataset over an array of inputs ``x`` [N, ...] and optional integer labels ``y`` [N].

    ``y=None`` marks every item unlabeled. ``num_classes`` defaults to the largest
    label + 1 (``None`` without labels); pass it to override.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        *,
        num_classes: int | None = None,
        source: str = "array",
    ) -> None:
        _check_inputs(np.dtype(x.dtype), tuple(x.shape), source)
        self._x = x
        self._init_labels(int(x.shape[0]), tuple(x.shape[1:]), y, num_classes, source)

    def _init_labels(
        self,
        n: int,
        input_shape: tuple[int, ...],
        y: np.ndarray | None,
        num_classes: int | None,
        source: str,
    ) -> None:
        self._n = n
        self.input_shape = input_shape
        self._y = np.full(n, -1, np.int64) if y is None else _check_labels(y, n, source)
        self.has_labels = bool((self._y >= 0).any())
        seen = int(self._y.max()) + 1 if self.has_labels else None
        if num_classes is not None and seen is not None and num_classes < seen:
            raise DataError(
                f"{source} has label {seen - 1} but num_classes={num_classes}; "
                f"pass num_classes >= {seen} or fix the labels"
            )
        self.num_classes = num_classes if num_classes is not None else seen

    def _inputs(self) -> Any:
        return self._x

    def _read(self, indices: np.ndarray) -> np.ndarray:
        return self._inputs()[indices]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for a dataset of {self._n} items")
        x = np.asarray(self._inputs()[i], dtype=np.float32)
        return torch.tensor(x), torch.tensor(self._y[i])

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        x = np.ascontiguousarray(self._read(idx), dtype=np.float32)  # fancy indexing: a fresh copy
        return torch.from_numpy(x), torch.from_numpy(self._y[idx])


def _read_rows(array: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any order, repeats allowed) from an HDF5/Zarr array, with few reads.

    Both need sorted unique coordinates and random row reads are slow, so a
    dense-enough request becomes one contiguous slab read, sliced in memory.
    """
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


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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


def _require_arrays(path: str, found: list[str], *wanted: str | None) -> None:
    for name in wanted:
        if name is not None and name not in found:
            raise DataError(
                f"no array '{name}' in '{path}'; arrays found: {', '.join(found) or '(none)'}; "
                f"name them as {path}:INPUTS[,LABELS]"
            )


class FileArrayDataset(ArrayDataset):
    """Inputs that stay in a file: ``.npy`` (memory-mapped), HDF5 or Zarr array ``name``.

    The file is opened lazily in each process (the pid is tracked) and the handle is
    dropped when pickled, so the dataset is safe to send to forked or spawned
    DataLoader workers. Labels (small) are read eagerly from array ``labels_name``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: FileKind,
        name: str = "",
        *,
        labels_name: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.path, self.kind, self.name = str(path), kind, name
        self._handle: Any = None
        self._array: Any = None
        self._pid: int | None = None
        source = f"{self.path}:{name}" if name else self.path
        if not Path(self.path).exists():
            raise DataError(f"data file '{self.path}' does not exist; check the path in --data")
        if kind != "npy":
            _require_arrays(self.path, _array_names(self.path, kind), name, labels_name)
        try:
            try:
                array = self._inputs()
            except _GARBAGE as err:
                raise DataError(f"cannot read '{self.path}' as {kind} ({_reason(err)}); check that the file is "
                                "intact and written by numpy.save, h5py or zarr") from err
            shape = tuple(int(s) for s in array.shape)
            _check_inputs(np.dtype(array.dtype), shape, source)
            labels = None if labels_name is None else self._read_labels(labels_name)
        finally:
            self._close()  # never hold an open handle across a fork
        self._init_labels(shape[0], shape[1:], labels, num_classes, source)

    def _read_labels(self, labels_name: str) -> np.ndarray:
        if self.kind == "hdf5":
            return np.asarray(self._handle[labels_name][...])
        return np.asarray(zarr.open_array(self.path, path=labels_name, mode="r")[...])

    def _inputs(self) -> Any:
        if self._pid != os.getpid():
            # A handle inherited from another process is unsafe: drop it, reopen here.
            self._handle = self._array = None
            if self.kind == "npy":
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            elif self.kind == "hdf5":
                self._handle = h5py.File(self.path, "r")
                self._array = self._handle[self.name]
            else:
                self._array = zarr.open_array(self.path, path=self.name, mode="r")
            self._pid = os.getpid()
        return self._array

    def _read(self, indices: np.ndarray) -> np.ndarray:
        array = self._inputs()
        if self.kind == "npy":
            return array[indices]
        return _read_rows(array, indices)

    def _close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._array = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _array=None, _pid=None)
        return state


_FILE_KINDS = {".npz": "npz", ".npy": "npy", ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr"}
"""Input file suffixes and the kind of array file each one is."""


def open_array_file(
    path: str | os.PathLike[str],
    name: str | None = None,
    labels_name: str | None = None,
    *,
    num_classes: int | None = None,
) -> ArrayDataset:
    """Open inputs stored in a ``.npz``, ``.npy``, HDF5 (``.h5``/``.hdf5``) or ``.zarr`` file.

    Without ``name`` the inputs are array ``x`` and the labels array ``y`` when the
    file has one; with ``name`` labels come only from ``labels_name``. ``.npz`` is
    loaded eagerly; the others stay in the file (see :class:`FileArrayDataset`).
    """
    path = str(path)
    kind = _FILE_KINDS.get(Path(path.rstrip("/")).suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file '{path}'; use a .npz, .npy, .h5/.hdf5 or .zarr file")
    if not Path(path).exists():
        raise DataError(f"data file '{path}' does not exist; check the path in --data")
    if kind != "zarr":  # a Zarr store is a folder
        require_regular(path)
    if kind == "npy":
        if name is not None or labels_name is not None:
            raise DataError(f"'{path}' is a .npy file holding only inputs; drop ':{name}' from the spec")
        return FileArrayDataset(path, "npy", num_classes=num_classes)
    found: list[str] = []
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except _GARBAGE as err:
            raise DataError(f"cannot read '{path}' as .npz ({_reason(err)}); write it with numpy.savez") from err
        found = list(arrays)
    elif name is None:
        found = _array_names(path, kind)
    if name is None:  # defaults: arrays x and (if present) y, or a Zarr store that is one array
        name, labels_name = ("", None) if found == [""] else ("x", "y" if "y" in found else None)
    if kind == "npz":
        _require_arrays(path, found, name, labels_name)
        labels = None if labels_name is None else arrays[labels_name]
        return ArrayDataset(arrays[name], labels, num_classes=num_classes, source=f"{path}:{name}")
    return FileArrayDataset(path, kind, name, labels_name=labels_name, num_classes=num_classes)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as (x float32 [N, 64] in [0, 1], y int64), read-only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError(
            "the built-in 'digits' dataset needs scikit-learn; pip install 'softlabels[demo]'"
        ) from err
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


@functools.cache
def _digits_split_indices() -> dict[str, np.ndarray]:
    """Stratified train/pool/test split (sorted indices), numpy only so it is version-stable.

    Shuffle with a fixed seed, group by class, then evenly spaced picks give each class its share.
    """
    _, y = _digits_arrays()
    n = y.size
    perm = np.random.default_rng(_DIGITS_SEED).permutation(n)
    order = perm[np.argsort(y[perm], kind="stable")]

    def pick(pool: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        k = round(fraction * n)
        at = ((np.arange(k) + 0.5) * pool.size / k).astype(np.int64)
        mask = np.zeros(pool.size, dtype=bool)
        mask[at] = True
        return pool[mask], pool[~mask]

    test, rest = pick(order, _DIGITS_FRACTIONS["test"])
    train, pool = pick(rest, _DIGITS_FRACTIONS["train"])
    return {"train": np.sort(train), "pool": np.sort(pool), "test": np.sort(test)}


def load_digits_split(split: str) -> ArrayDataset:
    """The built-in digits dataset, split ``train`` (449), ``pool`` (989), ``test`` (359) or ``all``.

    Inputs are flat 64-vectors (8x8 images) scaled to [0, 1]; 10 classes; labels
    are kept (hide them with :meth:`InputDataset.without_labels`).
    """
    if split not in DIGITS_SPLITS:
        raise DataError(f"unknown digits split '{split}'; use one of: {', '.join(DIGITS_SPLITS)}")
    x, y = _digits_arrays()
    source = f"digits:{split}"
    if split == "all":
        return ArrayDataset(x, y, num_classes=10, source=source)
    idx = _digits_split_indices()[split]
    return ArrayDataset(x[idx], y[idx], num_classes=10, source=source)


def fingerprint(ds: InputDataset) -> str:
    """Cheap, content-sensitive fingerprint ``"sha256:<hex>"`` of a dataset.

    Hashes N, the item shape and dtype, and the inputs and labels of a
    deterministic sample: the first, the last and ~64 evenly spaced items.
    """
    n = len(ds)
    digest = hashlib.sha256()
    digest.update(f"softlabels-fingerprint-v1|n={n}|shape={tuple(ds.input_shape)}|".encode())
    if n:
        idx = np.unique(np.concatenate([[0, n - 1], np.linspace(0, n - 1, 64).round()]))
        x, y = ds.get_batch(idx.astype(np.int64))
        digest.update(f"x={x.dtype}|y={y.dtype}|".encode())
        digest.update(np.ascontiguousarray(x.numpy(), dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(y.numpy(), dtype="<i8").tobytes())
    return f"sha256:{digest.hexdigest()}"
