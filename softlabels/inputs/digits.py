"""The built-in ``digits`` dataset: scikit-learn's 1,797 8x8 handwritten digits in fixed splits."""

from __future__ import annotations

import functools

import numpy as np

from softlabels.errors import DataError
from softlabels.inputs.arrays import ArrayDataset

__all__ = ["DIGITS_SPLITS", "load_digits_split"]

DIGITS_SPLITS = ("train", "pool", "test", "all")
"""Splits of the built-in ``digits`` dataset (``digits:<split>`` in a data spec)."""

_DIGITS_SEED = 0
_DIGITS_FRACTIONS = {"train": 0.25, "test": 0.20}  # the pool gets the rest (~55%)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as (x float32 [N, 64] in [0, 1], y int64), read-only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the built-in 'digits' dataset needs scikit-learn; pip install 'softlabels[demo]'") from err
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
    """The built-in digits, split ``train`` (449), ``pool`` (989), ``test`` (359) or ``all``: flat
    8x8 images in [0, 1], 10 classes, labels kept (hide them with ``without_labels()``)."""
    if split not in DIGITS_SPLITS:
        raise DataError(f"unknown digits split '{split}'; use one of: {', '.join(DIGITS_SPLITS)}")
    x, y = _digits_arrays()
    idx = slice(None) if split == "all" else _digits_split_indices()[split]
    return ArrayDataset(x[idx], y[idx], num_classes=10, source=f"digits:{split}")
