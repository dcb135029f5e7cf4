"""The job runner: writes a store from any :class:`~softlabels.teacher.producer.Producer`.

``run_job(producer, out, batch_size=B)`` takes the store's lock, creates the store the
producer describes or checks and resumes it (:mod:`softlabels.teacher.sinks`), computes the
missing units on one global grid of batches, so a resumed or multi-rank store equals a
one-shot one bit for bit, and marks the store complete last. Under ``torchrun`` errors are
agreed on by every rank; Zarr ranks write their own units, HDF5 ranks send theirs to rank 0.
The protocol: docs/FORMAT.md, "How `generate` writes".
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from softlabels._runtime import distributed as _distributed
from softlabels._runtime import signals as _signals
from softlabels._runtime.distributed import Dist
from softlabels._runtime.progress import progress_bar
from softlabels._version import __version__
from softlabels.store import format as fmt
from softlabels.store.backend import backend_kind
from softlabels.store.location import store_location
from softlabels.store.lock import store_lock
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.teacher.producer import Producer, slice_samples
from softlabels.teacher.sinks import BackgroundWriter, finish_store, open_for_writing

__all__ = ["GenerateResult", "agreed", "run_job"]


@dataclass(frozen=True)
class GenerateResult:
    """What a job did (timings are for this call only): ``generate``'s, ``merge``'s and ``upgrade``'s result.

    ``tokens_generated`` (token stores only, else None) counts the tokens of the units written.
    """

    path: Path
    num_samples: int
    samples_generated: int
    seconds: float
    already_complete: bool = False
    repaired_units: tuple[int, ...] = ()
    nonfinite_sample_ids: tuple[int, ...] = ()
    is_main: bool = True  # False on ranks other than 0 (they print nothing)
    tokens_generated: int | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples_generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens_generated or 0) / self.seconds if self.seconds > 0 else 0.0


def run_job(producer: Producer, out: str | Path, *, batch_size: int, overwrite: bool = False, repair: bool = False,
            on_nonfinite: str = "error", dist: Dist | None = None, say: Callable[[str], None] | None = None,
            progress: bool | None = False, compress: bool = False) -> GenerateResult:
    """Write (or resume, or repair) the store ``out`` from ``producer``; see the module docstring.

    ``batch_size`` is samples per ``producer.batches`` span (the global grid). ``on_nonfinite``:
    ``"error"`` stops before a unit holding NaN/inf is flagged; ``"record"`` stores it and lists
    the sample ids in ``created_by.nonfinite_sample_ids``. ``say`` gets status lines on rank 0;
    ``progress`` counts samples, or tokens for a token store. ``compress``: the sparse layouts'
    per-position arrays compressed.
    """
    dist = dist or Dist()
    say = say if say is not None and dist.is_main else (lambda _line: None)
    path, t0 = store_location(out), time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta, lengths = producer.meta(), producer.lengths()
    cum = None if lengths is None else np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    gather = dist.active and backend_kind(path) != "zarr"  # one writer: rank 0 writes what the ranks send
    lock, writer, plan = None, None, None
    try:
        with agreed(dist):
            if dist.is_main:
                lock = store_lock(path, say=say)  # a lease object inside the prefix for a URL
                lock.acquire()  # before touching (or overwriting) anything
                # Every rank that writes its own units opens the store, so rank 0 makes it before they start.
                writer, plan = open_for_writing(path, meta, lengths, compress=compress,
                                                overwrite=overwrite, repair=repair, say=say,
                                                world=dist.world, finite=on_nonfinite == "error")
                writer.guard = lock.check
        plan = dist.broadcast(plan)
        if plan.complete:
            return GenerateResult(path, meta.num_samples, 0, time.perf_counter() - t0, already_complete=True,
                                  repaired_units=tuple(plan.repaired), is_main=dist.is_main)
        ranges = sample_ranges(range(len(plan.bounds)), plan.bounds.__getitem__)
        total = sum(b - a for a, b in ranges)
        tokens = None if cum is None else int(sum(cum[b] - cum[a] for a, b in ranges))
        quiet = progress is False or not dist.is_main
        # agreed: also the barrier, every rank's units are flagged before rank 0 finishes; the bar
        # is made inside it, so a rank that cannot make it stops every rank
        with agreed(dist), progress_bar(total=total if cum is None else tokens, desc="generate",
                                        unit="samples" if cum is None else "tokens",
                                        show=False if quiet else progress,
                                        say=(lambda _line: None) if quiet else say,
                                        unit_scale=True) as bar:
            job = _Compute(producer, meta, cum, batch_size, on_nonfinite, bar, dist)
            if gather:
                job.gathered(writer, ranges)
            else:
                mine = [i for i, r in enumerate(plan.owners) if r == dist.rank]
                if wanted := sample_ranges(mine, plan.bounds.__getitem__):
                    writer = writer if writer is not None else UnitWriter.resume(path)
                    job.local(writer, wanted)
        ids: list[int] = []
        with agreed(dist):
            if dist.is_main:
                wall = time.perf_counter() - t0
                created: dict[str, Any] = {"softlabels": __version__, "timings": {
                    "wall_seconds": round(wall, 3), "samples_per_second": round(total / wall, 1) if wall > 0 else None,
                    "samples_generated": total, "ranks": dist.world, "started_at": started,
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
                ids = finish_store(path, writer, created, record=on_nonfinite == "record", say=say)
        return GenerateResult(path, meta.num_samples, total, time.perf_counter() - t0,
                              repaired_units=tuple(plan.repaired), nonfinite_sample_ids=tuple(ids),
                              is_main=dist.is_main, tokens_generated=tokens)
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()


@contextmanager
def agreed(dist: Dist) -> Iterator[None]:
    """Run the body on this rank, then agree: an error of any rank is raised on every rank."""
    exc = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - agreed on by every rank, then raised
        exc = err
    dist.agree(exc)


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


class _Compute:
    """One rank's share of the computing: its pieces, written here or sent to rank 0."""

    def __init__(self, producer: Producer, meta: StoreMetaV2, cum: np.ndarray | None, batch_size: int,
                 on_nonfinite: str, bar: Any, dist: Dist) -> None:
        self.producer, self.meta, self.cum, self.batch_size = producer, meta, cum, batch_size
        self.on_nonfinite, self.bar, self.dist = on_nonfinite, bar, dist
        self.position_keys = [k for k, a in meta.arrays().items() if a.family == "position"]
        bytes_per_sample = meta.layout_obj().bytes_per_position * int((meta.views or {}).get("count", 1)) + 16
        self.depth = int(min(1024, max(8, (64 << 20) // (batch_size * bytes_per_sample))))  # ~64 MiB may wait
        # test hook: seconds of sleep after each piece
        self.delay = float(os.environ.get("SOFTLABELS_TEST_DELAY_PER_UNIT", "0") or 0)

    def _writer(self, target: Any, depth: int) -> BackgroundWriter:
        return BackgroundWriter(target, self.position_keys, self.cum, on_nonfinite=self.on_nonfinite, depth=depth)

    def _pieces(self, spans: list[tuple[int, int]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        # called before any writer thread starts: the producer may fork its input workers here
        return self._track(self.producer.batches(spans))

    def _track(self, pieces: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for start, arrays in pieces:
            _signals.check()  # a stop signal whose KeyboardInterrupt was swallowed
            yield start, arrays
            n = len(arrays[fmt.SAMPLE_IDS])
            done = n if self.cum is None else int(self.cum[start + n] - self.cum[start])
            self.bar.update(min(done * self.dist.world, self.bar.total - self.bar.n))  # ranks progress alike
            if self.delay > 0:
                time.sleep(self.delay)

    def local(self, writer: Any, wanted: list[tuple[int, int]]) -> None:
        """Compute and write this rank's own units (``wanted`` samples)."""
        it = self._pieces(grid_spans(wanted, self.batch_size, self.meta.num_samples))
        bw = self._writer(writer, self.depth)
        try:
            for start, arrays in it:  # a batch may straddle a unit that is written already: its wanted part
                for piece in select(start, arrays, wanted, self.position_keys, self.cum):
                    bw.put(piece)
        finally:
            with suppress(Exception):  # the error already being raised wins
                bw.close()
        bw.check()  # else the writer thread's error, if any

    def gathered(self, writer: Any, ranges: list[tuple[int, int]]) -> None:
        """One writer (HDF5 under torchrun): every rank computes its run of the grid's batches, in
        lockstep rounds, and rank 0 writes what they send."""
        dist = self.dist
        spans = grid_spans(ranges, self.batch_size, self.meta.num_samples)
        runs = [spans[r * len(spans) // dist.world:(r + 1) * len(spans) // dist.world] for r in range(dist.world)]
        mine = runs[dist.rank]
        it = self._pieces(mine)
        bw = self._writer(writer, self.depth * dist.world) if dist.is_main else None
        own: Exception | None = None
        verdict = None
        for r in range(max(map(len, runs))):
            payload: Any = []
            if r < len(mine):
                try:
                    payload = self._span(it, mine[r], ranges)
                except Exception as err:  # noqa: BLE001
                    own, payload = err, ("error", _distributed.pack_error(err))
            got = dist.gather(payload)
            if dist.is_main:
                verdict = next((p[1] for p in got if isinstance(p, tuple)), None)
                try:
                    for pieces in ([] if verdict else got):
                        for piece in pieces:
                            bw.put(piece)
                except Exception as err:  # noqa: BLE001
                    own, verdict = err, _distributed.pack_error(err)
            verdict = dist.broadcast(verdict)
            if verdict is not None:
                break
        if bw is not None:
            try:
                bw.close()
            except Exception as err:  # noqa: BLE001
                own, verdict = own or err, verdict or _distributed.pack_error(err)
        verdict = dist.broadcast(verdict)
        if verdict is not None:
            raise own or _distributed.unpack_error(verdict)

    def _span(self, it: Iterator[tuple[int, dict[str, np.ndarray]]], span: tuple[int, int],
              ranges: list[tuple[int, int]]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The wanted samples of the pieces covering ``span``, ready to send."""
        out: list[tuple[int, dict[str, np.ndarray]]] = []
        end = span[0]
        while end < span[1]:
            start, arrays = next(it)
            end = start + len(arrays[fmt.SAMPLE_IDS])
            out += select(start, arrays, ranges, self.position_keys, self.cum)
        return out


def select(start: int, arrays: dict[str, Any], wanted: Sequence[tuple[int, int]], position_keys: list[str],
           cum: np.ndarray | None) -> list[tuple[int, dict[str, Any]]]:
    """The parts ``(a, arrays)`` of a piece starting at ``start`` that fall in the ``wanted`` ranges."""
    n = len(arrays[fmt.SAMPLE_IDS])
    out = []
    for lo, hi in wanted:
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((a, arrays if (a, b) == (start, start + n) else slice_samples(arrays, position_keys, start, a, b, cum)))
    return out
