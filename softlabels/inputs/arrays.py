"""Input datasets: the :class:`InputDataset` protocol (``(x float32, y int64)`` items, ``y = -1``
unlabeled, and a vectorised :meth:`InputDataset.get_batch`) and arrays held in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import DataError

__all__ = ["InputDataset", "ArrayDataset", "all_labels", "class_count"]


class InputDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset of ``(x float32, y int64 scalar)`` items; ``y = -1`` means unlabeled.

    Subclasses set ``input_shape``, ``num_classes`` (``None`` when unknown) and ``has_labels``, and
    implement ``__len__``/``__getitem__`` (array-backed ones also a vectorised :meth:`get_batch`).
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
    top = int(all_labels(ds).max(initial=-1))
    return top + 1 if top >= 0 else None


def all_labels(ds: InputDataset) -> np.ndarray:
    """Every label of ``ds`` (int64 [N], -1 unlabeled): its ``labels`` array, else read in blocks of items."""
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.concatenate([ds.get_batch(np.arange(i, min(i + 4096, len(ds)), dtype=np.int64))[1].numpy()
                           for i in range(0, len(ds), 4096)] or [np.empty(0, np.int64)])


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
        raise DataError(f"labels of {source} have shape {y.shape}, dtype {y.dtype}, minimum {low}; "
                        f"pass {n} integer class ids >= 0, one per input (-1 for unlabeled)")
    return y.astype(np.int64)


def _check_inputs(dtype: np.dtype, shape: tuple[int, ...], source: str) -> None:
    real = np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    if len(shape) < 1 or not (real or dtype == np.bool_):
        raise DataError(f"inputs of {source} have shape {shape} and dtype {dtype}; "
                        "store a real-valued numeric array with one row per sample")


class ArrayDataset(InputDataset):
    """Dataset over inputs ``x`` [N, ...] and optional integer labels ``y`` [N] (``None``:
    unlabeled); ``num_classes`` defaults to the largest label + 1."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, *, num_classes: int | None = None,
                 source: str = "array") -> None:
        _check_inputs(np.dtype(x.dtype), tuple(x.shape), source)
        self._x, self._n, self.input_shape = x, int(x.shape[0]), tuple(x.shape[1:])
        self._y = np.full(self._n, -1, np.int64) if y is None else _check_labels(y, self._n, source)
        self.has_labels = bool((self._y >= 0).any())
        seen = int(self._y.max()) + 1 if self.has_labels else None
        if num_classes is not None and seen is not None and num_classes < seen:
            raise DataError(f"{source} has label {seen - 1} but num_classes={num_classes}; "
                            f"pass num_classes >= {seen} or fix the labels")
        self.num_classes = num_classes if num_classes is not None else seen

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for a dataset of {self._n} items")
        x = np.asarray(self._x[i], dtype=np.float32)
        return torch.tensor(x), torch.tensor(self._y[i])

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        x = np.ascontiguousarray(self._x[idx], dtype=np.float32)  # fancy indexing: a fresh copy
        return torch.from_numpy(x), torch.from_numpy(self._y[idx])
