"""Position kinds of format version 2: what one stored teacher output belongs to.

A v2 store holds one teacher output per *position*. Three kinds, each one module and
one entry in :data:`POSITION_KINDS`:

- ``sample`` (:mod:`.sample`): one position per sample (version 1's case);
- ``views`` (:mod:`.views`): ``V`` positions per sample, one per augmented view, with
  ``view_params`` that replay each view exactly;
- ``tokens`` (:mod:`.tokens`): a ragged number of positions per sample (one per token),
  mapped by ``offsets`` [N + 1], fixed when the store is created.

Every kind answers the same questions through :class:`Positions`: the shapes of its
arrays, where write unit ``u`` lies — its samples ``[s0, s1)`` and its range along
the per-position arrays' first axis — and what is wrong with a unit's per-sample values
(``value_problems``: sample ids, view parameters outside their op's declared ranges). Units are what one writer writes whole, then
checksums, then flags done; no two units share a chunk or shard file of any array.
"""

from __future__ import annotations

from softlabels.store.positions.base import Positions, UnitGeometry, group_units_for, sample_id_problems
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

POSITION_KINDS: dict[str, type[Positions]] = {
    "sample": SamplePositions,
    "views": ViewPositions,
    "tokens": TokenPositions,
}
"""Position kind name (the ``positions`` root attribute) -> its class."""
