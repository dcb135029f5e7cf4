"""What both readers share: the read handle, the array and status checks, and the unit API's generic part.

The backend opens on first use and reopens after a fork, so a store object can be handed to
DataLoader workers: no handle crosses a fork.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from softlabels.errors import CorruptStore, IncompleteStore, NotAStore, SoftLabelsError
from softlabels.store.backend import Backend, BackendKind, backend_kind, open_backend
from softlabels.store.format import chunk_list
from softlabels.store.location import store_location
from softlabels.store.schema import duplicates, repeated_in_rows

__all__ = ["ReadHandle", "Units"]

_OPENING = threading.RLock()
os.register_at_fork(after_in_child=lambda: globals().update(_OPENING=threading.RLock()))  # never held across a fork
Expected = dict[str, tuple[tuple[int, ...], np.dtype, int | None, bool]]  # name -> shape, dtype, chunk, backed


def _reason(message: str) -> str:
    """A unit's problem without the unit, the path and the fix: what ``inspect --verify`` lists."""
    body = re.sub(r"^(unit|chunk) \d+ \((samples|rows) \d+\.\.\d+\) of .+? (?=holds |fails |names |is )", "", message)
    return body.split("; regenerate")[0].split("; repair")[0]


class Units:
    """The unit API's parts that follow from ``meta`` and ``unit_done()``: what every store source shares
    (:class:`ReadHandle`, :class:`~softlabels.store.ensemble.EnsembleStore`)."""

    meta: Any

    num_samples = property(lambda self: self.meta.num_samples)
    num_classes = property(lambda self: self.meta.num_classes)
    num_units = property(lambda self: self.meta.num_units)
    layout = property(lambda self: self.meta.layout)

    def __len__(self) -> int:
        return self.meta.num_samples

    def missing_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.unit_done())]  # unit_done(): each source's own

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadHandle(Units):
    """A validated, read-only store: ``path``, ``meta`` (a ``StoreMetaV2``), ``positions``, ``len()``,
    ``read_unit()``, ``unit_done()``, ``missing_units()``, ``verify()``, ``close()``.

    Subclasses validate their version in :meth:`_open`; ``_rerun`` and ``_fix`` say how to finish and
    how to repair one of their stores.
    """

    format_version: int
    _rerun = "rerunning 'softlabels generate' with the same arguments"
    _fix = "repair it with 'softlabels generate --repair' and the original arguments"
    meta: Any
    positions: Any
    backend_kind: BackendKind
    _backend: Backend | None = None
    _pid: int = -1

    def __init__(self, path: str | Path, *, allow_partial: bool = False, backend: str | None = None,
                 opened: Backend | None = None) -> None:
        """``opened``: the store's backend, already opened for reading in this process (adopted, not reopened)."""
        self.path = store_location(path)
        self.backend_kind = backend_kind(self.path, backend)
        self._allow_partial = allow_partial
        if opened is not None:
            self._backend, self._pid = opened, os.getpid()
        try:
            self._open(self._handle())
            self._check_status()
        except SoftLabelsError as err:
            self.close()
            raise type(err)(str(err) if str(self.path) in str(err) else f"{self.path}: {err}") from None

    def _open(self, b: Backend) -> None:  # pragma: no cover - each reader's own (and its read_unit, unit_done)
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {self.meta.positions} x {self.meta.layout}, "
                f"N={self.num_samples}, C={self.num_classes}, {self.meta.logits_dtype}, {self.meta.status})")

    # -- validation -----------------------------------------------------------------------------
    def _check_arrays(self, b: Backend, expected: Expected) -> None:
        """Every array against what the attributes imply: present, its shape, dtype and first-axis chunk,
        and (``backed``, in a complete store read whole) the storage its shape claims."""
        problems: list[str] = []
        present = set(b.array_names())
        complete = self.meta.complete and not self._allow_partial
        for name, (want, dtype, chunk, backed) in expected.items():
            if name not in present:
                problems.append(f"array {name!r} is missing")
                continue
            shape, got, chunks = b.array_info(name)
            if shape != want:
                problems.append(f"{name} has shape {shape}, the attributes say {want}")
            elif got != dtype:
                problems.append(f"{name} has dtype {got}, expected {dtype}")
            # HDF5 cannot chunk beyond a fixed dimension, so a short store's chunk is its length
            elif chunk and shape[0] and chunks[0] not in (chunk, min(chunk, max(1, shape[0]))):
                problems.append(f"{name} is chunked by {chunks[0]} along its first axis, expected {chunk}")
            elif claim := b.unbacked(name, complete=backed and complete):
                problems.append(claim)
        if problems:
            if not present:
                raise NotAStore("it has softlabels attributes but no arrays; regenerate the store")
            raise CorruptStore(f"the arrays do not match the metadata: {'; '.join(problems)}; regenerate the store")

    def _check_status(self) -> None:
        """Refuse a store marked complete with units unflagged, or (unless partial reads are allowed) an
        unfinished one, or one to be read whole that holds a sample id twice."""
        missing, meta = self.missing_units(), self.meta
        if meta.complete and missing:
            raise CorruptStore(f"{self.path} is marked complete but units {chunk_list(missing)} are not flagged "
                               f"done; regenerate them by {self._rerun}")
        if self._allow_partial:
            return
        if not meta.complete:
            state = (f"{len(missing)} of {meta.num_units} units missing: {chunk_list(missing)}" if missing else
                     f"all {meta.num_units} units written but the store never marked complete")
            raise IncompleteStore(f"{self.path} is incomplete (status {meta.status!r}, {state}); finish it by "
                                  f"{self._rerun}")
        ids = self.whole("sample_ids")
        if len(ids) and ids.min() < 0:
            raise CorruptStore(f"{self.path} holds the negative sample id {int(ids.min())} (row "
                               f"{int(ids.argmin())}); sample ids index the data: {self._fix}")
        if len(dup := duplicates(ids)):
            rows = np.flatnonzero(np.isin(ids, dup[:1]))
            raise CorruptStore(f"{self.path} holds sample id {int(dup[0])} {len(rows)} times (rows "
                               f"{chunk_list(rows)}; {len(dup)} duplicated id(s) in all); each input must appear "
                               f"once: {self._fix}")

    # -- reading --------------------------------------------------------------------------------
    def _handle(self) -> Backend:
        if self._backend is None or self._pid != os.getpid():
            with _OPENING:  # read-ahead threads share one handle (softlabels.store.readahead)
                if self._backend is None or self._pid != os.getpid():
                    self._backend = open_backend(self.path, "r", self.backend_kind)
                    self._pid = os.getpid()
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"], state["_pid"] = None, -1
        return state

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label, int64 [N] (-1: unlabeled), read from the store's ``labels`` array."""
        return self.whole("labels")

    def whole(self, name: str) -> np.ndarray:
        """A whole per-sample array (``labels``, ``sample_ids``, ``view_params``), in sample order."""
        return self._handle().read(name, 0, self.meta.num_samples)

    def verify(self, each: Callable[[int, dict[str, np.ndarray]], None] | None = None,
               reasons: dict[int, str] | None = None, *, full: bool = True) -> list[int]:
        """Finished units that cannot be read, fail their checksum or any value check (labels, the position
        kind's values, the layout's arrays), name a class twice in a top-k row, or share a sample id with
        another unit (every copy is listed). Without ``full``: only those that cannot be read or fail a
        value check.

        ``each(unit, block)`` is called with every unit that passes the per-unit checks; ``reasons``, when
        given, receives each bad unit's first problem."""
        from softlabels.store.layouts import decode_ids

        why: dict[int, str] = {} if reasons is None else reasons
        ids, owner = [], []
        k = self.meta.layout_params.get("k") if self.meta.layout == "topk" and full else None
        for u in map(int, np.flatnonzero(self.unit_done())):
            try:
                block = self.read_unit(u, verify=full)
            except CorruptStore as err:
                why[u] = _reason(str(err))
                continue
            if k and repeated_in_rows(decode_ids(block["topk_indices"]).numpy().reshape(-1, k)).any():
                why[u] = "a top-k row names a class twice"
                continue
            if each is not None:
                each(u, block)
            ids.append(block["sample_ids"])
            owner.append(np.full(len(ids[-1]), u, dtype=np.int64))
        if ids and full:
            all_ids, units = np.concatenate(ids), np.concatenate(owner)
            for d in duplicates(all_ids):
                shared = np.unique(units[all_ids == d]).tolist()
                for u in shared:
                    others = chunk_list([x for x in shared if x != u])
                    why.setdefault(u, f"sample id {int(d)} is also in unit(s) {others}" if others else
                                   f"sample id {int(d)} appears more than once")
        return sorted(why)

    def size_on_disk(self) -> int:
        return self._handle().size_on_disk()

    def close(self) -> None:
        if self._backend is not None and self._pid == os.getpid():
            self._backend.close()
        self._backend = None
