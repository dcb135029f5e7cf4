"""UnitWriter: writes a format-2 store one whole write unit at a time, by docs/FORMAT.md's rules.

Data, flush, checksum, flag per unit (inside :meth:`UnitWriter.burst`, one data flush and one flag
flush for all its units); ``status = "complete"`` last. Token stores' ``offsets`` and ``lengths``
are written when the store is created.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from softlabels.errors import DataError, IncompleteStore, StoreExists, StoreMismatch
from softlabels.store import format as fmt
from softlabels.store.backend import Backend, backend_kind, open_backend
from softlabels.store.location import store_location
from softlabels.store.positions import Positions
from softlabels.store.positions.tokens import LENGTHS, OFFSETS, TokenPositions
from softlabels.store.remote import store_exists
from softlabels.store.schema import (
    UNIT_CHECKSUMS,
    UNIT_DONE,
    StoreMetaV2,
    unit_checksum,
)

__all__ = ["UnitWriter", "unit_checksum"]


class UnitWriter:
    """Writes one v2 store. :meth:`create` makes a new one; :meth:`resume` reopens one."""

    def __init__(self, backend: Backend, meta: StoreMetaV2, positions: Positions) -> None:
        self._backend = backend
        self.meta = meta
        self.positions = positions
        self._arrays = meta.arrays()
        self._done = backend.read(UNIT_DONE, 0, meta.num_units).astype(bool)
        self._burst: list[tuple[int, int]] | None = None  # (unit, checksum) written, awaiting their flags
        self._pending: dict[int, _Pending] = {}
        self.guard: Callable[[], None] = lambda: None  # raises when this writer may no longer commit (a lost lease)
        if isinstance(positions, TokenPositions):  # real positions before each sample, padding excluded
            self._cum = np.concatenate([[0], np.cumsum(positions.lengths)])

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: StoreMetaV2, *, lengths: np.ndarray | None = None,
               compress: bool = False, backend: str | None = None, overwrite: bool = False) -> UnitWriter:
        """Create a store with every array allocated at full size; tokens need ``lengths``."""
        path = store_location(path)
        kind = backend_kind(path, backend)
        if meta.shard_chunks > 1 and kind != "zarr":
            raise DataError("sharding needs a Zarr store (*.zarr); drop the shard setting or use *.zarr")
        positions = meta.make_positions(lengths)
        exists = store_exists(path)
        if exists and not overwrite:
            raise StoreExists(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        if exists and not isinstance(path, str):
            _remove(path)
        store = open_backend(path, "w", kind)  # at a URL: empties the prefix, or refuses one holding other objects
        store.set_attrs(meta.to_attrs())  # status "writing" first, before any array exists
        shard = meta.shard_chunks if meta.shard_chunks > 1 else None
        for name, a in meta.arrays().items():
            spec = fmt.ArraySpec(a.shape, a.dtype)
            sharded = shard is not None and a.family in ("position", "sample")
            store.create_array(name, spec, chunk_rows=a.chunk, shard_rows=a.chunk * shard if sharded else None,
                               compress=compress and a.family == "position" and meta.layout != "dense")
        if isinstance(positions, TokenPositions):
            store.write(OFFSETS, 0, positions.offsets)
            store.write(LENGTHS, 0, positions.lengths)
        store.flush()
        return cls(store, meta, positions)

    @classmethod
    def resume(cls, path: str | Path, *, expect: StoreMetaV2 | None = None,
               backend: str | None = None) -> UnitWriter:
        """Reopen a store to write its missing units; with ``expect``, refuse other settings."""
        from softlabels.store.reader import UnitStore

        reader = UnitStore(path, backend=backend, allow_partial=True)  # validates the schema
        meta, positions = reader.meta, reader.positions
        reader.close()
        if expect is not None:
            keys = ("positions", "layout", "num_samples", "num_classes", "logits_dtype", "chunk_samples",
                    "shard_chunks", "group_units", "layout_params", "views", "tokens", "checksum")
            diffs = [f"{k}: {getattr(meta, k)!r} != {getattr(expect, k)!r}" for k in keys
                     if getattr(meta, k) != getattr(expect, k)]
            if diffs:
                raise StoreMismatch(f"{str(path)!r} was made with other settings ({'; '.join(diffs)}); "
                                    "use the original settings, or --overwrite to start over")
        return cls(open_backend(path, "r+", backend), meta, positions)

    # -- progress ----------------------------------------------------------------------------
    @property
    def num_units(self) -> int:
        return self.meta.num_units

    def missing_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self._done)]

    def unit_samples(self, unit: int) -> tuple[int, int]:
        return self.meta.geometry.unit_samples_range(unit)

    def unit_positions(self, unit: int) -> tuple[int, int]:
        """The unit's real range along the per-position arrays' first axis."""
        return self.positions.unit_axis_range(unit)

    # -- writing -----------------------------------------------------------------------------
    def write(self, start: int, **arrays: Any) -> None:
        """Write samples ``[start, start + n)`` arriving in any order and any block size.

        Per-sample arrays have n rows; per-position arrays have one row per position of
        those samples, in order (``sample``: n; ``views``: n rows of V; ``tokens``: the
        samples' lengths summed). Samples are buffered until their unit is whole, then
        the unit is written (:meth:`write_unit`); a block aligned to a unit is not copied.
        """
        n = len(np.asarray(arrays[fmt.SAMPLE_IDS]))
        if start < 0 or start + n > self.meta.num_samples:
            raise DataError(f"samples {start}..{start + n} fall outside 0..{self.meta.num_samples}")
        unit_samples = self.meta.geometry.unit_samples
        pos = start
        while pos < start + n:
            unit = pos // unit_samples
            u0, u1 = self.unit_samples(unit)
            stop = min(u1, start + n)
            piece = {k: self._rows(k, v, start, pos, stop) for k, v in arrays.items()}
            if pos == u0 and stop == u1 and unit not in self._pending:
                self.write_unit(unit, piece)
            else:
                pend = self._pending.setdefault(unit, _Pending(self, unit))
                pend.put(pos, stop, piece)
                if pend.full:
                    del self._pending[unit]
                    self.write_unit(unit, pend.arrays)
            pos = stop

    def _position_index(self, sample: int) -> int:
        """First per-position row of ``sample`` counted from sample 0 without padding."""
        if isinstance(self.positions, TokenPositions):
            return int(self._cum[sample])
        return sample

    def _rows(self, key: str, value: Any, start: int, lo: int, hi: int) -> np.ndarray:
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if self._arrays[key].family == "position":
            base = self._position_index(start)
            return arr[self._position_index(lo) - base:self._position_index(hi) - base]
        return arr[lo - start:hi - start]

    def write_unit(self, unit: int, arrays: Mapping[str, Any]) -> None:
        """Write a whole unit: every per-position array over :meth:`unit_positions`, every
        per-sample array over :meth:`unit_samples` (creation-time arrays excluded)."""
        block = self._validate(unit, arrays)
        if self._done[unit]:
            self._set_flag(unit, 0)
        s0, _ = self.unit_samples(unit)
        a0, a1 = self.unit_positions(unit)
        _, w1 = self.positions.unit_written_range(unit)
        writes = []
        for key, arr in block.items():
            family = self._arrays[key].family
            if family == "position":
                if w1 > a1:  # tokens: write whole chunks, the padding as zeros
                    arr = np.concatenate([arr, np.zeros((w1 - a1, *arr.shape[1:]), arr.dtype)])
                writes.append((key, a0, arr))
            elif family == "sample":
                writes.append((key, s0, arr))
        if isinstance(self._backend.path, str):  # object storage: the unit's arrays' PUTs in flight together
            pool = self.__dict__.setdefault("_pool", ThreadPoolExecutor(4, thread_name_prefix="softlabels-put"))
            for future in [pool.submit(self._backend.write, *w) for w in writes]:
                future.result()  # every data object is written before the unit's commit records
        else:
            for w in writes:
                self._backend.write(*w)
        full = dict(block)
        if isinstance(self.positions, TokenPositions):
            s1 = s0 + len(block[fmt.SAMPLE_IDS])
            full[OFFSETS], full[LENGTHS] = self.positions.offsets[s0:s1], self.positions.lengths[s0:s1]
        written = (unit, unit_checksum(self.meta, full))
        if self._burst is None:
            self._commit([written])
        else:
            self._burst.append(written)

    @contextmanager
    def burst(self) -> Iterator[None]:
        """Write several units with one flush of their data and one of their flags, at the end.

        Crash-safe like unit-by-unit writing: no flag is set before the data it covers is
        flushed; a crash inside the burst loses only the burst's units, which a resume rewrites.
        """
        if self._burst is not None:  # nested: the outer burst commits
            yield
            return
        self._burst = []
        try:
            yield
        except BaseException:
            try:
                self._commit(self._burst)  # the units written before the error are whole: keep them
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        finally:
            burst, self._burst = self._burst, None
        self._commit(burst)

    def _commit(self, written: list[tuple[int, int]]) -> None:
        """Flush the units' data, then write their checksums and flags (adjacent units in one write), flush."""
        if not written:
            return
        self.guard()
        self._backend.flush()
        runs: list[list[tuple[int, int]]] = []
        for item in sorted(written):
            if runs and runs[-1][-1][0] + 1 == item[0]:
                runs[-1].append(item)
            else:
                runs.append([item])
        for run in runs:
            self._backend.write(UNIT_CHECKSUMS, run[0][0], np.array([c for _, c in run], dtype=np.uint32))
            self._backend.write(UNIT_DONE, run[0][0], np.ones(len(run), dtype=np.uint8))
        self._backend.flush()
        for unit, _ in written:
            self._done[unit] = True

    def _validate(self, unit: int, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        wanted = {k for k, a in self._arrays.items() if a.family in ("position", "sample")}
        if set(arrays) != wanted:
            raise DataError(f"a unit of this store needs exactly {sorted(wanted)}, got {sorted(arrays)}")
        s0, s1 = self.unit_samples(unit)
        a0, a1 = self.unit_positions(unit)
        block: dict[str, np.ndarray] = {}
        for key in sorted(wanted):
            spec = self._arrays[key]
            value = arrays[key]
            arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            if arr.dtype != spec.dtype:
                if key in (fmt.LABELS, fmt.SAMPLE_IDS) and np.issubdtype(arr.dtype, np.integer):
                    arr = arr.astype(spec.dtype)
                else:
                    raise DataError(f"{key} has dtype {arr.dtype}, the store stores {spec.dtype}; encode it with "
                                    "the store's layout first")
            rows = (a1 - a0) if spec.family == "position" else (s1 - s0)
            if arr.shape != (rows, *spec.shape[1:]):
                raise DataError(f"{key} for unit {unit} has shape {arr.shape}, expected {(rows, *spec.shape[1:])}")
            block[key] = arr
        return block

    def _set_flag(self, unit: int, value: int) -> None:
        self._backend.write(UNIT_DONE, unit, np.array([value], dtype=np.uint8))
        self._backend.flush()
        self._done[unit] = bool(value)

    def invalidate(self, units: list[int]) -> None:
        """Mark units as not done (to regenerate damaged ones) and the store as writing."""
        self._backend.set_attrs({"status": fmt.STATUS_WRITING})
        self.meta = replace(self.meta, status=fmt.STATUS_WRITING)
        for u in units:
            self._set_flag(u, 0)

    def update_created_by(self, entries: Mapping[str, Any]) -> None:
        """Merge ``entries`` into the ``created_by`` attribute (timings, recorded ids) before finishing."""
        created = {**self.meta.created_by, **entries}
        self._backend.set_attrs({"created_by": created})
        self._backend.flush()
        self.meta = replace(self.meta, created_by=created)

    # -- finishing ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Set ``status = "complete"`` if, and only if, every unit is flagged on disk."""
        on_disk = self._backend.read(UNIT_DONE, 0, self.num_units).astype(bool)
        missing = np.flatnonzero(~on_disk)
        if self._pending or len(missing):
            raise IncompleteStore(f"cannot finish {str(self._backend.path)!r}: {len(missing)} of {self.num_units} "
                                  f"units not written ({fmt.chunk_list(missing)}); write them, then finish")
        self.guard()
        self._backend.set_attrs({"status": fmt.STATUS_COMPLETE})
        self._backend.flush()
        self.meta = replace(self.meta, status=fmt.STATUS_COMPLETE)

    def close(self) -> None:
        """Close without finishing; partly filled units are dropped (they are rewritten on resume)."""
        self._pending.clear()
        if "_pool" in self.__dict__:
            self.__dict__.pop("_pool").shutdown()
        self._backend.close()

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


class _Pending:
    """A unit being filled from blocks that arrive in any order."""

    def __init__(self, writer: UnitWriter, unit: int) -> None:
        self.s0, s1 = writer.unit_samples(unit)
        self._index = writer._position_index
        self.p0 = self._index(self.s0)
        rows = {"position": self._index(s1) - self.p0, "sample": s1 - self.s0}
        self._sample_keys = {k for k, a in writer._arrays.items() if a.family == "sample"}
        self.arrays = {k: np.zeros((rows[a.family], *a.shape[1:]), a.dtype)
                       for k, a in writer._arrays.items() if a.family in rows}
        self._filled = np.zeros(s1 - self.s0, dtype=bool)

    def put(self, lo: int, hi: int, piece: Mapping[str, np.ndarray]) -> None:
        for k, v in piece.items():
            if k in self._sample_keys:
                self.arrays[k][lo - self.s0:hi - self.s0] = v
            else:
                self.arrays[k][self._index(lo) - self.p0:self._index(hi) - self.p0] = v
        self._filled[lo - self.s0:hi - self.s0] = True

    @property
    def full(self) -> bool:
        return bool(self._filled.all())


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
