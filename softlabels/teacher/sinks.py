"""Where the job runner writes: the store created, or checked and reopened (and repaired), the
:class:`BackgroundWriter` that writes the computed pieces, and the store finished.

A rerun may resume only a store made with the same settings: the shape-deciding ones
(positions, layout, N, C, dtype, layout parameters, chunking, views, tokens) and what
decides the values (the teacher and source entries the producer records, and its
``created_by.settings``). A mismatch is refused on one line naming every difference; so is a
format-1 store, which softlabels reads but no longer writes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
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
from softlabels.store.layouts import finite_rows
from softlabels.store.reader import UnitStore
from softlabels.store.remote import store_exists
from softlabels.store.schema import UNIT_DONE, StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.teacher.producer import slice_samples

__all__ = ["BackgroundWriter", "Plan", "finish_store", "nonfinite_ids", "open_for_writing",
           "sample_of_rows"]

# the settings a resumed store must share with the request (besides teacher/source/settings entries)
_SHAPE_KEYS = ("positions", "layout", "num_samples", "num_classes", "logits_dtype", "chunk_samples",
               "shard_chunks", "layout_params", "views", "tokens")


@dataclass
class Plan:
    """Rank 0's plan, sent to every rank: ``bounds[i]``, the samples ``[lo, hi)`` of the i-th
    missing unit; ``owners[i]``, the rank that writes it when every rank writes its own units."""

    bounds: list[tuple[int, int]]
    owners: list[int]
    repaired: list[int]
    complete: bool


def open_for_writing(path: Path, meta: StoreMetaV2, lengths: np.ndarray | None, *, compress: bool,
                     overwrite: bool, repair: bool, say: Callable[[str], None], world: int,
                     finite: bool) -> tuple[UnitWriter, Plan]:
    """Rank 0, lock held: create, or check and reopen (and repair) the store ``meta`` describes
    (token stores: with the samples' ``lengths``); plan its missing units. ``finite``
    (``--on-nonfinite error``): units an earlier ``record`` run stored must hold finite values
    (checked only when one did: a ``record`` run marks the store ``created_by.on_nonfinite``)."""
    if overwrite or not store_exists(path):
        if repair:
            raise ConfigError(f"--repair: there is no store at {str(path)!r} to repair; drop --repair")
        writer = UnitWriter.create(path, meta, lengths=lengths, compress=compress, overwrite=True)
        repaired = []
    else:
        writer, repaired = _reopen(path, meta, lengths, compress=compress, repair=repair, say=say)
    missing = writer.missing_units()
    if not finite and not writer.meta.complete:
        writer.update_created_by({"on_nonfinite": "record"})  # before any unit: a later resume checks them
    recorded = writer.meta.created_by.get("on_nonfinite") == "record"
    if finite and recorded and (done := sorted(set(range(writer.meta.num_units)) - set(missing))):
        with UnitStore(path, allow_partial=True) as store:
            if bad := nonfinite_ids(store, done):  # written by an earlier run with --on-nonfinite record
                writer.close()
                raise NonFiniteOutputs(
                    f"{path} already holds non-finite teacher logits for sample ids "
                    f"{fmt.chunk_list(bad, 5)} (an earlier run with --on-nonfinite record stored "
                    "them); rerun with --on-nonfinite record to keep and list them, or pass "
                    "--overwrite to start over")
    g = meta.geometry
    owner = {u: r for r in range(world) for grp in g.groups_of_rank(r, world) for u in g.group_units_range(grp)}
    bounds = [g.unit_samples_range(u) for u in missing]
    complete = writer.meta.complete and not missing
    return writer, Plan(bounds, [owner[u] for u in missing], repaired, complete)


def finish_store(path: Path, writer: UnitWriter, created: dict[str, Any], *, record: bool,
                 say: Callable[[str], None]) -> list[int]:
    """Record ``created`` (and, with ``record``, the non-finite sample ids) and mark the store complete;
    returns those ids."""
    ids: list[int] = []
    if record:  # the whole store: earlier runs may have stored some too
        with UnitStore(path, allow_partial=True) as store:
            ids = nonfinite_ids(store, np.flatnonzero(store.unit_done()))
        if ids:
            say(f"warning: stored non-finite teacher logits for {len(ids)} sample(s): {fmt.chunk_list(ids, 10)} "
                "(listed in created_by.nonfinite_sample_ids)")
        created["nonfinite_sample_ids"] = ids
    writer.update_created_by(created)
    writer.finish()
    return ids


def _reopen(path: Path, meta: StoreMetaV2, lengths: np.ndarray | None, *, compress: bool,
            repair: bool, say: Callable[[str], None]) -> tuple[UnitWriter, list[int]]:
    """Check the store at ``path`` against ``meta`` and reopen it (repairing it if asked)."""
    version, status, done = _read_flags(path)
    if version == 1:
        raise StoreMismatch(f"{str(path)!r} is a format-1 store, which softlabels reads but no longer writes; "
                            "write to another --out (convert this one with 'softlabels upgrade'), or pass "
                            "--overwrite to replace it")
    if status == fmt.STATUS_COMPLETE and done is not None and not done.all():
        b = open_backend(path, "r+")  # units invalidated by hand: back to writing
        b.set_attrs({"status": fmt.STATUS_WRITING})
        b.flush()
        b.close()
        status = fmt.STATUS_WRITING
    try:
        reader = UnitStore(path, allow_partial=True)
    except (CorruptStore, NotAStore) as err:
        if status != fmt.STATUS_WRITING or (done is not None and done.any()):  # else creation died
            raise type(err)(str(err) if "--overwrite" in str(err)
                            else f"{err} (or pass --overwrite to replace it)") from None
        say(f"{path}: the previous job died while creating the store; starting over")
        return UnitWriter.create(path, meta, lengths=lengths, compress=compress, overwrite=True), []
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


def nonfinite_ids(store: Any, units: Iterable[int]) -> list[int]:
    """Sample ids, sorted, of the positions in ``units`` of ``store`` (any unit reader) holding NaN/inf."""
    layout, ids = store.meta.layout_obj(), []
    for u in units:
        block = store.read_unit(int(u), verify=False)
        rows = layout.nonfinite_rows(block)
        ids += np.unique(sample_of_rows(block[fmt.SAMPLE_IDS], rows, block.get("lengths"))).tolist()
    return ids


class BackgroundWriter:
    """Writes the job runner's ``(start, arrays)`` pieces to a ``UnitWriter`` on a thread, behind a
    buffer of ``depth`` pieces, checking the ``position_keys`` arrays for non-finite values
    (``cum``, tokens only: the samples' first positions). It writes in bursts of ``burst`` pieces,
    or what is pending after ``linger`` s (docs/FORMAT.md, "How `generate` writes"); an error in the
    thread is raised at the next :meth:`put` or at :meth:`close`, and the thread drains on without
    writing."""

    def __init__(self, writer: Any, position_keys: list[str], cum: np.ndarray | None, *, on_nonfinite: str,
                 depth: int = 8, burst: int | None = None, linger: float = 0.25) -> None:
        self.writer, self.position_keys, self.cum = writer, position_keys, cum
        self.on_nonfinite = on_nonfinite
        self._depth, self._burst, self._linger = depth, burst or max(1, depth // 2), linger
        self._pending: list[Any] = []
        self._closed = False
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._kill_after = int(os.environ.get("SOFTLABELS_TEST_KILL_AFTER_UNITS", "0"))  # test hook
        self._missing0 = len(writer.missing_units()) if self._kill_after else 0
        self._thread = threading.Thread(target=self._run, name="softlabels-writer", daemon=True)
        self._thread.start()

    def put(self, block: Any) -> None:
        with self._cv:
            while len(self._pending) >= self._depth and self._error is None:
                self._cv.wait()
            self.check()
            self._pending.append(block)
            if len(self._pending) in (1, self._burst):  # start the linger clock, or a burst is ready
                self._cv.notify_all()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything pending, stop the thread, and raise its error if it had one."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self.check()

    def _run(self) -> None:
        while True:
            with self._cv:
                deadline = None
                while not self._closed and len(self._pending) < self._burst:
                    if self._pending:  # something waits: write it within `linger` seconds
                        deadline = deadline or time.monotonic() + self._linger
                        if time.monotonic() >= deadline:
                            break
                    self._cv.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                blocks, self._pending = self._pending, []
                done = self._closed and not blocks
                self._cv.notify_all()  # room again for the teacher
            if done:
                return
            # One flush of the data and one of the flags per `burst` blocks (a backlog is not
            # one burst: flags keep coming). The kill hook commits block by block instead, to
            # die right after an exact unit.
            size = 1 if self._kill_after else self._burst
            for group in (blocks[i:i + size] for i in range(0, len(blocks), size)):
                if self._error is not None:
                    break
                try:
                    with self.writer.burst():
                        for block in group:
                            self._write(block)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err
                    break
                if self._kill_after and self._missing0 - len(self.writer.missing_units()) >= self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job, right after a unit

    def _write(self, item: tuple[int, dict[str, Any]]) -> None:
        """Check and write a piece unit by unit: each unit's rows are checked, written and checksummed
        while they are in the CPU's cache, and the check's temporaries stay one unit large."""
        a, piece = item
        n = len(piece[fmt.SAMPLE_IDS])
        step = self.writer.meta.geometry.unit_samples
        lo = a
        while lo < a + n:
            hi = min(a + n, (lo // step + 1) * step)
            part = piece if (lo, hi) == (a, a + n) else slice_samples(piece, self.position_keys, a, lo, hi, self.cum)
            if self.on_nonfinite == "error" and not finite_rows({k: part[k] for k in self.position_keys}).all():
                self._refuse(a, piece)  # "record": written, listed at the end
            self.writer.write(lo, **part)
            lo = hi

    def _refuse(self, a: int, piece: dict[str, Any]) -> None:
        """Raise the error naming every sample of the piece with a non-finite stored value."""
        bad = np.flatnonzero(~finite_rows({k: piece[k] for k in self.position_keys}))
        lengths = None if self.cum is None else np.diff(self.cum[a:a + len(piece[fmt.SAMPLE_IDS]) + 1])
        ids = np.unique(sample_of_rows(piece[fmt.SAMPLE_IDS], bad, lengths))
        err = NonFiniteOutputs(
            f"the teacher produced non-finite logits (NaN/inf, or too large for the store dtype) for sample "
            f"ids {fmt.chunk_list(ids, 5)}; nothing was marked complete; fix the teacher or its inputs, or "
            "pass --on-nonfinite record to store them as they are")
        err.sample_ids = ids  # for a caller whose values did not come from a teacher (merge)
        raise err


def sample_of_rows(ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Sample ids of per-position rows (rows are samples, except for ragged tokens: ``lengths`` maps them)."""
    if lengths is not None:
        return ids[np.searchsorted(np.cumsum(lengths), rows, side="right")]
    return ids[rows]
