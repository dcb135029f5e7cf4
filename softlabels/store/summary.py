"""What ``softlabels inspect`` reports about a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from softlabels.store import format as fmt
from softlabels.store.backend import open_backend
from softlabels.store.layouts import Layout
from softlabels.store.reader import open_store

__all__ = ["diff_stores", "summarize"]


def summarize(path: str | Path, *, verify: bool = False, backend: str | None = None) -> dict[str, Any]:
    """Describe a store of either format version, incomplete ones too: layout, positions, sizes, status,
    label counts and teacher statistics. With ``verify``, every finished unit is checked
    (:meth:`~softlabels.store.handle.ReadHandle.verify`) and ``corrupt_reasons`` says why.
    ``num_positions`` counts stored outputs (N x V for views); ``bytes_per_view`` adds a view's parameters."""
    with open_store(path, allow_partial=True, backend=backend) as store:
        meta = store.meta
        layout = meta.layout_obj()
        done = store.unit_done()
        views = int(meta.views["count"]) if meta.views else 1
        params = len(meta.views["param_names"]) if meta.views else 0
        shard = meta.shard_chunks
        info: dict[str, Any] = {
            "path": str(store.path),
            "backend": store.backend_kind,
            "format_version": store.format_version,
            "status": meta.status,
            "positions": meta.positions,
            "layout": meta.layout,
            "layout_params": dict(meta.layout_params),
            "logits_dtype": meta.logits_dtype,
            "num_samples": meta.num_samples,
            "num_classes": meta.num_classes,
            "topk": meta.layout_params.get("k") if meta.layout == "topk" else None,
            "temperatures": None if (ts := meta.temperatures()) is None else [float(t) for t in ts],
            "chunk_rows": meta.chunk_samples,
            "num_chunks": meta.num_units,
            "shard_rows": meta.chunk_samples * shard if shard > 1 else None,
            "missing_chunks": [int(i) for i in np.flatnonzero(~done)],
            "num_positions": store.positions.num_positions,
            "bytes_per_position": layout.bytes_per_position,
            "views": dict(meta.views) if meta.views else None,
            "bytes_per_view": (layout.bytes_per_position + np.dtype(meta.views.get("param_dtype", "float32")).itemsize
                               * params) if meta.views else None,
            "size_on_disk_bytes": store.size_on_disk(),
        }
        stats = _Stats(layout)

        def add(_unit: int, block: dict[str, np.ndarray]) -> None:
            rows = {k: block[k].reshape(-1, *s.shape) for k, s in layout.arrays().items()}  # a view is a row
            if meta.positions == "tokens":  # labels are per sequence (-1); per-token outputs have none
                labels = np.full(len(next(iter(rows.values()))), -1, np.int64)
            else:  # every view of a sample is a row with the sample's label
                labels = np.repeat(block[fmt.LABELS], views)
            stats.add({**rows, fmt.LABELS: labels})

        reasons: dict[int, str] = {}
        damaged = store.verify(add, reasons, full=verify)
    info.update(stats.result())
    if meta.positions == "tokens":
        info["labeled"], info["unlabeled"] = 0, meta.num_samples
    info["labeled"] //= views  # each sample's label was counted once per view
    info["unlabeled"] //= views
    info["corrupt_chunks" if verify else "unreadable_chunks"] = damaged
    if verify:
        info["corrupt_reasons"] = {str(u): reasons.get(u, "") for u in damaged}
    info["teacher"], info["source"], info["created_by"] = meta.teacher, meta.source, meta.created_by
    return info


class _Stats:
    """Label counts, teacher top-1 accuracy on labeled rows, the layout's ``inspect`` means, non-finite rows."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.sums: dict[str, float] = dict.fromkeys(("correct", "labeled", "rows", "nonfinite"), 0)
        self.means: dict[str, float] = {}

    def add(self, raw: dict[str, np.ndarray]) -> None:
        self.sums["nonfinite"] += len(self.layout.nonfinite_rows(raw))
        target = self.layout.decode(raw)
        for key, value in self.layout.inspect(target).items():
            self.means[key] = self.means.get(key, 0.0) + float(value.double().sum())
        lab = torch.from_numpy(raw[fmt.LABELS])
        mask = lab >= 0
        self.sums["correct"] += int((target.top1()[mask] == lab[mask]).sum())
        self.sums["labeled"] += int(mask.sum())
        self.sums["rows"] += len(lab)

    def result(self) -> dict[str, Any]:
        labeled, n = int(self.sums["labeled"]), int(self.sums["rows"])
        means = {k: v / n if n else None for k, v in self.means.items()}
        entropy = means.pop("entropy", None)
        return {
            "labeled": labeled,
            "unlabeled": n - labeled,
            "teacher_accuracy": self.sums["correct"] / labeled if labeled else None,
            "mean_teacher_entropy": entropy,
            "entropy_note": ("over the top-k classes plus a tail bucket (a lower bound)"
                             if self.layout.name == "topk" else None),
            "teacher_stats": means,
            "nonfinite_rows": int(self.sums["nonfinite"]),
            "stats_over": "positions",
        }


def diff_stores(a: str | Path, b: str | Path, *, ignore: tuple[str, ...] = ("timings",)) -> list[str]:
    """Differences between two stores: every array bit for bit, and the root attributes.

    Keys named in ``ignore`` are dropped from ``created_by`` before comparing (by
    default the timings, which differ from run to run). Partial stores compare too.
    """
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
