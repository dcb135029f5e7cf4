"""What a dataset holds, read from a few spread items: the fingerprint a store records and training
checks, and the refusal of data that reads differently each time (it augments at random).
"""

from __future__ import annotations

import hashlib

import numpy as np

from softlabels.errors import DataError
from softlabels.inputs.arrays import InputDataset

__all__ = ["fingerprint", "refuse_random_data", "spread_ids"]


def spread_ids(n: int, count: int = 64) -> np.ndarray:
    """Up to ``count`` item ids of ``n`` items, evenly spread: the first, the last and between (int64, sorted)."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round()).astype(np.int64)


def fingerprint(ds: InputDataset) -> str:
    """Cheap, content-sensitive fingerprint ``"sha256:<hex>"`` of a dataset: N, the item shape and
    dtype, and the inputs and labels of :func:`spread_ids`."""
    n = len(ds)
    digest = hashlib.sha256()
    digest.update(f"softlabels-fingerprint-v1|n={n}|shape={tuple(ds.input_shape)}|".encode())
    if n:
        x, y = ds.get_batch(spread_ids(n))
        digest.update(f"x={x.dtype}|y={y.dtype}|".encode())
        digest.update(np.ascontiguousarray(x.numpy(), dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(y.numpy(), dtype="<i8").tobytes())
    return f"sha256:{digest.hexdigest()}"


def refuse_random_data(ds: InputDataset, spec: str, *, count: int = 4) -> None:
    """Raise :class:`DataError` if reading ``count`` items twice gives different inputs or labels: a
    dataset that augments at random would store views nobody can reproduce (rows join inputs by
    index)."""
    if len(ds) == 0:
        return
    idx = spread_ids(len(ds), count)
    x1, y1 = ds.get_batch(idx)
    x2, y2 = ds.get_batch(idx)
    same = np.array([np.array_equal(a, b, equal_nan=True) for a, b in zip(x1.numpy(), x2.numpy())])
    same &= (y1 == y2).numpy()
    if not same.all():
        changed = ", ".join(str(int(i)) for i in idx[~same])
        raise DataError(f"--data '{spec}' returns different inputs each time an item is read (items {changed}); "
                        "it augments at random: drop the random transforms from the dataset and pass "
                        "--views V --augment SPEC, so that every stored view can be replayed")
