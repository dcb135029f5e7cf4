"""Position kinds of format version 2: what one stored teacher output belongs to (docs/FORMAT.md).

``sample`` (one position per sample), ``views`` (V per sample, one per augmented view) and
``tokens`` (one per token, ragged): each one module and one entry in :data:`POSITION_KINDS`,
answering the same questions (:class:`SamplePositions` names them): the shapes of its arrays,
where write unit ``u`` lies, and what is wrong with a unit's per-sample values.
"""

from __future__ import annotations

from softlabels.store.positions.base import UnitGeometry, group_units_for, sample_id_problems
from softlabels.store.positions.sample import SamplePositions
from softlabels.store.positions.tokens import TokenPositions
from softlabels.store.positions.views import ViewPositions

__all__ = [
    "POSITION_KINDS",
    "Positions",
    "SamplePositions",
    "TokenPositions",
    "UnitGeometry",
    "ViewPositions",
    "group_units_for",
    "sample_id_problems",
]

Positions = SamplePositions | ViewPositions | TokenPositions
"""Any position kind."""

POSITION_KINDS: dict[str, type[Positions]] = {
    "sample": SamplePositions,
    "views": ViewPositions,
    "tokens": TokenPositions,
}
"""Position kind name (the ``positions`` root attribute) -> its class."""
