"""Shared test helpers: tiny stores made in code."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from softlabels.store.layouts import encode_ids, to_numpy
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter


def run_cli(*args: str):
    """Invoke the real CLI in-process."""
    from click.testing import CliRunner

    from softlabels.cli import main

    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *needles: str) -> None:
    """Exit status 2, one `error:` line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_plain(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the root attributes of a store, read with plain h5py / zarr (no softlabels)."""
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="r")
        return {name: a[...] for name, a in g.arrays()}, dict(g.attrs)
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][...] for k in f}
        objects = ("teacher", "source", "created_by", "layout_params", "views", "tokens")  # JSON strings in HDF5
        attrs = {k: json.loads(v) if k in objects else (v.item() if hasattr(v, "item") else v)
                 for k, v in f.attrs.items()}
    return arrays, attrs


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def make_rows(n: int, c: int, *, layout: str = "dense", k: int | None = None, seed: int = 0,
              unlabeled_every: int = 3) -> dict[str, np.ndarray]:
    """Random rows for a store: float32 logits (or top-k), labels with some -1, ids."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)).astype(np.float32) * 3
    labels = rng.integers(0, c, n).astype(np.int64)
    labels[::unlabeled_every] = -1
    rows = {"labels": labels, "sample_ids": rng.permutation(n).astype(np.int64)}
    if layout == "dense":
        rows["logits"] = z
    else:
        t = torch.from_numpy(z)
        v, i = t.topk(k, dim=-1)
        rows.update(topk_values=v.numpy(), topk_indices=i.numpy(), logsumexp=t.logsumexp(-1).numpy())
    return rows


def stored_rows(rows: dict[str, np.ndarray], layout) -> dict[str, np.ndarray]:
    """``make_rows``' float32 logits and int64 ids in the stored dtypes of ``layout`` (a layout object)."""
    out = dict(rows)
    dtype = layout.store_dtype
    for key in ("logits", "topk_values"):
        if key in out:
            out[key] = to_numpy(torch.from_numpy(np.asarray(out[key])).to(dtype))
    if "topk_indices" in out:
        out["topk_indices"] = encode_ids(torch.from_numpy(np.asarray(out["topk_indices"]).astype(np.int64)),
                                         layout.num_classes).numpy()
    return out


def write_store(path: Path, rows: dict[str, np.ndarray], *, num_classes: int, chunk_rows: int = 8,
                finish: bool = True, logits_dtype: str = "float32", shard_chunks: int = 1,
                overwrite: bool = False, **attrs) -> Path:
    """A format-2 ``sample`` store of ``make_rows``' rows (dense or top-k), written with UnitWriter.

    ``attrs``: ``teacher``, ``source``, ``created_by``, ``checksum``; ``finish=False`` leaves every unit
    written but the status ``writing``.
    """
    n = len(rows["labels"])
    layout = "topk" if "topk_values" in rows else "dense"
    params = {"k": int(rows["topk_values"].shape[1])} if layout == "topk" else {}
    meta = StoreMetaV2(positions="sample", layout=layout, num_samples=n, num_classes=num_classes,
                       logits_dtype=logits_dtype, chunk_samples=chunk_rows, shard_chunks=shard_chunks,
                       layout_params=params, **attrs)
    w = UnitWriter.create(path, meta, overwrite=overwrite)
    w.write(0, **stored_rows(rows, meta.layout_obj()))
    if finish:
        w.finish()
    w.close()
    return path
