"""StoreWriter: pre-allocated, chunk-aligned, crash-safe writes.

Rows arrive in blocks, in any order and of any size. They are buffered until a
whole *unit* (a chunk, or a shard when Zarr sharding is on) is filled, then the
unit is written, flushed, and only then are its chunks' checksums and
``chunk_done`` flags set. Inside :meth:`StoreWriter.burst` the flush and the
flags wait for the end of the burst: one data flush, then the flags of every unit
of the burst, then one more flush (two fsyncs per burst instead of two per unit).
``finish()`` flips ``status`` to ``"complete"`` last, and only when every flag is
set, so a writer killed at any moment leaves a store that readers refuse and
that :meth:`StoreWriter.resume` can finish.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from softlabels.errors import (
    ConfigError,
    DataError,
    IncompleteStore,
    StoreExists,
    StoreMismatch,
)
from softlabels.store import format as fmt
from softlabels.store.backend import Backend, backend_kind, open_backend
from softlabels.store.format import StoreMeta

__all__ = ["StoreWriter"]


@dataclass
class _Pending:
    """A unit being filled: one buffer per row array and which rows arrived."""

    arrays: dict[str, np.ndarray]
    filled: np.ndarray


class StoreWriter:
    """Writes one store. Use :meth:`create` for a new store, :meth:`resume` to finish one.

    As a context manager, a clean exit calls :meth:`finish` (when
    ``finalize_on_exit``) and an exception leaves the store resumable.
    """

    def __init__(self, backend: Backend, meta: StoreMeta, *, unit_rows: int,
                 finalize_on_exit: bool = True) -> None:
        self._backend = backend
        self.meta = meta
        self.unit_rows = unit_rows
        self.finalize_on_exit = finalize_on_exit
        self._specs = meta.row_arrays()
        self._pending: dict[int, _Pending] = {}
        self._burst: list[tuple[range, np.ndarray]] | None = None  # written units awaiting their flags
        self._done = backend.read(fmt.CHUNK_DONE, 0, meta.num_chunks).astype(bool)

    # -- construction --------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        num_samples: int,
        num_classes: int,
        layout: str = "dense",
        topk: int | None = None,
        logits_dtype: str = "float32",
        chunk_rows: int | None = None,
        shard_chunks: int | None = None,
        compress: bool = False,
        teacher: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        created_by: Mapping[str, Any] | None = None,
        backend: str | None = None,
        overwrite: bool = False,
        finalize_on_exit: bool = True,
    ) -> StoreWriter:
        """Create a new store with every array allocated at full size."""
        path = Path(path)
        kind = backend_kind(path, backend)
        if logits_dtype not in fmt.LOGITS_DTYPES:
            raise ConfigError(f"unknown logits dtype {logits_dtype!r}; use one of {', '.join(fmt.LOGITS_DTYPES)}")
        if chunk_rows is None:
            chunk_rows = fmt.default_chunk_rows(topk or num_classes, fmt.LOGITS_DTYPES[logits_dtype].itemsize)
        from softlabels._version import __version__

        meta = StoreMeta(
            layout=layout, num_samples=num_samples, num_classes=num_classes, logits_dtype=logits_dtype,
            chunk_rows=chunk_rows, topk=topk if layout == "topk" else None,
            teacher=dict(teacher or {}), source=dict(source or {}),
            created_by={"softlabels": __version__, **dict(created_by or {})},
        )
        if shard_chunks is not None and (kind != "zarr" or shard_chunks < 1):
            raise ConfigError("sharding needs a Zarr store (*.zarr) and shard_chunks >= 1")
        if compress and layout == "dense":
            raise ConfigError("compression is for top-k stores only (dense logits compress ~1.1x); drop --compress")
        if path.exists() and not overwrite:
            raise StoreExists(f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        if path.exists():
            _remove(path)
        shard_rows = None if shard_chunks is None else shard_chunks * chunk_rows
        store = open_backend(path, "w", kind)
        store.set_attrs(meta.to_attrs())  # status "writing" first, before any array exists
        for name, spec in meta.arrays().items():
            store.create_array(name, spec, chunk_rows=chunk_rows, shard_rows=shard_rows,
                               compress=compress and name in (fmt.TOPK_VALUES, fmt.TOPK_INDICES))
        store.flush()
        return cls(store, meta, unit_rows=shard_rows or chunk_rows, finalize_on_exit=finalize_on_exit)

    @classmethod
    def resume(cls, path: str | Path, *, expect: StoreMeta | None = None, backend: str | None = None,
               finalize_on_exit: bool = True) -> StoreWriter:
        """Reopen an existing store to write its missing chunks.

        With ``expect``, refuse a store whose shape-deciding settings differ.
        """
        from softlabels.store.v1 import SoftLabelStore

        reader = SoftLabelStore(path, backend=backend, allow_partial=True)  # validates schema
        meta, unit_rows = reader.meta, reader.unit_rows
        reader.close()
        if expect is not None:
            diffs = expect.same_shape(meta)
            if diffs:
                raise StoreMismatch(f"{str(path)!r} was made with other settings ({'; '.join(diffs)}); "
                                    "use the original settings, or --overwrite to start over")
        store = open_backend(path, "r+", backend)
        return cls(store, meta, unit_rows=unit_rows, finalize_on_exit=finalize_on_exit)

    # -- progress ------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return self.meta.num_chunks

    def missing_chunks(self) -> list[int]:
        """Chunks whose ``chunk_done`` flag is not set yet."""
        return [int(i) for i in np.flatnonzero(~self._done)]

    def missing_units(self) -> list[int]:
        """Write units (shards, or chunks when unsharded) with any chunk still missing."""
        per = self.unit_rows // self.meta.chunk_rows
        return sorted({c // per for c in self.missing_chunks()})

    def unit_bounds(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.meta.num_samples)

    # -- writing -------------------------------------------------------------------
    def write(self, start: int, **arrays: Any) -> None:
        """Write rows ``[start, start + n)``; every per-row array of the layout must be given."""
        block = self._validate(start, arrays)
        n = len(block[fmt.LABELS])
        pos = start
        while pos < start + n:
            unit = pos // self.unit_rows
            u0, u1 = self.unit_bounds(unit)
            stop = min(u1, start + n)
            piece = {k: v[pos - start:stop - start] for k, v in block.items()}
            if pos == u0 and stop == u1 and unit not in self._pending:
                self._write_unit(unit, piece)  # aligned: no copy into a buffer
            else:
                pend = self._pending.get(unit)
                if pend is None:
                    pend = self._pending[unit] = _Pending(
                        {k: np.empty((u1 - u0,) + s.shape[1:], s.dtype) for k, s in self._specs.items()},
                        np.zeros(u1 - u0, dtype=bool))
                for k, v in piece.items():
                    pend.arrays[k][pos - u0:stop - u0] = v
                pend.filled[pos - u0:stop - u0] = True
                if pend.filled.all():
                    del self._pending[unit]
                    self._write_unit(unit, pend.arrays)
            pos = stop

    def _validate(self, start: int, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        expected = set(self._specs)
        if set(arrays) != expected:
            raise DataError(f"a {self.meta.layout} block needs exactly {sorted(expected)}, got {sorted(arrays)}")
        block: dict[str, np.ndarray] = {}
        for key, spec in self._specs.items():
            value = arrays[key]
            if key in (fmt.LOGITS, fmt.TOPK_VALUES):
                arr = fmt.encode_logits(value, self.meta.logits_dtype)
            else:
                arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
                if key == fmt.TOPK_INDICES and arr.size and (arr.min() < 0 or arr.max() >= self.meta.num_classes):
                    raise DataError(f"top-k indices must lie in 0..{self.meta.num_classes - 1}")
                arr = arr.astype(spec.dtype, copy=False)
            if arr.shape[1:] != spec.shape[1:]:
                raise DataError(f"{key} rows have shape {arr.shape[1:]}, the store expects {spec.shape[1:]}")
            block[key] = arr
        n = {len(v) for v in block.values()}
        if len(n) != 1:
            raise DataError(f"row arrays in one block differ in length: { {k: len(v) for k, v in block.items()} }")
        (rows,) = n
        if start < 0 or start + rows > self.meta.num_samples:
            raise DataError(f"rows {start}..{start + rows} fall outside 0..{self.meta.num_samples}")
        return block

    def _write_unit(self, unit: int, block: Mapping[str, np.ndarray]) -> None:
        u0, u1 = self.unit_bounds(unit)
        chunks = range(u0 // self.meta.chunk_rows, -(-u1 // self.meta.chunk_rows))
        if self._done[chunks.start:chunks.stop].any():
            # Rewriting a finished unit: clear its flags first, so a crash mid-rewrite
            # cannot leave a chunk flagged done over half-written data.
            self._set_flags(chunks, 0)
        for key, arr in block.items():
            self._backend.write(key, u0, arr)
        sums = np.empty(len(chunks), dtype=np.uint32)
        for j, c in enumerate(chunks):
            c0, c1 = self.meta.chunk_bounds(c)
            sums[j] = fmt.chunk_checksum({k: v[c0 - u0:c1 - u0] for k, v in block.items()}, self.meta.checksum)
        if self._burst is None:
            self._burst = [(chunks, sums)]
            self._commit()
        else:
            self._burst.append((chunks, sums))

    @contextmanager
    def burst(self) -> Iterator[None]:
        """Write several units with one flush of their data and one of their flags (at the end).

        Crash-safe like unit-by-unit writing: no flag is set before the data it covers is
        flushed; a crash inside the burst loses only the burst's units, which resume rewrites.
        """
        if self._burst is not None:  # nested: the outer burst commits
            yield
            return
        self._burst = []
        try:
            yield
        except BaseException:
            try:
                self._commit()  # the units written before the error are whole: keep them
            except Exception:  # noqa: BLE001 - the first error is the one to report
                self._burst = None
            raise
        self._commit()

    def _commit(self) -> None:
        """Flush the burst's data, then set its checksums and flags, and flush them."""
        burst, self._burst = self._burst or [], None
        if not burst:
            return
        self._backend.flush()
        # adjacent units in one write each (Zarr writes their one-element files in one call)
        runs: list[tuple[int, list[np.ndarray]]] = []
        for chunks, sums in sorted(burst, key=lambda item: item[0].start):
            if runs and runs[-1][0] + sum(map(len, runs[-1][1])) == chunks.start:
                runs[-1][1].append(sums)
            else:
                runs.append((chunks.start, [sums]))
        for start, parts in runs:
            sums = np.concatenate(parts)
            self._backend.write(fmt.CHECKSUMS, start, sums)
            self._backend.write(fmt.CHUNK_DONE, start, np.ones(len(sums), dtype=np.uint8))
        self._backend.flush()
        for chunks, _ in burst:
            self._done[chunks.start:chunks.stop] = True

    def _set_flags(self, chunks: range, value: int) -> None:
        self._backend.write(fmt.CHUNK_DONE, chunks.start, np.full(len(chunks), value, dtype=np.uint8))
        self._backend.flush()
        self._done[chunks.start:chunks.stop] = bool(value)

    def invalidate(self, chunks: list[int]) -> None:
        """Mark chunks as not done (to regenerate damaged ones) and the store as writing."""
        self._backend.set_attrs({"status": fmt.STATUS_WRITING})
        self.meta = self.meta.with_status(fmt.STATUS_WRITING)
        for c in chunks:
            self._set_flags(range(c, c + 1), 0)

    # -- finishing -----------------------------------------------------------------
    def update_attrs(self, **attrs: Any) -> None:
        """Merge extra information into object attributes (e.g. timings into created_by)."""
        current = self._backend.attrs()
        merged = {k: {**current.get(k, {}), **v} if isinstance(v, dict) else v for k, v in attrs.items()}
        self._backend.set_attrs(merged)

    def finish(self) -> None:
        """Set ``status = "complete"`` if, and only if, every chunk is on disk."""
        on_disk = self._backend.read(fmt.CHUNK_DONE, 0, self.meta.num_chunks).astype(bool)
        missing = np.flatnonzero(~on_disk)
        if self._pending or len(missing):
            raise IncompleteStore(
                f"cannot finish {str(self._backend.path)!r}: {len(missing)} of {self.meta.num_chunks} chunks "
                f"not written ({fmt.chunk_list(missing)}); write the missing rows, then finish"
            )
        self._backend.set_attrs({"status": fmt.STATUS_COMPLETE})
        self._backend.flush()
        self.meta = self.meta.with_status(fmt.STATUS_COMPLETE)

    def close(self) -> None:
        """Close without finishing; partially filled units are dropped (they are rewritten on resume)."""
        self._pending.clear()
        self._backend.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.finalize_on_exit:
                self.finish()
        finally:
            self.close()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
