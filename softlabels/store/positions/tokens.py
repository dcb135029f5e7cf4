"""``tokens`` positions: a ragged number of positions per sample, one per token.

Per-position arrays are flat along a token axis; every unit starts on a chunk (or shard)
boundary, and ``offsets`` [N + 1] / ``lengths`` [N] map samples to it (docs/FORMAT.md,
"Tokens and padding").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from softlabels.store.positions.base import UnitGeometry, sample_id_problems

__all__ = ["LENGTHS", "OFFSETS", "TokenPositions", "default_chunk_positions"]

OFFSETS = "offsets"
LENGTHS = "lengths"


def default_chunk_positions(bytes_per_position: int, target_bytes: int = 1 << 20) -> int:
    """A power of two giving ~``target_bytes`` per chunk of per-position data (16..65536)."""
    rows = max(1, target_bytes // max(1, bytes_per_position))
    return int(min(1 << 16, max(16, 1 << (rows.bit_length() - 1))))


@dataclass(frozen=True)
class TokenPositions:
    """Position ``offsets[i] + t`` is token ``t`` of sample ``i``."""

    geometry: UnitGeometry
    lengths: np.ndarray
    chunk_positions: int
    offsets: np.ndarray = field(init=False, repr=False, compare=False)
    unit_starts: np.ndarray = field(init=False, repr=False, compare=False)
    unit_tokens: np.ndarray = field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "tokens"

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths)
        if lengths.ndim != 1 or len(lengths) != self.geometry.num_samples:
            raise ValueError(f"lengths must be [num_samples={self.geometry.num_samples}], got {lengths.shape}")
        if lengths.size and (not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 0):
            raise ValueError("lengths must be integers >= 0")
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions must be >= 1, got {self.chunk_positions}")
        lengths = lengths.astype(np.int64)
        g = self.geometry
        cum = np.concatenate([[0], np.cumsum(lengths)])
        firsts = np.arange(g.num_units, dtype=np.int64) * g.unit_samples
        lasts = np.minimum(firsts + g.unit_samples, g.num_samples)
        unit_tokens = cum[lasts] - cum[firsts]
        align = self.alignment
        spans = -(-unit_tokens // align) * align
        unit_starts = np.concatenate([[0], np.cumsum(spans)]).astype(np.int64)  # [U + 1]
        unit_of = np.arange(g.num_samples, dtype=np.int64) // g.unit_samples
        offsets = np.empty(g.num_samples + 1, dtype=np.int64)
        offsets[:-1] = unit_starts[unit_of] + cum[:-1] - cum[firsts[unit_of]] if g.num_samples else []
        offsets[-1] = unit_starts[-1]
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "unit_starts", unit_starts)
        object.__setattr__(self, "unit_tokens", unit_tokens.astype(np.int64))

    @property
    def alignment(self) -> int:
        """Where units may start on the token axis: a chunk, or a shard when sharded."""
        return self.chunk_positions * self.geometry.shard_chunks

    @property
    def num_positions(self) -> int:
        return int(self.lengths.sum())

    @property
    def axis_length(self) -> int:
        return int(self.unit_starts[-1])

    def unit_axis_range(self, unit: int) -> tuple[int, int]:
        self.geometry.unit_samples_range(unit)  # bounds check
        start = int(self.unit_starts[unit])
        return start, start + int(self.unit_tokens[unit])

    def unit_written_range(self, unit: int) -> tuple[int, int]:
        """The unit's real tokens rounded up to whole chunks (the padding is written as zeros)."""
        start, stop = self.unit_axis_range(unit)
        return start, start + math.ceil((stop - start) / self.chunk_positions) * self.chunk_positions

    def to_attrs(self) -> dict[str, Any]:
        return {"tokens": {"chunk_positions": int(self.chunk_positions), "num_positions": self.num_positions,
                           "axis_length": self.axis_length}}

    def value_problems(self, block: Mapping[str, np.ndarray]) -> list[str]:
        """Sample ids >= 0. (Offsets and lengths are checked against each other once, when the store is
        opened: every unit's come from them.)"""
        return sample_id_problems(block)


def token_attr_problems(tokens: Mapping[str, Any], is_int: Any) -> list[str]:
    """The ``tokens`` root attribute: whole ``chunk_positions`` >= 1, ``0 <= num_positions <= axis_length``."""
    c, a, n = tokens.get("chunk_positions"), tokens.get("axis_length"), tokens.get("num_positions")
    if not is_int(c) or c < 1 or not is_int(a) or a < 0:
        return ["tokens needs integers 'chunk_positions' >= 1 and 'axis_length' >= 0"]
    if not is_int(n) or not 0 <= n <= a:
        return [f"tokens' num_positions {n!r} is not a whole number in 0..axis_length ({a})"]
    return []
