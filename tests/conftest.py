"""Shared test helpers: tiny stores made in code."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from softlabels.store.v1_writer import StoreWriter


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
        attrs = {k: json.loads(v) if k in ("teacher", "source", "created_by") else (v.item() if hasattr(v, "item") else v)
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


def write_store(path: Path, rows: dict[str, np.ndarray], *, num_classes: int, chunk_rows: int = 8,
                finish: bool = True, **kw) -> Path:
    n = len(rows["labels"])
    layout = "topk" if "topk_values" in rows else "dense"
    k = rows["topk_values"].shape[1] if layout == "topk" else None
    w = StoreWriter.create(path, num_samples=n, num_classes=num_classes, layout=layout, topk=k,
                           chunk_rows=chunk_rows, **kw)
    w.write(0, **rows)
    if finish:
        w.finish()
    w.close()
    return path
