"""The job runner: writes a format-v2 store from any :class:`~softlabels.job.producer.Producer`.

``run_job(producer, out, batch_size=B)`` takes the store's lock (``STORE.lock``), creates
the store or resumes it (``UnitWriter.resume(expect=meta)``; a store made with other
settings is refused on one line), plans the missing units, computes them and marks the
store complete last, only when every unit is flagged. ``repair=True`` verifies every
finished unit's checksum first and regenerates the ones that fail.

Batches lie on one global grid: batch ``b`` is samples ``[b·B, (b+1)·B)``, whatever the
chunk size (a batch may span several units; ``UnitWriter`` buffers partial units), so
the teacher's batch size never depends on the chunk size. A sample is always computed
in the same batch, with the same neighbours, whichever units are missing and whichever
rank computes it: a resumed or multi-rank store equals a one-shot one bit for bit. A
batch straddling a unit that is already written (or another rank's) is computed whole
and only the wanted samples are written.

Under ``torchrun`` each rank writes its own bookkeeping groups
(``UnitGeometry.groups_of_rank``), so no two writers share a chunk, shard or flag file;
rank 0 creates the store before the others open it and finishes it after a barrier.
That takes a Zarr store: HDF5 has one writer, and is refused under torchrun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from softlabels import _signals
from softlabels import format as fmt
from softlabels._distributed import Dist
from softlabels._lock import StoreLock
from softlabels._pipeline import BackgroundWriter, unit_delay_hook
from softlabels._progress import progress as progress_bar
from softlabels.errors import ConfigError, CorruptStore, NonFiniteOutputs, NotAStore, SoftLabelsError, StoreMismatch
from softlabels.job.producer import Producer
from softlabels.layouts import finite_rows
from softlabels.store import backend_kind, open_backend
from softlabels.store.schema import UNIT_DONE, StoreMetaV2
from softlabels.store.unit_reader import UnitStore
from softlabels.store.unit_writer import UnitWriter

__all__ = ["JobResult", "run_job", "store_format"]

# the settings a resumed store must share with the request (besides teacher/source/settings entries)
_SHAPE_KEYS = ("positions", "layout", "num_samples", "num_classes", "logits_dtype", "chunk_samples",
               "shard_chunks", "layout_params", "views", "tokens")


@dataclass(frozen=True)
class JobResult:
    """What a :func:`run_job` call did (timings are for this call only)."""

    path: Path
    num_samples: int
    samples_generated: int
    seconds: float
    already_complete: bool = False
    repaired_units: tuple[int, ...] = ()
    nonfinite_sample_ids: tuple[int, ...] = ()
    is_main: bool = True

    @property
    def samples_per_second(self) -> float:
        return self.samples_generated / self.seconds if self.seconds > 0 else 0.0


def run_job(producer: Producer, out: str | Path, *, batch_size: int, overwrite: bool = False, repair: bool = False,
            on_nonfinite: str = "error", dist: Dist | None = None, say: Callable[[str], None] | None = None,
            progress: bool | None = False) -> JobResult:
    """Write (or resume, or repair) the v2 store ``out`` from ``producer``; see the module docstring.

    ``batch_size`` is samples per ``producer.batches`` span (the global grid). ``on_nonfinite``:
    ``"error"`` stops before a unit holding NaN/inf is flagged; ``"record"`` stores it and lists
    the sample ids in ``created_by.nonfinite_sample_ids``. ``say`` gets status lines on rank 0.
    """
    dist = dist or Dist()
    say = say if say is not None and dist.is_main else (lambda _line: None)
    path, t0 = Path(out), time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta, lengths = producer.meta(), producer.lengths()
    cum = None if lengths is None else np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if dist.active and backend_kind(path) != "zarr":
        raise ConfigError(f"under torchrun every rank writes its own units, which an HDF5 file cannot take; "
                          f"write {path.with_suffix('.zarr').name!r} (*.zarr) instead, or run one process")
    lock, writer, plan, exc = None, None, None, None
    try:
        if dist.is_main:
            try:
                lock = StoreLock(path)
                lock.acquire()  # before touching (or overwriting) anything
                writer, repaired = _open(path, meta, lengths, overwrite=overwrite, repair=repair, say=say)
                missing = writer.missing_units()
                plan = {"missing": missing, "repaired": repaired, "complete": writer.meta.complete and not missing}
            except Exception as err:  # noqa: BLE001 - agreed on by every rank, then raised
                exc = err
        dist.agree(exc)
        plan = dist.broadcast(plan)
        g = meta.geometry
        if plan["complete"]:
            return JobResult(path, meta.num_samples, 0, time.perf_counter() - t0, already_complete=True,
                             repaired_units=tuple(plan["repaired"]), is_main=dist.is_main)
        owned = {u for grp in g.groups_of_rank(dist.rank, dist.world) for u in g.group_units_range(grp)}
        wanted = sample_ranges([u for u in plan["missing"] if u in owned], g.unit_samples_range)
        total = sum(b - a for a, b in sample_ranges(plan["missing"], g.unit_samples_range))
        exc = None
        try:
            if wanted:
                if writer is None:
                    writer = UnitWriter.resume(path)
                show = progress if dist.is_main else False
                with progress_bar(total=total, desc="generate", unit="samples", show=show,
                                  say=say if show is not False else (lambda _line: None), unit_scale=True) as bar:
                    _compute(producer, writer, wanted, batch_size, on_nonfinite, bar, dist.world, cum)
        except Exception as err:  # noqa: BLE001
            exc = err
        dist.agree(exc)  # also the barrier: every rank's units are flagged before rank 0 finishes
        ids, exc = [], None
        if dist.is_main:
            try:
                ids = _finish(writer, path, on_nonfinite, say, total, time.perf_counter() - t0, started, dist.world)
            except Exception as err:  # noqa: BLE001
                exc = err
        dist.agree(exc)
        return JobResult(path, meta.num_samples, total, time.perf_counter() - t0,
                         repaired_units=tuple(plan["repaired"]), nonfinite_sample_ids=tuple(ids),
                         is_main=dist.is_main)
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()


def sample_ranges(units: Sequence[int], bounds: Callable[[int], tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted units -> their samples as merged ``[lo, hi)`` ranges."""
    out: list[tuple[int, int]] = []
    for u in sorted(units):
        lo, hi = bounds(u)
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def grid_spans(ranges: Sequence[tuple[int, int]], batch_size: int, num_samples: int) -> list[tuple[int, int]]:
    """The global grid's batches ``[b·B, (b+1)·B)`` (clipped to N) that cover ``ranges``, each once, in order."""
    spans: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for b in range(lo // batch_size, -(-hi // batch_size)):
            span = (b * batch_size, min((b + 1) * batch_size, num_samples))
            if not spans or spans[-1] != span:
                spans.append(span)
    return spans


def store_format(path: str | Path) -> int | None:
    """The ``softlabels_format`` of the store at ``path`` (None when there is none, or it is unreadable)."""
    return _root(Path(path))[0]


# -- opening -------------------------------------------------------------------------------------

def _root(path: Path) -> tuple[int | None, str | None, np.ndarray | None]:
    """(format version, status, unit_done) read straight from the backend; Nones where unreadable."""
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


def _open(path: Path, meta: StoreMetaV2, lengths: np.ndarray | None, *, overwrite: bool, repair: bool,
          say: Callable[[str], None]) -> tuple[UnitWriter, list[int]]:
    """Create the store, or check it against ``meta`` and reopen it (repairing it if asked)."""
    if overwrite or not path.exists():
        if repair:
            raise ConfigError(f"--repair: there is no store at {str(path)!r} to repair; drop --repair")
        return UnitWriter.create(path, meta, lengths=lengths, overwrite=True), []
    version, status, done = _root(path)
    if version not in (None, meta.format_version):
        raise StoreMismatch(f"{str(path)!r} is a format-{version} store and this job writes format "
                            f"{meta.format_version}; rerun with the settings it was made with, or pass --overwrite "
                            "to replace it")
    if status == fmt.STATUS_COMPLETE and done is not None and not done.all():  # units invalidated by hand
        b = open_backend(path, "r+")
        b.set_attrs({"status": fmt.STATUS_WRITING})
        b.flush()
        b.close()
    try:
        reader = UnitStore(path, allow_partial=True)
    except (CorruptStore, NotAStore) as err:
        if status != fmt.STATUS_WRITING or (done is not None and done.any()):
            raise type(err)(str(err) if "--overwrite" in str(err) else f"{err} (or pass --overwrite to replace it)") \
                from None
        say(f"{path}: the previous job died while creating the store; starting over")
        return UnitWriter.create(path, meta, lengths=lengths, overwrite=True), []
    try:
        diffs = _diffs(reader.meta, meta)
        if diffs:
            raise StoreMismatch(f"{str(path)!r} was made with other settings ({'; '.join(diffs)}); rerun with the "
                                "original settings, or pass --overwrite to replace it")
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


# -- computing -----------------------------------------------------------------------------------

def _compute(producer: Producer, writer: UnitWriter, wanted: list[tuple[int, int]], batch_size: int,
             on_nonfinite: str, bar: Any, world: int, cum: np.ndarray | None) -> None:
    meta = writer.meta
    spans = grid_spans(wanted, batch_size, meta.num_samples)
    pieces = producer.batches(spans)  # before the writer thread: the producer may fork input workers
    bytes_per_sample = meta.layout_obj().bytes_per_position * int((meta.views or {}).get("count", 1)) + 16
    depth = int(min(1024, max(8, (64 << 20) // (batch_size * bytes_per_sample))))  # ~64 MiB may wait
    bw = _PieceWriter(writer, wanted, cum, on_nonfinite=on_nonfinite, depth=depth)
    try:
        for start, arrays in pieces:
            _signals.check()  # a stop signal whose KeyboardInterrupt was swallowed
            bw.put((start, arrays))
            bar.update(min(len(arrays[fmt.SAMPLE_IDS]) * world, bar.total - bar.n))  # ranks progress alike
            unit_delay_hook()
    finally:
        try:
            bw.close()
        except Exception:  # noqa: BLE001 - the error already being raised wins
            pass
    bw.check()


class _PieceWriter(BackgroundWriter):
    """The background writer for ``(start, arrays)`` pieces: keeps the wanted samples, checks finiteness.

    ``cum`` (tokens only): the first position of every sample, and N + 1 the total.
    """

    def __init__(self, writer: UnitWriter, wanted: list[tuple[int, int]], cum: np.ndarray | None, *,
                 on_nonfinite: str, depth: int) -> None:
        self.wanted, self.cum = wanted, cum
        self.layout = writer.meta.layout_obj()
        self.position_keys = [k for k, a in writer.meta.arrays().items() if a.family == "position"]
        super().__init__(writer, on_nonfinite=on_nonfinite, depth=depth)

    def _write(self, item: tuple[int, dict[str, Any]]) -> None:
        start, arrays = item
        n = len(arrays[fmt.SAMPLE_IDS])
        for lo, hi in self.wanted:
            a, b = max(lo, start), min(hi, start + n)
            if a >= b:
                continue
            piece = arrays if (a, b) == (start, start + n) else _slice(arrays, self.position_keys, start, a, b, self.cum)
            bad = np.flatnonzero(~finite_rows({k: piece[k] for k in self.position_keys}))
            if len(bad) and self.on_nonfinite == "error":  # "record": written, listed at the end
                lengths = None if self.cum is None else np.diff(self.cum[a:b + 1])
                ids = np.unique(_sample_of_rows(piece[fmt.SAMPLE_IDS], bad, lengths))
                raise NonFiniteOutputs(
                    f"the teacher produced non-finite logits (NaN/inf, or too large for the store dtype) for sample "
                    f"ids {fmt.chunk_list(ids, 5)}; nothing was marked complete; fix the teacher or its inputs, or "
                    "pass --on-nonfinite record to store them as they are")
            self.writer.write(a, **piece)


def _slice(arrays: dict[str, Any], position_keys: list[str], start: int, a: int, b: int,
           cum: np.ndarray | None) -> dict[str, Any]:
    """Samples ``[a, b)`` of a piece starting at ``start`` (ragged tokens: their positions by ``cum``)."""
    if cum is not None:
        p0, p1 = int(cum[a] - cum[start]), int(cum[b] - cum[start])
    else:
        p0, p1 = a - start, b - start
    return {k: (v[p0:p1] if k in position_keys else v[a - start:b - start]) for k, v in arrays.items()}


def _sample_of_rows(ids: np.ndarray, rows: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Sample ids of per-position rows (rows are samples, except for ragged tokens: ``lengths`` maps them)."""
    if lengths is not None:
        return ids[np.searchsorted(np.cumsum(lengths), rows, side="right")]
    return ids[rows]


# -- finishing -----------------------------------------------------------------------------------

def _finish(writer: UnitWriter, path: Path, on_nonfinite: str, say: Callable[[str], None], samples: int,
            wall: float, started: str, world: int) -> list[int]:
    ids: list[int] = []
    if on_nonfinite == "record":  # the whole store: earlier runs may have stored some too
        ids = scan_nonfinite(path)
        if ids:
            say(f"warning: stored non-finite teacher logits for {len(ids)} sample(s): {fmt.chunk_list(ids, 10)} "
                "(listed in created_by.nonfinite_sample_ids)")
    created: dict[str, Any] = {"timings": {
        "wall_seconds": round(wall, 3), "samples_per_second": round(samples / wall, 1) if wall > 0 else None,
        "samples_generated": samples, "ranks": world, "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    if on_nonfinite == "record":
        created["nonfinite_sample_ids"] = ids
    writer.update_created_by(created)
    writer.finish()
    return ids


def scan_nonfinite(path: Path) -> list[int]:
    """Sample ids of stored positions holding a non-finite value (``--on-nonfinite record``)."""
    ids: list[int] = []
    with UnitStore(path, allow_partial=True) as store:
        layout = store.meta.layout_obj()
        for u in np.flatnonzero(store.unit_done()):
            block = store.read_unit(int(u), verify=False)
            rows = layout.nonfinite_rows(block)
            ids += np.unique(_sample_of_rows(block[fmt.SAMPLE_IDS], rows, block.get("lengths"))).tolist()
    return ids
