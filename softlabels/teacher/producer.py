"""The producer protocol: what the job runner (:mod:`softlabels.teacher.runner`) drives.

A *producer* knows what to compute (a classifier teacher over images or their views, a
token teacher over sequences, an ensemble of stores); the runner knows how to write it
safely (lock, create or resume, plan, rank split, background writer, non-finite policy,
repair, finish). ``generate`` and ``merge`` are producers; the runner is one for all.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from softlabels.store.schema import StoreMetaV2

__all__ = ["Producer"]


@runtime_checkable
class Producer(Protocol):
    """What a producer provides (docs/FORMAT.md, "Version 2")."""

    def meta(self) -> StoreMetaV2:
        """The store to write (status 'writing'), with teacher/source fingerprints; compared on resume."""

    def lengths(self) -> np.ndarray | None:
        """Per-sample position counts (int64 [N]) for a `tokens` store, known before writing; else None."""

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """For each sample range [lo, hi) of `spans`, in order, yield (start, arrays) pieces that cover it in
        order. `arrays` are exactly what UnitWriter.write(start, **arrays) takes: the layout's per-position
        arrays for those samples' positions (sample: n rows; views: n rows of V; tokens: sum of lengths rows),
        plus per-sample `labels`, `sample_ids` and any per-sample arrays of the position kind (`view_params`).
        Encoding (top-k, sampling) happens on the producer's device before the copy to host.

        The runner calls this *before* it starts its writer thread, so a producer may fork its
        input workers here (a fork while another thread holds a library lock can deadlock)."""
