"""SoftLabelStore: open, validate and read a store.

Opening checks the format version, the attributes, every array's shape, dtype
and chunking, and the status; a store still being written is refused unless
``allow_partial``. Reads are whole chunks or row ranges into numpy (torch views
via :func:`to_torch`), verified against the per-chunk checksums on request.
The backend handle opens lazily and reopens after a fork, so a store object can
be handed to DataLoader workers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from softlabels.errors import CorruptStore, IncompleteStore, NotAStore, SoftLabelsError
from softlabels.store import format as fmt
from softlabels.store.backend import Backend, ReadHandle, backend_kind
from softlabels.store.format import StoreMeta

__all__ = ["SoftLabelStore", "open_store", "to_torch", "densify_topk"]


def open_store(path: str | Path, *, allow_partial: bool = False, backend: str | None = None) -> SoftLabelStore:
    """Open a store for reading; see :class:`SoftLabelStore`."""
    return SoftLabelStore(path, allow_partial=allow_partial, backend=backend)


class SoftLabelStore(ReadHandle):
    """A validated, read-only view of one store."""

    def __init__(self, path: str | Path, *, allow_partial: bool = False, backend: str | None = None) -> None:
        self.path = Path(path)
        self.backend_kind = backend_kind(self.path, backend)
        self._allow_partial = allow_partial
        self._backend: Backend | None = None
        self._pid = -1
        self._cache: dict[str, np.ndarray] = {}
        b = self._handle()
        try:
            self.meta = StoreMeta.from_attrs(b.attrs())
        except SoftLabelsError as err:
            self.close()
            raise type(err)(f"{self.path}: {err}") from None
        self.unit_rows = self._check_arrays(b)
        done = self.chunk_done()
        missing = np.flatnonzero(~done)
        if self.meta.complete and len(missing):
            self.close()
            raise CorruptStore(
                f"{self.path} is marked complete but chunks {fmt.chunk_list(missing)} are not flagged done; "
                "regenerate them by rerunning 'softlabels generate' with the same arguments"
            )
        if not self.meta.complete and not allow_partial:
            self.close()
            raise IncompleteStore(
                f"{self.path} is incomplete (status {self.meta.status!r}, {len(missing)} of {self.num_chunks} chunks "
                f"missing: {fmt.chunk_list(missing)}); finish it by rerunning 'softlabels generate' with the "
                "same arguments, or read it explicitly as partial"
            )

    # -- validation ----------------------------------------------------------------------
    def _check_arrays(self, b: Backend) -> int:
        """Check every array against the schema; return the write-unit size in rows."""
        problems: list[str] = []
        present = set(b.array_names())
        for name, spec in self.meta.arrays().items():
            if name not in present:
                problems.append(f"array {name!r} is missing")
                continue
            shape, dtype, chunks = b.array_info(name)
            if shape != spec.shape:
                problems.append(f"{name} has shape {shape}, the attributes say {spec.shape}")
            if dtype != spec.dtype:
                problems.append(f"{name} has dtype {dtype}, expected {spec.dtype}")
            # HDF5 cannot chunk beyond a fixed dimension, so a short store's chunk is N rows
            if spec.per_row and shape and chunks[0] not in (self.meta.chunk_rows, min(self.meta.chunk_rows, max(1, shape[0]))):
                problems.append(f"{name} is chunked by {chunks[0]} rows, chunk_rows says {self.meta.chunk_rows}")
            # a partial read (resume, repair) finds missing files chunk by chunk and regenerates them
            if shape == spec.shape and (claim := b.unbacked(name, complete=spec.per_row and self.meta.complete
                                                             and not self._allow_partial)):
                problems.append(claim)
        if problems:
            self.close()
            if not present:
                raise NotAStore(f"{self.path} has softlabels attributes but no arrays; regenerate the store")
            raise CorruptStore(f"{self.path} does not match its metadata: {'; '.join(problems)}; regenerate the store")
        return b.shard_rows(fmt.LABELS) or self.meta.chunk_rows

    # -- metadata ------------------------------------------------------------------------
    num_samples = property(lambda self: self.meta.num_samples)
    num_classes = property(lambda self: self.meta.num_classes)
    num_chunks = property(lambda self: self.meta.num_chunks)
    chunk_rows = property(lambda self: self.meta.chunk_rows)
    layout = property(lambda self: self.meta.layout)
    topk = property(lambda self: self.meta.topk)
    logits_dtype = property(lambda self: self.meta.logits_dtype)
    status = property(lambda self: self.meta.status)
    teacher = property(lambda self: self.meta.teacher)
    source = property(lambda self: self.meta.source)
    created_by = property(lambda self: self.meta.created_by)

    def __len__(self) -> int:
        return self.meta.num_samples

    def __repr__(self) -> str:
        k = f", K={self.topk}" if self.topk else ""
        return (f"SoftLabelStore({str(self.path)!r}, {self.layout}, N={self.num_samples}, C={self.num_classes}{k}, "
                f"{self.logits_dtype}, {self.status})")

    @property
    def row_keys(self) -> tuple[str, ...]:
        """Names of this layout's per-row arrays."""
        return tuple(self.meta.row_arrays())

    def _whole(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            arr = self._cache[name] = self._handle().read(name, 0, self.meta.arrays()[name].shape[0])
        return arr

    @property
    def labels(self) -> np.ndarray:
        """All labels, int64 [N] (-1 = unlabeled); read once and cached."""
        return self._whole(fmt.LABELS)

    @property
    def sample_ids(self) -> np.ndarray:
        """All sample ids, int64 [N]; read once and cached. A complete store's ids must be unique."""
        first = fmt.SAMPLE_IDS not in self._cache
        ids = self._whole(fmt.SAMPLE_IDS)
        if first and self.meta.complete and len(dup := duplicates(ids)):
            rows = np.flatnonzero(np.isin(ids, dup[:1]))
            raise CorruptStore(
                f"{self.path} holds sample id {int(dup[0])} {len(rows)} times (rows {fmt.chunk_list(rows)}; "
                f"{len(dup)} duplicated id(s) in all); each input must appear once: repair it with 'softlabels "
                "generate --repair' and the original arguments"
            )
        return ids

    def chunk_done(self) -> np.ndarray:
        """bool [num_chunks], read fresh from disk."""
        return self._handle().read(fmt.CHUNK_DONE, 0, self.num_chunks).astype(bool)

    def missing_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.chunk_done())]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return self.meta.chunk_bounds(chunk)

    # -- reading -------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int, *, keys: tuple[str, ...] | None = None,
                  out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of the given arrays (default: all per-row arrays)."""
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"rows {start}..{stop} outside 0..{self.num_samples}")
        b = self._handle()
        keys = keys or self.row_keys
        return {k: b.read(k, start, stop, None if out is None else out.get(k)) for k in keys}

    def read_chunk(self, chunk: int, *, keys: tuple[str, ...] | None = None, verify: bool = True) -> dict[str, np.ndarray]:
        """One whole chunk; with ``verify`` its checksum is checked (all arrays are then read)."""
        start, stop = self.chunk_bounds(chunk)
        specs = self.meta.row_arrays()
        names = self.row_keys if verify else keys or self.row_keys
        for k in names:  # the attributes decide this size: refuse an implausible one before allocating it
            fmt.check_read_size(self.path, k, (stop - start,) + specs[k].shape[1:], specs[k].dtype)
        block = {k: np.empty((stop - start,) + specs[k].shape[1:], specs[k].dtype) for k in names}
        self.read_chunk_into(chunk, block, verify=verify)
        return block if keys is None else {k: block[k] for k in keys}

    def read_chunk_into(self, chunk: int, out: dict[str, np.ndarray], *, verify: bool = True) -> None:
        """Read one whole chunk into ``out`` (name -> array of the chunk's rows, e.g. a slice of a window buffer).

        With ``verify``, ``out`` must hold every per-row array and the chunk's checksum
        is checked. Labels and top-k indices are always checked against the class count.
        """
        start, stop = self.chunk_bounds(chunk)
        try:
            self.read_rows(start, stop, keys=tuple(out), out=out)
        except CorruptStore as err:
            raise CorruptStore(
                f"chunk {chunk} (rows {start}..{stop}) of {self.path} cannot be read ({err.__cause__ or err}); "
                "regenerate it with 'softlabels generate --repair' and the original arguments"
            ) from err
        if verify:
            self._verify(chunk, out)
        self._check_values(chunk, out)

    def _verify(self, chunk: int, block: dict[str, np.ndarray]) -> None:
        expected = int(self._whole(fmt.CHECKSUMS)[chunk])
        if fmt.chunk_checksum(block, self.meta.checksum) != expected:
            start, stop = self.chunk_bounds(chunk)
            raise CorruptStore(
                f"chunk {chunk} (rows {start}..{stop}) of {self.path} fails its checksum; regenerate it with "
                "'softlabels generate --repair' and the original arguments"
            )

    def _check_values(self, chunk: int, block: dict[str, np.ndarray]) -> None:
        """Labels in [-1, C) and top-k indices in [0, C): a bad one would crash (or silently skew) a loss."""
        c = self.num_classes
        for key, low, what in ((fmt.LABELS, -1, "label"), (fmt.TOPK_INDICES, 0, "top-k index")):
            a = block.get(key)
            if a is None or not a.size:
                continue
            lo, hi = a.min(), a.max()
            if lo < low or hi >= c:
                start, stop = self.chunk_bounds(chunk)
                raise CorruptStore(
                    f"chunk {chunk} (rows {start}..{stop}) of {self.path} holds {what} {int(lo if lo < low else hi)}, "
                    f"outside {low}..{c - 1}; regenerate it with 'softlabels generate --repair' and the original "
                    "arguments"
                )

    def verify(self, each: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> list[int]:
        """Read every finished chunk; return those that are unreadable, fail their checksum, repeat an
        index within a top-k row, or share a sample id with another row (every copy is listed).

        ``each(chunk, block)`` is called with every chunk that passes the per-chunk checks.
        """
        bad, ids, owner = [], [], []
        for c in np.flatnonzero(self.chunk_done()):
            c = int(c)
            try:
                block = self.read_chunk(c, verify=True)
            except CorruptStore:
                bad.append(c)
                continue
            if fmt.TOPK_INDICES in block and repeated_in_rows(block[fmt.TOPK_INDICES]).any():
                bad.append(c)
                continue
            if each is not None:
                each(c, block)
            ids.append(block[fmt.SAMPLE_IDS])
            owner.append(np.full(len(ids[-1]), c, dtype=np.int64))
        if ids:
            all_ids = np.concatenate(ids)
            dup = duplicates(all_ids)
            if len(dup):
                bad += np.unique(np.concatenate(owner)[np.isin(all_ids, dup)]).tolist()
        return sorted(set(bad))

    def size_on_disk(self) -> int:
        return self._handle().size_on_disk()


def duplicates(ids: np.ndarray) -> np.ndarray:
    """The values occurring more than once in ``ids`` (sorted; one sort, no Python loop)."""
    s = np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


def repeated_in_rows(indices: np.ndarray) -> np.ndarray:
    """bool [B]: the row of top-k indices names some class twice (densifying it would be wrong)."""
    if indices.shape[-1] < 2 or not len(indices):
        return np.zeros(len(indices), dtype=bool)
    s = np.sort(indices, axis=-1)
    return (s[:, 1:] == s[:, :-1]).any(axis=-1)


# the arrays' names under which a target's tensors appear in a batch dict (what version 1 batches held)
TARGET_KEYS = {"DenseTarget": {"logits": fmt.LOGITS},
               "TopKTarget": {"values": fmt.TOPK_VALUES, "ids": fmt.TOPK_INDICES, "logsumexp": fmt.LOGSUMEXP},
               "SampledTarget": {"ids": "sampled_ids", "counts": "sampled_counts", "logits": "sampled_logits",
                                 "logsumexp": fmt.LOGSUMEXP}}


@functools.lru_cache(maxsize=64)
def _array_names(layout: Any) -> frozenset[str]:
    """The layout's array names (cached: a batch loop asks once per batch)."""
    return frozenset(layout.arrays())


def to_torch(block: dict[str, np.ndarray], logits_dtype: str, layout: Any = None) -> dict[str, torch.Tensor]:
    """numpy block -> torch tensors, the teacher's arrays decoded by their layout (no copies where possible).

    ``layout`` (a :class:`softlabels.store.layouts.Layout`) is inferred for dense and top-k
    blocks. Logits keep their stored dtype (bfloat16 bits viewed as bfloat16); class ids
    become int64; other arrays are wrapped as they are.
    :func:`softlabels.student.losses.as_target` turns the result into a typed target.
    """
    if layout is None:
        from softlabels.store.layouts import make_layout

        if fmt.LOGITS in block:
            layout = make_layout("dense", num_classes=block[fmt.LOGITS].shape[-1], logits_dtype=logits_dtype)
        else:  # decoding top-k does not depend on C: any C >= K describes the block
            k = block[fmt.TOPK_VALUES].shape[-1]
            layout = make_layout("topk", num_classes=k, logits_dtype=logits_dtype, k=k)
    names = _array_names(layout)
    target = layout.decode(block)
    out = {k: torch.from_numpy(v) for k, v in block.items() if k not in names}
    out.update({name: getattr(target, f) for f, name in TARGET_KEYS[type(target).__name__].items()})
    return out


def densify_topk(values: torch.Tensor, indices: torch.Tensor, logsumexp: torch.Tensor, num_classes: int, *,
                 tail: str = "spread") -> torch.Tensor:
    """Teacher log-probabilities at T = 1 from a top-k row.

    ``tail="spread"``: [B, C], the tail mass ``1 - sum(top-k probs)`` shared evenly
    among the C - K classes not stored. ``tail="bucket"``: [B, K + 1], the K stored
    classes in stored order followed by one bucket holding the whole tail mass.
    Both are exact for the stored classes; only the tail's split is assumed.
    """
    logp_k = values.float() - logsumexp.float().unsqueeze(-1)
    log_tail = torch.log(-torch.expm1(torch.logsumexp(logp_k, dim=-1).clamp(max=-1e-7)))
    if tail == "bucket":
        return torch.cat([logp_k, log_tail.unsqueeze(-1)], dim=-1)
    if tail != "spread":
        raise ValueError(f"tail must be 'spread' or 'bucket', got {tail!r}")
    k = values.shape[-1]
    if k == num_classes:
        return torch.full_like(logp_k, 0).scatter(-1, indices.long(), logp_k)
    fill = (log_tail - np.log(num_classes - k)).unsqueeze(-1)
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter(-1, indices.long(), logp_k)
