"""The producer protocol, what producers share, and the producer that copies a store.

A *producer* knows what to compute (``generate``'s teachers, the units of another store for
``merge`` and ``upgrade``); the job runner (:mod:`softlabels.teacher.runner`) writes any of them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.store.schema import StoreMetaV2

__all__ = ["AMP_DTYPES", "Producer", "StoreProducer", "autocast", "slice_samples"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class Producer(Protocol):
    """What a producer provides (docs/FORMAT.md)."""

    def meta(self) -> StoreMetaV2:
        """The store to write (status 'writing'), with teacher/source fingerprints; compared on resume."""

    def lengths(self) -> np.ndarray | None:
        """Per-sample position counts (int64 [N]) for a `tokens` store, known before writing; else None."""

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """For each range [lo, hi) of `spans`, in order, (start, arrays) pieces covering it in
        order, what UnitWriter.write(start, **arrays) takes. Called before the runner starts its
        writer thread, so a producer may fork its input workers here."""


class StoreProducer:
    """The units of a store read through the unit API (an ensemble, a format-1 store), written as ``meta``.

    The source is read, never changed; ``meta`` must describe the same samples and positions.
    """

    def __init__(self, source: Any, meta: StoreMetaV2) -> None:
        self.source, self._meta = source, meta

    def meta(self) -> StoreMetaV2:
        return self._meta

    def lengths(self) -> np.ndarray | None:
        return self.source.positions.lengths if self._meta.positions == "tokens" else None

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """One piece per source unit a span touches, cut to the span (positions by the unit's offsets)."""
        geometry = self.source.meta.geometry
        positional = [k for k, a in self._meta.arrays().items() if a.family == "position"]
        for lo, hi in spans:
            for unit in range(lo // geometry.unit_samples, (hi - 1) // geometry.unit_samples + 1 if hi > lo else 0):
                s0, s1 = geometry.unit_samples_range(unit)
                a, b = max(lo, s0), min(hi, s1)
                block = self.source.read_unit(unit)
                offsets, lengths = block.pop(OFFSETS, None), block.pop(LENGTHS, None)
                if (a, b) != (s0, s1):  # samples [a, b) of the unit; tokens: their positions by the offsets
                    cum = None if offsets is None else np.append(offsets, offsets[-1] + lengths[-1])
                    block = slice_samples(block, positional, 0, a - s0, b - s0, cum)
                yield a, block


def slice_samples(arrays: dict[str, Any], position_keys: Sequence[str], start: int, a: int, b: int,
                  cum: np.ndarray | None) -> dict[str, Any]:
    """Samples ``[a, b)`` of a piece starting at sample ``start``; ragged tokens place their positions by
    ``cum``, the position offsets of the samples (indexed like them)."""
    if cum is not None:
        p0, p1 = int(cum[a] - cum[start]), int(cum[b] - cum[start])
    else:
        p0, p1 = a - start, b - start
    return {k: (v[p0:p1] if k in position_keys else v[a - start:b - start]) for k, v in arrays.items()}


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast of ``--amp`` (``AMP_DTYPES``) on ``device``, for a teacher's forward."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
