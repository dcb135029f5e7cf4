"""Format-1 stores, readable forever: :class:`V1Store` presents one through the unit API.

Format 1 (docs/FORMAT.md, appendix) is read as a ``sample`` store of the same layout and write units,
so training, ``inspect``, ensembles and ``upgrade`` take it like any other store.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from softlabels.errors import CorruptStore, UnsupportedFormat
from softlabels.store import format as fmt
from softlabels.store.backend import Backend
from softlabels.store.handle import ReadHandle
from softlabels.store.positions import SamplePositions
from softlabels.store.schema import StoreMetaV2, check_unit

__all__ = ["V1Store"]

CHUNK_DONE = "chunk_done"
CHECKSUMS = "checksums"
# every per-row array either layout may hold, in checksum order
ROW_KEYS = (fmt.LOGITS, fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP, fmt.LABELS, fmt.SAMPLE_IDS)
REQUIRED = ("softlabels_format", "status", "layout", "num_samples", "num_classes", "logits_dtype", "chunk_rows")
_FIX = ("regenerate the store ('softlabels generate --overwrite' with the original arguments writes it as "
        "format 2; format 1 is no longer written, so --repair cannot rewrite it)")


def _meta(attrs: Mapping[str, Any]) -> StoreMetaV2:
    """Format-1 root attributes, validated, as the format-2 description of the same store."""
    missing = [a for a in REQUIRED if a not in attrs]
    if missing:
        raise CorruptStore(f"root attributes missing: {', '.join(missing)}; regenerate the store")
    for name in ("teacher", "source", "created_by"):
        if not isinstance(attrs.get(name, {}), dict):
            raise CorruptStore(f"root attribute {name!r} must be an object, got {type(attrs[name]).__name__}")
    a = {k: attrs.get(k) for k in (*REQUIRED, "topk")}
    p: list[str] = []  # what format 1 names its own way; StoreMetaV2 checks the rest in the same words
    if a["layout"] not in ("dense", "topk"):
        p.append(f"layout {a['layout']!r} is not one of dense, topk")
    if not fmt.is_int(a["chunk_rows"]) or a["chunk_rows"] < 1:
        p.append(f"chunk_rows must be an integer >= 1, got {a['chunk_rows']!r}")
    if a["layout"] == "topk":
        c = a["num_classes"] if fmt.is_int(a["num_classes"]) else 0
        if not fmt.is_int(a["topk"]) or not 1 <= a["topk"] <= c:
            p.append(f"topk must be an integer in 1..num_classes, got {a['topk']!r}")
    elif a["topk"] is not None:
        p.append("topk is set but the layout is not 'topk'")
    if not p and fmt.is_int(a["num_samples"]) and math.ceil(a["num_samples"] / a["chunk_rows"]) > fmt.MAX_UNITS:
        p.append(f"num_samples {a['num_samples']} in chunks of {a['chunk_rows']} rows make "
                 f"{math.ceil(a['num_samples'] / a['chunk_rows']):,} chunks, over the limit of {fmt.MAX_UNITS:,}")
    if p:
        raise CorruptStore("invalid store metadata: " + "; ".join(p))
    return StoreMetaV2(positions="sample", layout=a["layout"], num_samples=a["num_samples"],
                       num_classes=a["num_classes"], logits_dtype=a["logits_dtype"], chunk_samples=a["chunk_rows"],
                       layout_params={"k": int(a["topk"])} if a["layout"] == "topk" else {},
                       checksum=attrs.get("checksum", "crc32"),  # stores from before the attribute use crc32
                       status=a["status"], teacher=attrs.get("teacher", {}), source=attrs.get("source", {}),
                       created_by=attrs.get("created_by", {}))


def arrays(meta: StoreMetaV2) -> dict[str, fmt.ArraySpec]:
    """Every array of the format-1 store ``meta`` describes: the layout's per-row arrays (ids: uint16 when every
    class fits, else int32), per-sample arrays, then per-chunk bookkeeping."""
    n = meta.num_samples
    out = {k: fmt.ArraySpec((n, *s.shape), s.dtype) for k, s in meta.layout_obj().arrays().items()}
    if fmt.TOPK_INDICES in out and meta.num_classes > 65536:
        out[fmt.TOPK_INDICES] = fmt.ArraySpec((n, int(meta.layout_params["k"])), np.dtype("int32"))
    out[fmt.LABELS] = fmt.ArraySpec((n,), np.dtype("int64"))
    out[fmt.SAMPLE_IDS] = fmt.ArraySpec((n,), np.dtype("int64"))
    chunks = -(-n // meta.chunk_samples)
    out[CHUNK_DONE] = fmt.ArraySpec((chunks,), np.dtype("uint8"))
    out[CHECKSUMS] = fmt.ArraySpec((chunks,), np.dtype("uint32"))
    return out


class V1Store(ReadHandle):
    """A validated, read-only format-1 store with the unit API of :class:`~softlabels.store.reader.UnitStore`.

    Its units are what its writer wrote whole: chunks, or shards of ``meta.shard_chunks`` chunks
    (Zarr); each chunk keeps its own checksum and done flag.
    """

    format_version = 1
    _rerun = ("running the softlabels release that wrote it again (format 1 is no longer written), or regenerate "
              "the store with 'softlabels generate --overwrite'")
    _fix = _FIX

    def _open(self, b: Backend) -> None:
        attrs = b.attrs()
        if attrs.get("softlabels_format") != 1:
            raise UnsupportedFormat(f"softlabels format version {attrs.get('softlabels_format')!r} is not 1; open "
                                    "it with open_store")
        self.meta = _meta(attrs)
        self._arrays = arrays(self.meta)
        rows = self.meta.chunk_samples
        self._check_arrays(b, {name: (a.shape, a.dtype, *((None, False) if name in (CHUNK_DONE, CHECKSUMS)
                                                          else (rows, True))) for name, a in self._arrays.items()})
        shard = b.shard_rows(fmt.LABELS) or rows
        if shard % rows == 0 and shard > rows:
            self.meta = replace(self.meta, shard_chunks=shard // rows)
        self.positions = SamplePositions(self.meta.geometry)

    def unit_done(self) -> np.ndarray:
        """bool [units], read fresh from disk: a unit is done when every chunk of it is."""
        flags = self._handle().read(CHUNK_DONE, 0, self._arrays[CHUNK_DONE].shape[0]).astype(bool)
        per = self.meta.shard_chunks
        return np.pad(flags, (0, -len(flags) % per), constant_values=True).reshape(-1, per).all(axis=1)

    def unit_checksums(self) -> np.ndarray:
        """uint32 [chunks]: every chunk's recorded checksum (what identifies a store's contents)."""
        return self._handle().read(CHECKSUMS, 0, self._arrays[CHECKSUMS].shape[0])

    def read_unit(self, unit: int, *, verify: bool = True,
                  out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Unit ``unit`` as format 2 gives a ``sample`` unit: every per-row array, top-k ids in format 2's
        stored form (the same bytes when C <= 65,536), values checked; ``verify`` checks its chunks' checksums.
        ``out``: arrays to read those of the same stored dtype into, as :meth:`UnitStore.read_unit`."""
        s0, s1 = self.meta.geometry.unit_samples_range(unit)
        b = self._handle()
        block, out = {}, out or {}
        for name in ROW_KEYS:
            if name in self._arrays:  # the attributes decide this size: refuse an implausible one before reading
                spec = self._arrays[name]
                fmt.check_read_size(self.path, name, (s1 - s0, *spec.shape[1:]), spec.dtype)
                dst = out.get(name)
                block[name] = b.read(name, s0, s1, dst if dst is not None and dst.dtype == spec.dtype else None)
        rows, where = self.meta.chunk_samples, f"unit {unit} (samples {s0}..{s1}) of {self.path}"
        c0, c1 = s0 // rows, -(-s1 // rows)
        sums = b.read(CHECKSUMS, c0, c1) if verify else []
        for c, expected in zip(range(c0, c1), sums):
            part = (block[k][c * rows - s0:(c + 1) * rows - s0] for k in ROW_KEYS if k in block)  # in this order
            if fmt.checksum_of(part, self.meta.checksum) != int(expected):
                raise CorruptStore(f"chunk {c} (rows {c * rows}..{min((c + 1) * rows, s1)}) of {self.path} fails "
                                   f"its checksum; {_FIX}")
        if fmt.TOPK_INDICES in block:
            ids = block[fmt.TOPK_INDICES]
            if ids.size and (ids.min() < 0 or ids.max() >= self.meta.num_classes):
                raise CorruptStore(f"{where} holds top-k index {int(ids.min() if ids.min() < 0 else ids.max())}, "
                                   f"outside 0..{self.meta.num_classes - 1}; {_FIX}")
            if ids.dtype != np.uint16:  # int32 ids (C > 65,536): format 2 packs them in 3 or 4 bytes
                import torch

                from softlabels.store.layouts import encode_ids

                block[fmt.TOPK_INDICES] = encode_ids(torch.from_numpy(ids.astype(np.int64)),
                                                     self.meta.num_classes).numpy()
        check_unit(self.meta, block, where=where, fix=_FIX)
        return block
