"""The format-1 sink of the job runner: create, or check and resume, or repair a v1 store.

:class:`V1Sink` is what :func:`softlabels.teacher.runner.run_job` writes a v1 store through
(``StoreWriter``); :func:`open_job_store` is called by rank 0 only, with the store's lock held. A rerun may resume only a store
made with the same settings: the shape-deciding ones (layout, N, C, dtype, K,
chunk and shard rows) and what decides the values (teacher spec, weights sha256 or
the seed of a random init, amp, device type, batch size, and the inputs' fingerprint). ``chunk_rows``/``shard_chunks`` left unset
adopt the store's. A mismatch is refused on one line naming every difference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from softlabels.errors import ConfigError, CorruptStore, NotAStore, StoreMismatch
from softlabels.store import format as fmt
from softlabels.store.v1 import SoftLabelStore, open_store
from softlabels.store.v1_writer import StoreWriter
from softlabels.teacher.config import GenerateConfig as Settings
from softlabels.teacher.sinks import (
    Opened,
    creation_interrupted,
    read_flags,
    reopen_holes,
    warn_nonfinite,
)

__all__ = ["JobStore", "Settings", "V1Sink", "open_job_store", "scan_nonfinite"]


@dataclass
class JobStore:
    """The store a job writes: open (``writer``), or still to be made by ``create``."""

    writer: StoreWriter | None
    create: Callable[[], StoreWriter] | None
    unit_rows: int
    missing: list[int]  # write units still to compute
    complete: bool
    repaired: list[int]  # chunks a --repair found bad


def open_job_store(s: Settings, *, num_samples: int, num_classes: int, teacher: dict[str, Any],
                   source: dict[str, Any], say: Callable[[str], None], defer_create: bool = False) -> JobStore:
    """Open the job's store (resumed or repaired), or plan a new one.

    With ``defer_create`` a new store is not created here but by ``JobStore.create``,
    so the caller can create it on its writer thread while the teacher already runs.
    """
    out = s.out
    chunk_rows = s.chunk_rows or fmt.default_chunk_rows(s.topk or num_classes, fmt.storage_dtype(s.dtype).itemsize)

    def create() -> StoreWriter:
        return StoreWriter.create(out, num_samples=num_samples, num_classes=num_classes, layout=s.layout,
                                  topk=s.topk, logits_dtype=s.dtype, chunk_rows=chunk_rows,
                                  shard_chunks=s.shard_chunks, teacher=teacher, source=source, overwrite=True,
                                  created_by={"settings": s.recorded(chunk_rows)}, finalize_on_exit=False,
                                  compress=s.compress)

    def new() -> JobStore:
        unit_rows = chunk_rows * (s.shard_chunks or 1)
        units = list(range(-(-num_samples // unit_rows)))
        if defer_create:
            return JobStore(None, create, unit_rows, units, False, [])
        return JobStore(create(), None, unit_rows, units, False, [])

    if s.overwrite or not out.exists():
        if s.repair:
            raise ConfigError(f"--repair: there is no store at {str(out)!r} to repair; drop --repair")
        return new()
    _, status, done = read_flags(out, fmt.CHUNK_DONE)
    status = reopen_holes(out, status, done)
    try:
        reader = open_store(out, allow_partial=True)
    except (CorruptStore, NotAStore) as err:
        if not creation_interrupted(status, done):
            raise type(err)(str(err) if "--overwrite" in str(err) else f"{err} (or pass --overwrite to replace it)") \
                from None
        say(f"{out}: the previous job died while creating the store; starting over")
        return new()
    repaired: list[int] = []
    with reader:
        want = {"layout": s.layout, "num_samples": num_samples, "num_classes": num_classes,
                "logits_dtype": s.dtype, "topk": s.topk}
        diffs = _diffs(reader, want, s, teacher=teacher, source=source)
        if diffs:
            raise StoreMismatch(f"{str(out)!r} was made with other settings ({'; '.join(diffs)}); rerun "
                                "with the original settings, or pass --overwrite to replace it")
        if s.repair:
            repaired = reader.verify()  # checks the chunks flagged done
    writer = StoreWriter.resume(out, finalize_on_exit=False)
    if repaired:
        say(f"repair: {len(repaired)} chunk(s) fail verification ({fmt.chunk_list(repaired)}); regenerating them")
        writer.invalidate(repaired)
    elif s.repair:
        say(f"repair: every written chunk of {out} passes its checksum")
    missing = writer.missing_units()
    return JobStore(writer, None, writer.unit_rows, missing, writer.meta.complete and not missing, repaired)


class V1Sink:
    """A v1 store of the classifier job ``s`` (the runner's sink; see :mod:`softlabels.teacher.sinks`).

    Its write units are chunks, or shards; under torchrun every rank writes a contiguous run of
    the missing units (each unit is its own set of files in Zarr).
    """

    count_key = "rows_generated"

    def __init__(self, s: Settings, *, num_samples: int, num_classes: int, teacher: dict[str, Any],
                 source: dict[str, Any]) -> None:
        self.s, self.path, self.n, self.c = s, s.out, num_samples, num_classes
        self.teacher, self.source = teacher, source

    def open(self, *, overwrite: bool, repair: bool, say: Callable[[str], None], defer: bool,
             world: int) -> Opened:
        s = replace(self.s, overwrite=overwrite, repair=repair)
        store = open_job_store(s, num_samples=self.n, num_classes=self.c, teacher=self.teacher, source=self.source,
                               say=say, defer_create=defer)
        rows, missing = store.unit_rows, store.missing
        return Opened(store.writer or store.create, missing,
                      [(u * rows, min((u + 1) * rows, self.n)) for u in missing],
                      [i * world // len(missing) for i in range(len(missing))], store.repaired, store.complete)

    def resume(self) -> StoreWriter:
        return StoreWriter.resume(self.path, finalize_on_exit=False)

    def finish(self, writer: StoreWriter, created: dict[str, Any], *, record: bool,
               say: Callable[[str], None]) -> tuple[list[int], StoreWriter]:
        ids: list[int] = []
        if record:  # scan the whole store: earlier runs may have found some too
            writer.close()
            ids = scan_nonfinite(self.path)
            writer = self.resume()
            warn_nonfinite(ids, say)
            created["nonfinite_sample_ids"] = ids
        writer.update_attrs(created_by=created)
        writer.finish()
        return ids, writer


def _diffs(reader: SoftLabelStore, want: dict[str, Any], s: Settings, *, teacher: dict[str, Any],
           source: dict[str, Any]) -> list[str]:
    m = reader.meta
    if s.chunk_rows is not None:
        want = {**want, "chunk_rows": s.chunk_rows}
    diffs = [f"{k} {getattr(m, k)!r} in the store, {v!r} asked" for k, v in want.items() if getattr(m, k) != v]
    if s.shard_chunks is not None and reader.unit_rows != s.shard_chunks * m.chunk_rows:
        diffs.append(f"shards of {reader.unit_rows} rows in the store, {s.shard_chunks * m.chunk_rows} asked")
    recorded = (m.created_by or {}).get("settings") or {}
    if recorded.get("batch_size") != s.batch_size:  # batches round differently: rows differ in the last bits
        diffs.append(f"batch_size {recorded.get('batch_size')!r} in the store, {s.batch_size!r} asked")
    for attr, keys, mine in (("teacher", ("spec", "weights_sha256", "init_seed", "amp", "device"), teacher),
                             ("source", ("fingerprint", "num_samples"), source)):
        have = getattr(m, attr)
        diffs += [f"{attr}.{k} {have.get(k)!r} in the store, {mine[k]!r} asked" for k in keys if have.get(k) != mine[k]]
    return diffs


def scan_nonfinite(path: Path) -> list[int]:
    """Sample ids of stored rows holding a non-finite value (``--on-nonfinite record``)."""
    ids: list[int] = []
    with open_store(path, allow_partial=True) as store:
        keys = tuple(k for k in store.row_keys if k in (fmt.LOGITS, fmt.TOPK_VALUES, fmt.LOGSUMEXP))
        for c in range(store.num_chunks):
            block = store.read_chunk(c, keys=keys + (fmt.SAMPLE_IDS,), verify=False)
            bad = np.zeros(len(block[fmt.SAMPLE_IDS]), dtype=bool)
            for k in keys:
                raw = block[k]
                v = torch.from_numpy(raw) if k == fmt.LOGSUMEXP else fmt.decode_logits(raw, store.logits_dtype)
                bad |= ~torch.isfinite(v.float().reshape(len(bad), -1)).all(dim=1).numpy()
            ids += block[fmt.SAMPLE_IDS][bad].tolist()
    return ids
