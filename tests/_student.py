"""Format-2 ``sample`` stores of given teacher logits, for the student's tests (written with UnitWriter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from softlabels.store.layouts import make_layout, to_numpy
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter


def write_logits(path: Path, logits: torch.Tensor, labels: np.ndarray, sample_ids: np.ndarray, *,
                 layout: str = "dense", k: int | None = None, dtype: str = "float32", chunk_rows: int = 8,
                 source: dict | None = None, finish: bool = True) -> Path:
    """A store of the raw teacher ``logits`` [N, C] (row i: sample ``sample_ids[i]``), encoded by the layout."""
    n, c = logits.shape
    lay = make_layout(layout, num_classes=c, logits_dtype=dtype, **({"k": k} if layout == "topk" else {}))
    arrays = {name: to_numpy(t) for name, t in lay.encode(logits.float()).items()}
    meta = StoreMetaV2(positions="sample", layout=layout, num_samples=n, num_classes=c, logits_dtype=dtype,
                       chunk_samples=chunk_rows, layout_params=lay.params(), teacher={"spec": "test"},
                       source=source or {})
    w = UnitWriter.create(path, meta)
    try:
        w.write(0, **arrays, labels=np.asarray(labels, np.int64), sample_ids=np.asarray(sample_ids, np.int64))
        if finish:
            w.finish()
    finally:
        w.close()
    return path
