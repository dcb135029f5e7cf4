"""Epoch order of :class:`~softlabels.student.dataset.SoftLabelDataset`: pure index math, no I/O.

The rows of all sources form one list of *global chunks* (source 0's in order, then source 1's, ...).
An epoch's order is built in four steps:

1. the global chunks are permuted with an RNG seeded from ``(seed, epoch)`` (identity without
   shuffling); concatenated, they form the epoch's *row stream* of ``T`` rows;
2. rank ``r`` of ``P`` takes rows ``[r*T//P, (r+1)*T//P)``: ranks differ by at most one row and only
   a rank's two ends cut a chunk;
3. the rank's ``ceil(L/B)`` batches are split into balanced contiguous runs, one per DataLoader
   worker, so the batches a rank yields do not depend on the number of workers;
4. a worker's chunk pieces are grouped into windows of ``window_chunks``, each window's rows permuted
   with an RNG seeded from ``(seed, epoch, rank, worker, window)``, and the stream of windows cut into
   batches of ``B`` rows (a batch may straddle windows). Resuming skips whole windows by arithmetic.

That is ``share="rows"`` (``sample`` and ``views`` rows). Token stores share an epoch by global
batches (``share="batches"``, docs/TOKENS.md): rank ``r`` takes the ``r``-th slice of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

__all__ = ["Window", "split", "worker_batch_counts", "resume_point", "plan_windows", "batch_pieces",
           "chunk_batches", "batches_per_epoch", "loader_batches"]

_CHUNK_TAG, _WINDOW_TAG = 0, 1  # keep the two RNG families apart


@dataclass(frozen=True)
class Window:
    """Consecutive chunk pieces of one worker's stream, shuffled together."""

    index: int  # window number within the worker's epoch stream (seeds its shuffle)
    chunks: np.ndarray  # global chunk ids, in stream order
    lo: np.ndarray  # first row used of each chunk (0 except at a rank/worker edge)
    hi: np.ndarray  # stop row of each chunk
    start: int  # position of the window's first row in the worker's stream

    @property
    def rows(self) -> int:
        return int((self.hi - self.lo).sum())


def split(total: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``parts`` balanced contiguous parts of ``range(total)``."""
    return i * total // parts, (i + 1) * total // parts


def worker_batch_counts(total: int, batch_size: int, rank: int, world: int, workers: int) -> np.ndarray:
    """Batches each of a rank's workers yields per epoch."""
    a, b = split(total, world, rank)
    nb = -(-(b - a) // batch_size)
    return np.diff([split(nb, workers, w)[0] for w in range(workers)] + [nb]).astype(np.int64)


def resume_point(counts: Sequence[int] | np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The batches taken from each worker after the loop consumed ``k``, and the worker due next.

    A DataLoader takes batches round-robin from workers 0, 1, ..., W-1, skipping exhausted ones:
    after ``j`` full rounds worker ``w`` has given ``min(counts[w], j)``, the rest comes from the
    first workers still going.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 0 <= k <= int(counts.sum()):
        raise ValueError(f"{k} batches consumed, but the workers yield {int(counts.sum())}")
    lo, hi = 0, int(counts.max(initial=0))
    while lo < hi:  # largest j with sum(min(counts, j)) <= k
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= k:
            lo = mid
        else:
            hi = mid - 1
    taken = np.minimum(counts, lo)
    rest = k - int(taken.sum())
    going = np.flatnonzero(counts > lo)  # workers yet to give their batch of round `lo`
    taken[going[:rest]] += 1
    return taken, int(going[rest]) if rest < len(going) else 0


def plan_windows(sizes: np.ndarray, order: np.ndarray, lo: int, hi: int, window_chunks: int,
                 skip: int = 0) -> tuple[list[Window], int]:
    """The windows of stream rows ``[lo, hi)`` still (partly) needed after the first ``skip`` rows, and how
    many rows of the first one are consumed (``sizes[g]``: the rows of global chunk ``g``)."""
    if hi <= lo:
        return [], 0
    cum = np.concatenate([[0], np.cumsum(sizes[order])]).astype(np.int64)
    first = int(np.searchsorted(cum, lo, side="right")) - 1
    last = int(np.searchsorted(cum, hi, side="left"))
    pos = np.arange(first, last)
    seg_lo = np.maximum(cum[pos], lo) - cum[pos]
    seg_hi = np.minimum(cum[pos + 1], hi) - cum[pos]
    keep = seg_hi > seg_lo
    pos, seg_lo, seg_hi = pos[keep], seg_lo[keep], seg_hi[keep]
    windows, start = [], 0
    for w, s in enumerate(range(0, len(pos), window_chunks)):
        sl = slice(s, s + window_chunks)
        win = Window(w, order[pos[sl]], seg_lo[sl], seg_hi[sl], start)
        start += win.rows
        if start > skip:  # not wholly consumed
            windows.append(win)
    offset = skip - windows[0].start if windows else 0
    return windows, offset


def batch_pieces(window_rows: Sequence[int], batch_size: int, skip: int = 0) -> Iterator[list[tuple[int, int, int]]]:
    """Cut a stream of windows into batches of (window, a, b) pieces: rows ``[a, b)`` of the window's shuffled
    order, without the first ``skip`` rows of window 0; the last batch may be short."""
    pieces: list[tuple[int, int, int]] = []
    need = batch_size
    for w, rows in enumerate(window_rows):
        pos = skip if w == 0 else 0
        while pos < rows:
            take = min(need, rows - pos)
            pieces.append((w, pos, pos + take))
            pos += take
            need -= take
            if need == 0:
                yield pieces
                pieces, need = [], batch_size
    if pieces:
        yield pieces


def chunk_batches(sizes: np.ndarray, *, batch_size: int, window_chunks: int, seed: int, epoch: int,
                  shuffle: bool, rank: int, world: int, worker: int, workers: int,
                  skip_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each batch one (rank, worker) stream yields, as the global chunk and the row within it of every row
    (the index math of one window at a time, whatever the epoch's size)."""
    order = np.arange(len(sizes), dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([_CHUNK_TAG, seed, epoch]).permutation(len(sizes))
    r0, r1 = split(int(sizes.sum()), world, rank)  # the rank's rows, the worker's run of batches
    b0, b1 = split(-(-(r1 - r0) // batch_size), workers, worker)
    lo, hi = r0 + b0 * batch_size, min(r1, r0 + b1 * batch_size)
    windows, offset = plan_windows(sizes, order, lo, hi, window_chunks, skip_batches * batch_size)
    current, chunk, row = -1, np.empty(0, np.int64), np.empty(0, np.int64)
    for pieces in batch_pieces([w.rows for w in windows], batch_size, offset):
        parts = []
        for w, a, b in pieces:
            if w != current:  # batches run through the windows in order: only one window's rows are kept
                win, current = windows[w], w
                chunk = np.repeat(win.chunks, win.hi - win.lo)
                row = np.concatenate([np.arange(x, y) for x, y in zip(win.lo, win.hi)])
                if shuffle:
                    rng = np.random.default_rng([_WINDOW_TAG, seed, epoch, rank, worker, win.index])
                    perm = rng.permutation(len(row))
                    chunk, row = chunk[perm], row[perm]
            parts.append((chunk[a:b], row[a:b]))
        yield parts[0] if len(parts) == 1 else tuple(np.concatenate(x) for x in zip(*parts))


def batches_per_epoch(total: int, batch_size: int, rank: int, world: int, share: str) -> int:
    """Batches a rank yields per epoch: its share of the rows (``share="rows"``), or every global batch."""
    if share == "rows":
        a, b = split(total, world, rank)
        return -(-(b - a) // batch_size)
    return -(-total // (batch_size * world))


def loader_batches(sizes: np.ndarray, *, share: str, batch_size: int, window_chunks: int, seed: int, epoch: int,
                   shuffle: bool, rank: int, world: int, worker: int, workers: int,
                   done: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each batch DataLoader worker ``worker`` of ``workers`` yields for ``rank`` after the loop consumed ``done``
    batches of the epoch, as in :func:`chunk_batches`, shared by ``rows`` or by global ``batches`` (module doc)."""
    kw = {"window_chunks": window_chunks, "seed": seed, "epoch": epoch, "shuffle": shuffle}
    if share == "rows":
        counts = worker_batch_counts(int(sizes.sum()), batch_size, rank, world, workers)
        taken, due = resume_point(counts, done)
        stream = (due + worker) % workers  # a new DataLoader's worker p continues the round-robin at `due`
        yield from chunk_batches(sizes, batch_size=batch_size, rank=rank, world=world, worker=stream,
                                 workers=workers, skip_batches=int(taken[stream]), **kw)
        return
    glob = chunk_batches(sizes, batch_size=batch_size * world, rank=0, world=1, worker=0, workers=1, **kw)
    for j, (chunk, row) in enumerate(glob):
        if j >= done and (j - done) % workers == worker:
            a, b = split(len(row), world, rank)
            yield chunk[a:b], row[a:b]
