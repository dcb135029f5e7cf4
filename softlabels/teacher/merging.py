"""``softlabels merge``: an ensemble's combined targets written as one format-v2 store.

:class:`MergeProducer` is a producer (:mod:`softlabels.teacher.producer`): the combined units
come from an :class:`~softlabels.store.ensemble.EnsembleStore`, so a merged store holds byte for
byte what the ensemble yields on the fly. :func:`merge` runs it on the shared job runner
(lock, resume of an interrupted merge, checksums, status last). Every input is opened and
checked before the output is created, so a refused merge writes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from softlabels._version import __version__
from softlabels.errors import ConfigError
from softlabels.store import format as fmt
from softlabels.store.defaults import DEFAULT_TEMPERATURE
from softlabels.store.ensemble import EnsembleStore
from softlabels.store.positions.tokens import LENGTHS, OFFSETS
from softlabels.store.schema import StoreMetaV2
from softlabels.teacher.config import MergeConfig
from softlabels.teacher.runner import run_job

__all__ = ["MergeProducer", "merge"]


class MergeProducer:
    """Writes an ensemble's combined units (the ensemble is read, never changed)."""

    def __init__(self, ensemble: EnsembleStore) -> None:
        self.ensemble = ensemble

    def meta(self) -> StoreMetaV2:
        return replace(self.ensemble.meta, status=fmt.STATUS_WRITING,
                       created_by={"command": "merge", "version": __version__})

    def lengths(self) -> np.ndarray | None:
        return self.ensemble.positions.lengths if self.ensemble.meta.positions == "tokens" else None

    def batches(self, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """One piece per unit a span touches, cut to the span (positions by the unit's offsets)."""
        geometry = self.ensemble.meta.geometry
        for lo, hi in spans:
            for unit in range(lo // geometry.unit_samples, (hi - 1) // geometry.unit_samples + 1 if hi > lo else 0):
                s0, s1 = geometry.unit_samples_range(unit)
                a, b = max(lo, s0), min(hi, s1)
                block = self.ensemble.read_unit(unit)
                offsets, lengths = block.pop(OFFSETS, None), block.pop(LENGTHS, None)
                if (a, b) != (s0, s1):
                    block = _cut(self.ensemble, block, a - s0, b - s0, offsets, lengths)
                yield a, block


def _cut(ensemble: EnsembleStore, block: dict[str, np.ndarray], i: int, j: int,
         offsets: np.ndarray | None, lengths: np.ndarray | None) -> dict[str, np.ndarray]:
    """Samples [i, j) of a unit's block (relative to the unit)."""
    p0, p1 = i, j
    if offsets is not None:  # tokens: the samples' positions are contiguous within a unit
        p0, p1 = int(offsets[i]), int(offsets[j - 1] + lengths[j - 1]) if j > i else int(offsets[i])
    family = {k: a.family for k, a in ensemble.meta.arrays().items()}
    return {k: v[p0:p1] if family[k] == "position" else v[i:j] for k, v in block.items()}


def merge(config: MergeConfig, log: Callable[[str], None] | None = None) -> Path:
    """Combine ``config.stores`` into the store ``config.out``; return its path."""
    if problems := config.problems():
        raise ConfigError(problems)
    with EnsembleStore(config.stores, mode=config.mode, weights=config.weights,
                       temperature=_temperature(config)) as ensemble:
        producer = MergeProducer(ensemble)
        n = ensemble.meta.num_samples
        # the shared runner: lock, resume of an interrupted merge, checksums, status complete last
        run_job(producer, config.out, batch_size=ensemble.meta.geometry.unit_samples, overwrite=config.overwrite)
        if log:
            log(f"merged {len(config.stores)} stores ({config.mode}, T = {ensemble.how.temperature}) -> "
                f"{config.out}: {ensemble.meta.positions} x {ensemble.meta.layout}, {n} samples")
    return Path(config.out)


def _temperature(config: MergeConfig) -> float:
    if config.temperature is not None:
        return config.temperature
    from softlabels.store.ensemble import open_units

    first = open_units(config.stores[0], allow_partial=True)
    try:
        return 1.0 if first.meta.layout == "sampled" else DEFAULT_TEMPERATURE
    finally:
        first.close()
