"""The producer protocol: what the job runner drives to fill a format-v2 store.

The runner (lock, create/resume, plan, rank split, background writer, non-finite
policy, repair, finish) knows nothing of teachers; a *producer* knows nothing of
locks or resumes. ``generate`` (classifier teacher; token teacher) and ``merge``
(ensembles) are producers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from softlabels.store.schema import StoreMetaV2

__all__ = ["Producer"]


class Producer(Protocol):
    def meta(self) -> StoreMetaV2:
        """The store to write (status 'writing'), with teacher/source fingerprints; compared on resume."""

    def lengths(self) -> np.ndarray | None:
        """Per-sample position counts (int64 [N]) for a `tokens` store, known before writing; else None."""

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """For each sample range [lo, hi) of `spans`, in order, yield (start, arrays) pieces that cover it in
        order. `arrays` are exactly what UnitWriter.write(start, **arrays) takes: the layout's per-position
        arrays for those samples' positions (sample: n rows; views: n rows of V; tokens: sum of lengths rows),
        plus per-sample `labels`, `sample_ids` and any per-sample arrays of the position kind (`view_params`).
        Encoding (top-k, sampling) happens on the producer's device before the copy to host."""
