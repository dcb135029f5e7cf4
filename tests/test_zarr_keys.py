"""Zarr chunk file names: new stores name them ``c.<i>.0`` beside ``zarr.json`` (no directory per chunk);
stores written with ``/`` keys (``c/<i>/0``, earlier releases) read the same values and keep every check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from _v1stores import write_v1
from _v2stores import make_images, write_v2
from conftest import make_rows, write_store

from softlabels.errors import CorruptStore
from softlabels.store.reader import UnitStore, open_store
from softlabels.store.schema import UNIT_CHECKSUMS, UNIT_DONE, StoreMetaV2
from softlabels.store.writer import UnitWriter


def _nest(store: Path) -> None:
    """Rewrite a store to the ``/`` chunk key layout of earlier releases (files moved, metadata edited)."""
    for doc_file in store.glob("*/zarr.json"):
        doc = json.loads(doc_file.read_text())
        assert doc["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "."}}
        doc["chunk_key_encoding"]["configuration"]["separator"] = "/"
        doc_file.write_text(json.dumps(doc))
        for f in doc_file.parent.glob("c.*"):
            target = f.parent.joinpath(*f.name.split("."))
            target.parent.mkdir(parents=True, exist_ok=True)
            f.rename(target)


def _plain(store: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(store), mode="r")
    return {name: a[...] for name, a in g.arrays()}


@pytest.fixture
def views_store(tmp_path):
    """A complete views store (3-D logits [N, V, C]), 40 samples in 5 units of 8; returns (path, written arrays)."""
    path = tmp_path / "new.zarr"
    return path, write_v2(path, make_images(tmp_path), positions="views", chunk=8)


def test_new_stores_name_chunk_files_flat(views_store, tmp_path):
    path, written = views_store
    assert sorted(p.name for p in (path / "logits").iterdir()) == ["c.0.0.0", "c.1.0.0", "c.2.0.0", "c.3.0.0",
                                                                  "c.4.0.0", "zarr.json"]
    assert sorted(p.name for p in (path / "labels").iterdir()) == [f"c.{i}" for i in range(5)] + ["zarr.json"]
    assert not [p for p in path.rglob("*") if p.is_dir() and p.parent != path]  # no directory below the arrays
    plain = _plain(path)
    for name, a in written.items():
        np.testing.assert_array_equal(plain[name], a)
    sample = write_store(tmp_path / "sample.zarr", make_rows(20, 3), num_classes=3, chunk_rows=8)
    assert sorted(p.name for p in (sample / "logits").iterdir()) == ["c.0.0", "c.1.0", "c.2.0", "zarr.json"]


def test_stores_with_nested_keys_read_the_same(views_store, tmp_path):
    path, written = views_store
    old = tmp_path / "old.zarr"
    shutil.copytree(path, old)
    _nest(old)
    assert (old / "logits" / "c" / "3" / "0" / "0").is_file() and not list((old / "logits").glob("c.*"))
    plain = _plain(old)
    new_store, old_store = UnitStore(path), UnitStore(old)
    assert old_store.unit_done().all() and old_store.verify() == []
    for u in range(old_store.num_units):
        a, b = new_store.read_unit(u), old_store.read_unit(u)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for name, a in written.items():
        np.testing.assert_array_equal(plain[name], a)
    v1 = write_v1(tmp_path / "v1.zarr", rows := make_rows(20, 3), num_classes=3, chunk_rows=8)  # plain zarr: "/"
    assert (v1 / "logits" / "c" / "2" / "0").is_file()
    with open_store(v1) as s:
        got = {k: np.concatenate([s.read_unit(u)[k] for u in range(s.num_units)]) for k in rows}
        assert s.format_version == 1 and s.verify() == []
    for k in ("logits", "labels", "sample_ids"):
        np.testing.assert_array_equal(got[k], rows[k])


@pytest.mark.parametrize("nested", [False, True])
def test_a_lost_chunk_file_is_named_in_either_layout(views_store, tmp_path, nested):
    path, _ = views_store
    if nested:
        _nest(path)
        shutil.rmtree(path / "logits" / "c" / "2")  # counted from the listing of c/: its entries
    else:
        (path / "logits" / "c.2.0.0").unlink()
    with pytest.raises(CorruptStore, match="logits claims 5 chunk files but the store holds 4 of them"):
        UnitStore(path)


def test_nested_chunk_directory_leading_out_is_refused(views_store, tmp_path):
    path, _ = views_store
    _nest(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(path / "logits" / "c" / "1", outside / "1")
    (path / "logits" / "c" / "1").symlink_to(outside / "1")
    with pytest.raises(CorruptStore, match="outside the store"):
        UnitStore(path)


@pytest.mark.parametrize("nested", [False, True])
def test_grouped_bookkeeping_reads_equal_plain_zarr(tmp_path, nested):
    """unit_done / unit_checksums hold a group of units per file, read from the files present (a partial store)."""
    meta = StoreMetaV2(positions="sample", layout="dense", num_samples=10, num_classes=4, chunk_samples=1,
                       group_units=3)
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    w = UnitWriter.create(path, meta)  # units 0..6 of 10: the third group's file holds one flag
    w.write(0, logits=rng.standard_normal((7, 4)).astype(np.float32), labels=np.arange(7) % 4,
            sample_ids=np.arange(7))
    w.close()
    if nested:
        _nest(path)
    assert sorted(p.name for p in (path / "unit_done").glob("c*")) == (["c"] if nested else ["c.0", "c.1", "c.2"])
    plain = _plain(path)
    store = UnitStore(path, allow_partial=True)
    np.testing.assert_array_equal(store.unit_done(), [1] * 7 + [0] * 3)
    b = store._handle()
    for name in (UNIT_DONE, UNIT_CHECKSUMS):
        np.testing.assert_array_equal(b.read(name, 0, 10), plain[name])
        np.testing.assert_array_equal(b.read(name, 4, 8), plain[name][4:8])
    assert plain[UNIT_CHECKSUMS][:7].all() and not plain[UNIT_CHECKSUMS][7:].any()
