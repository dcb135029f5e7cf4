"""Reading a store: :func:`open_store` opens either format version through one API.

:class:`UnitStore` reads format 2 (docs/FORMAT.md); :class:`softlabels.store.v1.V1Store` presents a
format-1 store in the same terms. Opening checks everything the attributes claim (docs/FORMAT.md, "Limits").
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import CorruptStore, SoftLabelsError, UnsupportedFormat
from softlabels.store.backend import Backend, open_backend
from softlabels.store.format import is_int
from softlabels.store.handle import ReadHandle
from softlabels.store.positions.tokens import LENGTHS, OFFSETS, TokenPositions
from softlabels.store.schema import (
    FORMAT_VERSION_2,
    UNIT_CHECKSUMS,
    UNIT_DONE,
    StoreMetaV2,
    check_unit,
    unit_checksum,
)

__all__ = ["UnitStore", "open_store"]

_FILLING = threading.Lock()
_REPAIR = "regenerate it with 'softlabels generate --repair' and the original arguments"


def open_store(path: str | Path, *, allow_partial: bool = False, backend: str | None = None) -> Any:
    """Open a store of either format version for reading: a :class:`UnitStore`, or a format-1 store's
    :class:`~softlabels.store.v1.V1Store` (the same API). A store still being written is refused
    unless ``allow_partial``."""
    b = open_backend(path, "r", backend)
    try:
        version = b.attrs().get("softlabels_format")
    except SoftLabelsError:  # damaged attributes: the reader names the problem with the path
        version = FORMAT_VERSION_2
    except BaseException:
        b.close()
        raise
    if _version_is(version, 1):
        b.close()
        from softlabels.store.v1 import V1Store

        return V1Store(path, allow_partial=allow_partial, backend=backend)
    return UnitStore(path, allow_partial=allow_partial, backend=backend, opened=b)  # one open, not two


def _version_is(version: object, number: int) -> bool:
    """Whether a stored ``softlabels_format`` is the integer ``number`` (not an array, a bool or a string)."""
    return is_int(version) and version == number


class UnitStore(ReadHandle):
    """A validated, read-only view of one format-2 store."""

    format_version = FORMAT_VERSION_2

    def _open(self, b: Backend) -> None:
        attrs = b.attrs()
        version = attrs.get("softlabels_format")
        if version is None:
            raise CorruptStore("root attribute 'softlabels_format' is missing; this is not a softlabels store or "
                               "its metadata was damaged")
        if not _version_is(version, FORMAT_VERSION_2):
            raise UnsupportedFormat("a format-1 store; open it with open_store" if _version_is(version, 1) else
                                    f"unsupported softlabels format version {version!r}; this softlabels reads "
                                    "versions 1 and 2 (upgrade softlabels or regenerate the store)")
        self.meta = StoreMetaV2.from_attrs(attrs)
        self._check_arrays(b, {name: (a.shape, a.dtype, a.chunk, a.family == "position")
                               for name, a in self.meta.arrays().items()})
        self.positions = self.meta.make_positions(self._token_lengths(b) if self.meta.positions == "tokens" else None)

    def _token_lengths(self, b: Backend) -> np.ndarray:
        n = self.meta.num_samples
        lengths, offsets = b.read(LENGTHS, 0, n), b.read(OFFSETS, 0, n + 1)
        if n and lengths.min() < 0:
            raise CorruptStore("lengths holds a negative length; regenerate the store")
        planned = TokenPositions(self.meta.geometry, lengths, int(self.meta.tokens["chunk_positions"]))
        if not np.array_equal(planned.offsets, offsets):
            bad = int(np.flatnonzero(planned.offsets != offsets)[0])
            raise CorruptStore(f"offsets[{bad}] = {int(offsets[bad])} but the lengths place that sample at "
                               f"{int(planned.offsets[bad])}; regenerate the store")
        return lengths

    def unit_done(self) -> np.ndarray:
        return self._handle().read(UNIT_DONE, 0, self.meta.num_units).astype(bool)

    def unit_checksums(self) -> np.ndarray:
        """uint32 [U]: every unit's recorded checksum (what identifies a store's contents)."""
        return self._handle().read(UNIT_CHECKSUMS, 0, self.meta.num_units)

    # -- reading --------------------------------------------------------------------------------
    def _small(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of a per-sample array or the checksums; at a URL from the whole array read once (zarr
        fetches its chunks concurrently): a unit then costs a request per per-position array only.
        Held in memory: 16 B per sample for labels and ids, plus any view parameters, 4 B per unit."""
        if not isinstance(self.path, str):
            return self._handle().read(name, start, stop, out)
        cache = self.__dict__.setdefault("_small_arrays", {})
        if name not in cache:
            with _FILLING:  # read-ahead threads: one of them reads it
                if name not in cache:
                    n = self.meta.num_units if name == UNIT_CHECKSUMS else self.meta.num_samples
                    cache[name] = self._handle().read(name, 0, n)
        return cache[name][start:stop].copy()

    def read_unit(self, unit: int, *, verify: bool = True,
                  out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A unit's per-position arrays (over its real positions) and per-sample arrays, values checked.

        Token stores add the unit's ``offsets`` (relative to the unit's first position)
        and ``lengths``. ``out``: arrays (of the stored dtypes) to read some of them into
        instead of new ones, e.g. a streaming dataset's buffer.
        """
        b = self._handle()
        s0, s1 = self.meta.geometry.unit_samples_range(unit)
        a0, a1 = self.positions.unit_axis_range(unit)
        block: dict[str, np.ndarray] = {}
        out = out or {}
        for name, spec in self.meta.arrays().items():
            if spec.family == "position":
                block[name] = b.read(name, a0, a1, out.get(name))
            elif spec.family == "sample":
                block[name] = self._small(name, s0, s1, out.get(name))
        if isinstance(self.positions, TokenPositions):
            block[OFFSETS] = self.positions.offsets[s0:s1]
            block[LENGTHS] = self.positions.lengths[s0:s1]
        where = f"unit {unit} (samples {s0}..{s1}) of {self.path}"
        recorded = self._small(UNIT_CHECKSUMS, unit, unit + 1)
        if verify and unit_checksum(self.meta, block) != int(recorded[0]):
            raise CorruptStore(f"{where} fails its checksum (the data on disk changed after it was written); "
                               f"{_REPAIR}")
        check_unit(self.meta, block, where=where, fix=_REPAIR, positions=self.positions)
        if isinstance(self.positions, TokenPositions):
            block[OFFSETS] = block[OFFSETS] - a0
        return block
