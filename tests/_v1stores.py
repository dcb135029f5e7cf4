"""Format-1 stores written with plain h5py / zarr, exactly as docs/FORMAT.md's appendix describes them.

softlabels no longer writes format 1; this independent writer makes the stores the reading
tests need (damaged, partial, hostile ones too), alongside the committed fixtures in
tests/fixtures/v1/, which the last writer made.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr

ROW_KEYS = ("logits", "topk_values", "topk_indices", "logsumexp", "labels", "sample_ids")
OBJECTS = ("teacher", "source", "created_by")


def crc(block: dict[str, np.ndarray], algorithm: str = "crc32c") -> int:
    """The documented chunk checksum, computed here: a CRC chained over the per-row arrays' bytes in order."""
    import google_crc32c

    value = 0
    for key in ROW_KEYS:
        if key in block:
            data = np.ascontiguousarray(block[key]).tobytes()
            value = google_crc32c.extend(value, data) if algorithm == "crc32c" else zlib.crc32(data, value)
    return value


def v1_arrays(rows: dict[str, np.ndarray], num_classes: int, logits_dtype: str = "float32") -> dict[str, np.ndarray]:
    """``make_rows``' rows as format 1 stores them: logits in the logits dtype (bfloat16 as its bits),
    top-k ids uint16 (C <= 65,536) or int32."""
    out = {}
    for key, v in rows.items():
        if key in ("logits", "topk_values"):
            t = torch.from_numpy(np.asarray(v)).to(getattr(torch, logits_dtype))
            v = t.view(torch.int16).numpy().view(np.uint16) if logits_dtype == "bfloat16" else t.numpy()
        elif key == "topk_indices":
            v = np.asarray(v).astype(np.uint16 if num_classes <= 65536 else np.int32)
        elif key == "logsumexp":
            v = np.asarray(v, np.float32)
        else:
            v = np.asarray(v, np.int64)
        out[key] = v
    return out


def write_v1(path: Path, rows: dict[str, np.ndarray], *, num_classes: int, chunk_rows: int = 8,
             logits_dtype: str = "float32", status: str = "complete", done: list[int] | None = None,
             checksum: str | None = "crc32c", shard_chunks: int | None = None, **attrs) -> Path:
    """A format-1 store of ``rows`` (``make_rows``' arrays); ``done`` lists the chunks flagged done (default:
    all), ``checksum=None`` leaves the attribute out (a store from before it: crc32), ``attrs`` override
    root attributes."""
    path = Path(path)
    arrays = v1_arrays(rows, num_classes, logits_dtype)
    n = len(arrays["labels"])
    chunks = -(-n // chunk_rows)
    done = list(range(chunks)) if done is None else done
    flags, sums = np.zeros(chunks, np.uint8), np.zeros(chunks, np.uint32)
    for c in done:
        flags[c] = 1
        sums[c] = crc({k: v[c * chunk_rows:(c + 1) * chunk_rows] for k, v in arrays.items()}, checksum or "crc32")
    meta = {"softlabels_format": 1, "status": status, "num_samples": n, "num_classes": num_classes,
            "layout": "topk" if "topk_values" in arrays else "dense", "logits_dtype": logits_dtype,
            "chunk_rows": chunk_rows, "teacher": {"spec": "plain-writer"}, "source": {}, "created_by": {}}
    if meta["layout"] == "topk":
        meta["topk"] = int(arrays["topk_values"].shape[1])
    if checksum is not None:
        meta["checksum"] = checksum
    meta.update(attrs)
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs.update(meta)
        for k, v in arrays.items():
            rows_per = (chunk_rows,) + v.shape[1:]
            shards = None if shard_chunks is None else (chunk_rows * shard_chunks,) + v.shape[1:]
            g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=rows_per, shards=shards, fill_value=0,
                           config={"write_empty_chunks": True})[...] = v
        for k, v in (("chunk_done", flags), ("checksums", sums)):  # one element per file
            a = g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=(1,), fill_value=0)
            a[...] = v
    else:
        with h5py.File(path, "w") as f:
            for k, v in meta.items():
                f.attrs[k] = json.dumps(v) if k in OBJECTS else v
            for k, v in arrays.items():
                f.create_dataset(k, data=v, chunks=(min(chunk_rows, max(1, n)),) + v.shape[1:] if n else None)
            f.create_dataset("chunk_done", data=flags)
            f.create_dataset("checksums", data=sums)
    return path
