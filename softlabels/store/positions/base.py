"""What every position kind shares: write-unit geometry, the bookkeeping groups, sample id checks.

docs/FORMAT.md ("Write units") has the rules: a unit is ``chunk_samples * shard_chunks``
samples with their positions, and a writer owns whole groups of ``group_units`` units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["UnitGeometry", "group_units_for", "sample_id_problems"]

MAX_BOOKKEEPING_CHUNKS = 1024
"""Default cap on bookkeeping chunks (files, in Zarr) per bookkeeping array."""


def group_units_for(num_units: int, max_chunks: int = MAX_BOOKKEEPING_CHUNKS) -> int:
    """The smallest power of two ``G`` with ``ceil(num_units / G) <= max_chunks``."""
    if num_units < 0 or max_chunks < 1:
        raise ValueError("num_units must be >= 0 and max_chunks >= 1")
    return 1 << (max(1, math.ceil(num_units / max_chunks)) - 1).bit_length()


@dataclass(frozen=True)
class UnitGeometry:
    """Write units along the sample axis: ``unit_samples`` samples each, the last one shorter."""

    num_samples: int
    chunk_samples: int
    shard_chunks: int = 1
    group_units: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_samples", "shard_chunks", "group_units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")

    @property
    def unit_samples(self) -> int:
        return self.chunk_samples * self.shard_chunks

    @property
    def num_units(self) -> int:
        return math.ceil(self.num_samples / self.unit_samples)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_units / self.group_units)

    def unit_samples_range(self, unit: int) -> tuple[int, int]:
        """Samples ``[s0, s1)`` of write unit ``unit``."""
        if not 0 <= unit < self.num_units:
            raise IndexError(f"unit {unit} out of range 0..{self.num_units - 1}")
        s0 = unit * self.unit_samples
        return s0, min(s0 + self.unit_samples, self.num_samples)

    def group_units_range(self, group: int) -> range:
        """The units of bookkeeping group ``group`` (a writer owns whole groups)."""
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group {group} out of range 0..{self.num_groups - 1}")
        return range(group * self.group_units, min((group + 1) * self.group_units, self.num_units))

    def groups_of_rank(self, rank: int, world: int) -> range:
        """Contiguous groups owned by ``rank`` of ``world`` writers (balanced to within one)."""
        base, extra = divmod(self.num_groups, world)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))


def sample_id_problems(block: Mapping[str, np.ndarray]) -> list[str]:
    """A unit's ``sample_ids`` are >= 0 (one min). That no id appears twice is checked over the whole
    store, once: when a store to be read whole is opened, and by ``inspect --verify``."""
    ids = block.get("sample_ids")
    if ids is not None and len(ids) and ids.min() < 0:
        return [f"sample id {int(ids.min())} is negative"]
    return []
