"""Refuse a dataset that is itself random (augments in ``__getitem__``) before a store is made.

Rows are joined to inputs by index, so a dataset that returns a new random view
each time it is read gets a store whose logits belong to views nobody can
reproduce, and ``train`` later fails on the fingerprint. Reading a few items twice
catches it at ``generate`` time with the fix: let softlabels draw the views.
"""

from __future__ import annotations

import numpy as np

from softlabels.errors import DataError
from softlabels.inputs.arrays import InputDataset

__all__ = ["refuse_random_data"]


def _probe(n: int, count: int) -> np.ndarray:
    """Up to ``count`` spread-out indices of ``n`` items (first, last and between)."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def refuse_random_data(ds: InputDataset, spec: str, *, count: int = 4) -> None:
    """Raise :class:`DataError` if reading ``count`` items twice gives different inputs or labels."""
    if len(ds) == 0:
        return
    idx = _probe(len(ds), count)
    x1, y1 = ds.get_batch(idx)
    x2, y2 = ds.get_batch(idx)
    same = np.array([np.array_equal(a, b, equal_nan=True) for a, b in zip(x1.numpy(), x2.numpy())])
    same &= (y1 == y2).numpy()
    if not same.all():
        changed = ", ".join(str(int(i)) for i in idx[~same])
        raise DataError(f"--data '{spec}' returns different inputs each time an item is read (items {changed}); "
                        "it augments at random: drop the random transforms from the dataset and pass "
                        "--views V --augment SPEC, so that every stored view can be replayed")
