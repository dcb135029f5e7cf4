"""What ``softlabels inspect`` reports about a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels import format as fmt
from softlabels._pipeline import _finite_rows
from softlabels.errors import CorruptStore
from softlabels.reader import SoftLabelStore, densify_topk, to_torch

__all__ = ["diff_stores", "summarize"]


def summarize(path: str | Path, *, verify: bool = False, backend: str | None = None) -> dict[str, Any]:
    """Describe a store: layout, sizes, status, label counts and teacher statistics.

    Incomplete stores are described too (statistics cover the chunks done so far).
    With ``verify``, every chunk is read and checked against its checksum.
    """
    with SoftLabelStore(path, allow_partial=True, backend=backend) as store:
        done = store.chunk_done()
        info: dict[str, Any] = {
            "path": str(store.path),
            "backend": store.backend_kind,
            "format_version": store.meta.format_version,
            "status": store.status,
            "layout": store.layout,
            "logits_dtype": store.logits_dtype,
            "num_samples": store.num_samples,
            "num_classes": store.num_classes,
            "topk": store.topk,
            "chunk_rows": store.chunk_rows,
            "num_chunks": store.num_chunks,
            "shard_rows": store.unit_rows if store.unit_rows != store.chunk_rows else None,
            "missing_chunks": [int(i) for i in np.flatnonzero(~done)],
            "size_on_disk_bytes": store.size_on_disk(),
        }
        info.update(_teacher_stats(store, done, verify=verify))
        info["teacher"] = store.teacher
        info["source"] = store.source
        info["created_by"] = store.created_by
        return info


def _teacher_stats(store: SoftLabelStore, done: np.ndarray, *, verify: bool) -> dict[str, Any]:
    """Label counts, teacher top-1 accuracy on labeled rows, mean entropy (nats, T = 1), non-finite rows.

    Reads chunk by chunk; damaged chunks are skipped and listed (with ``verify``, also chunks
    repeating a top-k index in a row or sharing sample ids: see :meth:`SoftLabelStore.verify`).
    """
    sums = dict.fromkeys(("correct", "labeled", "rows", "nonfinite"), 0)
    entropy = [0.0]

    def add(_chunk: int, raw: dict[str, np.ndarray]) -> None:
        values = {k: v for k, v in raw.items() if k in (fmt.LOGITS, fmt.TOPK_VALUES, fmt.LOGSUMEXP)}
        sums["nonfinite"] += int((~_finite_rows({k: v.reshape(len(v), -1) for k, v in values.items()})).sum())
        block = to_torch(raw, store.logits_dtype)
        if store.layout == "dense":
            logp = torch.log_softmax(block[fmt.LOGITS].float(), dim=-1)
            top1 = logp.argmax(-1)
        else:  # entropy over the K stored classes plus one tail bucket: a lower bound
            logp = densify_topk(block[fmt.TOPK_VALUES], block[fmt.TOPK_INDICES], block[fmt.LOGSUMEXP],
                                store.num_classes, tail="bucket")
            top1 = block[fmt.TOPK_INDICES][:, 0]
        entropy[0] += float(-(logp.exp() * logp).nan_to_num().sum())
        lab = block[fmt.LABELS]
        mask = lab >= 0
        sums["correct"] += int((top1[mask] == lab[mask]).sum())
        sums["labeled"] += int(mask.sum())
        sums["rows"] += len(lab)

    if verify:
        damaged = store.verify(add)
    else:
        damaged = []
        for c in np.flatnonzero(done):
            try:
                add(int(c), store.read_chunk(int(c), verify=False))
            except CorruptStore:
                damaged.append(int(c))
    labeled, rows = sums["labeled"], sums["rows"]
    stats = {
        "labeled": labeled,
        "unlabeled": rows - labeled,
        "teacher_accuracy": sums["correct"] / labeled if labeled else None,
        "mean_teacher_entropy": entropy[0] / rows if rows else None,
        "entropy_note": "over the top-k classes plus a tail bucket (a lower bound)" if store.layout == "topk" else None,
        "nonfinite_rows": sums["nonfinite"],
    }
    stats["corrupt_chunks" if verify else "unreadable_chunks"] = damaged
    return stats


def diff_stores(a: str | Path, b: str | Path, *, ignore: tuple[str, ...] = ("timings",)) -> list[str]:
    """Differences between two stores: every array bit for bit, and the root attributes.

    Keys named in ``ignore`` are dropped from ``created_by`` before comparing (by
    default the timings, which differ from run to run). Partial stores compare too.
    """
    from softlabels.store import open_backend

    found: list[str] = []
    sides = []
    for path in (a, b):
        backend = open_backend(path, "r")
        try:
            attrs = backend.attrs()
            attrs["created_by"] = {k: v for k, v in dict(attrs.get("created_by") or {}).items() if k not in ignore}
            arrays = {n: backend.read(n, 0, backend.array_info(n)[0][0]) if backend.array_info(n)[0] else None
                      for n in backend.array_names()}
        finally:
            backend.close()
        sides.append((attrs, arrays))
    (attrs_a, arr_a), (attrs_b, arr_b) = sides
    for key in sorted(set(attrs_a) | set(attrs_b)):
        if attrs_a.get(key) != attrs_b.get(key):
            found.append(f"attribute {key}: {attrs_a.get(key)!r} != {attrs_b.get(key)!r}")
    for name in sorted(set(arr_a) | set(arr_b)):
        x, y = arr_a.get(name), arr_b.get(name)
        if x is None or y is None:
            found.append(f"array {name} exists in only one store")
        elif x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            rows = np.flatnonzero((x != y).reshape(len(x), -1).any(1)) if x.shape == y.shape else []
            found.append(f"array {name} differs" + (f" in rows {fmt.chunk_list(rows)}" if len(rows) else ""))
    return found
