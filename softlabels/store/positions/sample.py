"""``sample`` positions: one teacher output per sample (format version 1's case)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from softlabels.store.positions.base import UnitGeometry, sample_id_problems

__all__ = ["SamplePositions"]


@dataclass(frozen=True)
class SamplePositions:
    """Position ``i`` is sample ``i``; per-position arrays are [N, ...], chunked like samples.

    Every kind answers what this class does (``unit_written_range``: what the unit's writer writes,
    whole chunks or shards; ``value_problems``: what is wrong with a unit's per-sample values).
    """

    geometry: UnitGeometry
    kind: ClassVar[str] = "sample"

    @property
    def num_positions(self) -> int:
        """Teacher outputs stored (real positions, padding excluded)."""
        return self.geometry.num_samples

    @property
    def axis_length(self) -> int:
        """Length of the per-position arrays' first axis (padding included)."""
        return self.geometry.num_samples

    def unit_axis_range(self, unit: int) -> tuple[int, int]:
        """Range along the position axis holding unit ``unit``'s real positions."""
        return self.geometry.unit_samples_range(unit)

    unit_written_range = unit_axis_range  # a unit's samples are whole chunks (or shards)

    def to_attrs(self) -> dict[str, Any]:
        """Kind-specific root attributes (JSON values)."""
        return {}

    def value_problems(self, block: Mapping[str, np.ndarray]) -> list[str]:
        """Sample ids >= 0."""
        return sample_id_problems(block)
