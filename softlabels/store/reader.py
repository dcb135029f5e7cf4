"""UnitStore: open, validate and read a format-v2 store, one write unit at a time.

Opening checks the version, the attributes, every array's shape, dtype and chunking
against what the attributes imply (before anything is allocated from them), the
token offsets against the lengths, and the status. Reads return a unit's arrays as
numpy, checksum-verified on request. The backend handle opens lazily and reopens
after a fork, so a store can be handed to DataLoader workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import (
    CorruptStore,
    IncompleteStore,
    NotAStore,
    SoftLabelsError,
    UnsupportedFormat,
)
from softlabels.store import format as fmt
from softlabels.store.backend import Backend, ReadHandle, backend_kind, open_backend
from softlabels.store.positions.tokens import LENGTHS, OFFSETS, TokenPositions
from softlabels.store.schema import (
    FORMAT_VERSION_2,
    UNIT_CHECKSUMS,
    UNIT_DONE,
    StoreMetaV2,
    unit_checksum,
)

__all__ = ["UnitStore", "open_any"]


class UnitStore(ReadHandle):
    """A validated, read-only view of one v2 store."""

    def __init__(self, path: str | Path, *, allow_partial: bool = False, backend: str | None = None) -> None:
        self.path = Path(path)
        self.backend_kind = backend_kind(self.path, backend)
        self._allow_partial = allow_partial
        self._backend: Backend | None = None
        self._pid = -1
        b = self._handle()
        try:
            attrs = b.attrs()
            if attrs.get("softlabels_format") != FORMAT_VERSION_2:
                raise UnsupportedFormat(f"softlabels format version {attrs.get('softlabels_format')!r} is not 2; "
                                        "open it with softlabels.open_store")
            self.meta = StoreMetaV2.from_attrs(attrs)
            self._check_arrays(b)
            lengths = None
            if self.meta.positions == "tokens":
                lengths = self._token_lengths(b)
            self.positions = self.meta.make_positions(lengths)
        except SoftLabelsError as err:
            self.close()
            raise type(err)(f"{self.path}: {err}") from None
        missing = self.missing_units()
        if self.meta.complete and missing:
            self.close()
            raise CorruptStore(f"{self.path} is marked complete but units {fmt.chunk_list(missing)} are not flagged "
                               "done; regenerate them by rerunning 'softlabels generate' with the same arguments")
        if not self.meta.complete and not allow_partial:
            self.close()
            raise IncompleteStore(f"{self.path} is incomplete (status {self.meta.status!r}, {len(missing)} of "
                                  f"{self.meta.num_units} units missing: {fmt.chunk_list(missing)}); finish it by "
                                  "rerunning 'softlabels generate' with the same arguments")

    # -- validation -----------------------------------------------------------------------------
    def _check_arrays(self, b: Backend) -> None:
        problems: list[str] = []
        present = set(b.array_names())
        for name, spec in self.meta.arrays().items():
            if name not in present:
                problems.append(f"array {name!r} is missing")
                continue
            shape, dtype, chunks = b.array_info(name)
            if shape != spec.shape:
                problems.append(f"{name} has shape {shape}, the attributes say {spec.shape}")
            elif dtype != spec.dtype:
                problems.append(f"{name} has dtype {dtype}, expected {spec.dtype}")
            elif shape[0] and chunks[0] not in (spec.chunk, min(spec.chunk, max(1, shape[0]))):
                problems.append(f"{name} is chunked by {chunks[0]} along its first axis, expected {spec.chunk}")
            elif claim := b.unbacked(name, complete=spec.family == "position" and self.meta.complete
                                     and not self._allow_partial):
                problems.append(claim)
        if problems:
            if not present:
                raise NotAStore("it has softlabels attributes but no arrays; regenerate the store")
            raise CorruptStore(f"the arrays do not match the metadata: {'; '.join(problems)}; regenerate the store")

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

    # -- metadata -------------------------------------------------------------------------------
    num_samples = property(lambda self: self.meta.num_samples)
    num_classes = property(lambda self: self.meta.num_classes)
    num_units = property(lambda self: self.meta.num_units)
    layout = property(lambda self: self.meta.layout)
    kind = property(lambda self: self.meta.positions)

    def __len__(self) -> int:
        return self.meta.num_samples

    def __repr__(self) -> str:
        return (f"UnitStore({str(self.path)!r}, {self.meta.positions} x {self.meta.layout}, N={self.num_samples}, "
                f"C={self.num_classes}, {self.meta.logits_dtype}, {self.meta.status})")

    def unit_done(self) -> np.ndarray:
        return self._handle().read(UNIT_DONE, 0, self.meta.num_units).astype(bool)

    def missing_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.unit_done())]

    # -- reading --------------------------------------------------------------------------------
    def read_unit(self, unit: int, *, verify: bool = True,
                  out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A unit's per-position arrays (over its real positions) and per-sample arrays.

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
                block[name] = b.read(name, s0, s1, out.get(name))
        if isinstance(self.positions, TokenPositions):
            block[OFFSETS] = self.positions.offsets[s0:s1]
            block[LENGTHS] = self.positions.lengths[s0:s1]
        if verify:
            self._verify(unit, block)
        if isinstance(self.positions, TokenPositions):
            block[OFFSETS] = block[OFFSETS] - a0
        return block

    def _verify(self, unit: int, block: dict[str, np.ndarray]) -> None:
        stored = int(self._handle().read(UNIT_CHECKSUMS, unit, unit + 1)[0])
        if unit_checksum(self.meta, block) != stored:
            raise CorruptStore(f"{self.path}: unit {unit} fails its checksum (the data on disk changed after it was "
                               "written); regenerate it with 'softlabels generate --repair' and the same arguments")

    def verify(self) -> list[int]:
        """Units whose data does not match their checksum, or cannot be read (every finished unit)."""
        bad = []
        for u in np.flatnonzero(self.unit_done()):
            try:
                self.read_unit(int(u), verify=True)
            except CorruptStore:
                bad.append(int(u))
        return bad


def open_any(path: str | Path, **kw: Any):
    """Open a store of either format version: a v1 ``SoftLabelStore`` or a v2 ``UnitStore``.

    The root attribute ``softlabels_format`` decides; ``kw`` (``allow_partial``, ``backend``)
    go to the reader.
    """
    from softlabels.errors import SoftLabelsError

    b = open_backend(path, "r", kw.get("backend"))
    try:
        version = b.attrs().get("softlabels_format")
    except SoftLabelsError:  # damaged attributes: the version 1 reader names the problem with the path
        version = None
    finally:
        b.close()
    if version == 2:
        return UnitStore(path, **kw)
    from softlabels.store.v1 import SoftLabelStore

    return SoftLabelStore(path, **kw)
