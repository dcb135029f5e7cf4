"""Where the job runner writes: the :class:`Sink` creates, or checks and reopens, repairs and finishes a store.

A rerun may resume only a store made with the same settings: the shape-deciding ones
(positions, layout, N, C, dtype, layout parameters, chunking, views, tokens) and what
decides the values (the teacher and source entries the producer records, and its
``created_by.settings``). A mismatch is refused on one line naming every difference; so is a
format-1 store, which softlabels reads but no longer writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from softlabels.errors import (
    ConfigError,
    CorruptStore,
    NonFiniteOutputs,
    NotAStore,
    SoftLabelsError,
    StoreMismatch,
)
from softlabels.store import format as fmt
from softlabels.store.backend import open_backend
from softlabels.store.reader import UnitStore
from softlabels.store.remote import store_exists
from softlabels.store.schema import UNIT_DONE, StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.teacher.pipeline import sample_of_rows

__all__ = ["Opened", "Sink", "nonfinite_ids", "scan_nonfinite"]

# the settings a resumed store must share with the request (besides teacher/source/settings entries)
_SHAPE_KEYS = ("positions", "layout", "num_samples", "num_classes", "logits_dtype", "chunk_samples",
               "shard_chunks", "layout_params", "views", "tokens")


@dataclass
class Opened:
    """A store opened by rank 0: its writer and its plan: ``bounds[i]``, the samples ``[lo, hi)`` of the
    i-th missing unit; ``owners[i]``, the rank that writes it when every rank writes its own units."""

    writer: UnitWriter
    bounds: list[tuple[int, int]]
    owners: list[int]
    repaired: list[int]
    complete: bool


class Sink:
    """The store described by ``meta`` (token stores: with the samples' ``lengths``), as the runner writes it."""

    def __init__(self, path: Path, meta: StoreMetaV2, lengths: np.ndarray | None, *, compress: bool = False) -> None:
        self.path, self.meta, self.lengths, self.compress = path, meta, lengths, compress

    def open(self, *, overwrite: bool, repair: bool, say: Callable[[str], None], world: int,
             finite: bool = False) -> Opened:
        """Rank 0, lock held: create, or check and reopen (and repair) the store; plan its missing units.
        ``finite`` (``--on-nonfinite error``): units an earlier ``record`` run stored must hold finite values
        (checked only when one did: a ``record`` run marks the store ``created_by.on_nonfinite``)."""
        writer, repaired = self._open(overwrite=overwrite, repair=repair, say=say)
        missing = writer.missing_units()
        if not finite and not writer.meta.complete:
            writer.update_created_by({"on_nonfinite": "record"})  # before any unit: a later resume checks them
        recorded = writer.meta.created_by.get("on_nonfinite") == "record"
        if finite and recorded and (done := sorted(set(range(writer.meta.num_units)) - set(missing))):
            with UnitStore(self.path, allow_partial=True) as store:
                if bad := nonfinite_ids(store, done):  # written by an earlier run with --on-nonfinite record
                    writer.close()
                    raise NonFiniteOutputs(
                        f"{self.path} already holds non-finite teacher logits for sample ids {fmt.chunk_list(bad, 5)} "
                        "(an earlier run with --on-nonfinite record stored them); rerun with --on-nonfinite record "
                        "to keep and list them, or pass --overwrite to start over")
        g = self.meta.geometry
        owner = {u: r for r in range(world) for grp in g.groups_of_rank(r, world) for u in g.group_units_range(grp)}
        return Opened(writer, [g.unit_samples_range(u) for u in missing], [owner[u] for u in missing], repaired,
                      writer.meta.complete and not missing)

    def resume(self) -> UnitWriter:
        """Reopen the store (created by rank 0) on another rank, to write that rank's own units."""
        return UnitWriter.resume(self.path)

    def finish(self, writer: UnitWriter, created: dict[str, Any], *, record: bool,
               say: Callable[[str], None]) -> list[int]:
        """Record ``created`` (and, with ``record``, the non-finite sample ids) and mark the store complete;
        returns those ids."""
        ids: list[int] = []
        if record:  # the whole store: earlier runs may have stored some too
            ids = scan_nonfinite(self.path)
            if ids:
                say(f"warning: stored non-finite teacher logits for {len(ids)} sample(s): {fmt.chunk_list(ids, 10)} "
                    "(listed in created_by.nonfinite_sample_ids)")
            created["nonfinite_sample_ids"] = ids
        writer.update_created_by(created)
        writer.finish()
        return ids

    def _open(self, *, overwrite: bool, repair: bool, say: Callable[[str], None]) -> tuple[UnitWriter, list[int]]:
        """Create the store, or check it against ``meta`` and reopen it (repairing it if asked)."""
        path, meta, lengths = self.path, self.meta, self.lengths
        if overwrite or not store_exists(path):
            if repair:
                raise ConfigError(f"--repair: there is no store at {str(path)!r} to repair; drop --repair")
            return UnitWriter.create(path, meta, lengths=lengths, compress=self.compress, overwrite=True), []
        version, status, done = _read_flags(path)
        if version == 1:
            raise StoreMismatch(f"{str(path)!r} is a format-1 store, which softlabels reads but no longer writes; "
                                "write to another --out (convert this one with 'softlabels upgrade'), or pass "
                                "--overwrite to replace it")
        status = _reopen_holes(path, status, done)
        try:
            reader = UnitStore(path, allow_partial=True)
        except (CorruptStore, NotAStore) as err:
            if not _creation_interrupted(status, done):
                raise type(err)(str(err) if "--overwrite" in str(err)
                                else f"{err} (or pass --overwrite to replace it)") from None
            say(f"{path}: the previous job died while creating the store; starting over")
            return UnitWriter.create(path, meta, lengths=lengths, compress=self.compress, overwrite=True), []
        try:
            diffs = _diffs(reader.meta, meta)
            if diffs:
                raise StoreMismatch(f"{str(path)!r} was made with other settings ({'; '.join(diffs)}); rerun with "
                                    "the original settings, or pass --overwrite to replace it")
            repaired = reader.verify() if repair else []
        finally:
            reader.close()
        writer = UnitWriter.resume(path, expect=meta)
        if repaired:
            say(f"repair: {len(repaired)} unit(s) fail verification ({fmt.chunk_list(repaired)}); regenerating them")
            writer.invalidate(repaired)
        elif repair:
            say(f"repair: every written unit of {path} passes its checksum")
        return writer, repaired


def _read_flags(path: Path) -> tuple[int | None, str | None, np.ndarray | None]:
    """(format version, status, the unit done flags) read straight from the backend; Nones where unreadable."""
    try:
        b = open_backend(path, "r")
    except (SoftLabelsError, OSError):
        return None, None, None
    try:
        attrs = b.attrs()
        version, status = attrs.get("softlabels_format"), attrs.get("status")
        if UNIT_DONE not in b.array_names():
            return version, status, None
        return version, status, b.read(UNIT_DONE, 0, b.array_info(UNIT_DONE)[0][0])
    except Exception:  # noqa: BLE001 - damaged: the caller reports the reader's error instead
        return None, None, None
    finally:
        b.close()


def _reopen_holes(path: Path, status: str | None, done: np.ndarray | None) -> str | None:
    """A store marked complete with units unflagged (invalidated by hand) goes back to writing; its status."""
    if status == fmt.STATUS_COMPLETE and done is not None and not done.all():
        b = open_backend(path, "r+")
        b.set_attrs({"status": fmt.STATUS_WRITING})
        b.flush()
        b.close()
        return fmt.STATUS_WRITING
    return status


def _creation_interrupted(status: str | None, done: np.ndarray | None) -> bool:
    """True when a damaged store never had a unit flagged: its creation died, nothing is lost."""
    return status == fmt.STATUS_WRITING and (done is None or not done.any())


def _diffs(have: StoreMetaV2, want: StoreMetaV2) -> list[str]:
    """What differs between a store and the request: shape keys, then the teacher/source/settings entries."""
    diffs = [f"{k} {getattr(have, k)!r} in the store, {getattr(want, k)!r} asked" for k in _SHAPE_KEYS
             if getattr(have, k) != getattr(want, k)]
    for name, theirs, mine in (("teacher", have.teacher, want.teacher), ("source", have.source, want.source),
                               ("settings", have.created_by.get("settings") or {},
                                want.created_by.get("settings") or {})):
        diffs += [f"{name}.{k} {theirs.get(k)!r} in the store, {v!r} asked" for k, v in mine.items()
                  if theirs.get(k) != v]
    return diffs


def scan_nonfinite(path: Path) -> list[int]:
    """Sample ids of stored positions holding a non-finite value (``--on-nonfinite record``)."""
    with UnitStore(path, allow_partial=True) as store:
        return nonfinite_ids(store, np.flatnonzero(store.unit_done()))


def nonfinite_ids(store: Any, units: Iterable[int]) -> list[int]:
    """Sample ids, sorted, of the positions in ``units`` of ``store`` (any unit reader) holding NaN/inf."""
    layout, ids = store.meta.layout_obj(), []
    for u in units:
        block = store.read_unit(int(u), verify=False)
        rows = layout.nonfinite_rows(block)
        ids += np.unique(sample_of_rows(block[fmt.SAMPLE_IDS], rows, block.get("lengths"))).tolist()
    return ids
