"""Store format v1: round trips, plain-library interop, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softlabels.errors import (
    CorruptStore,
    IncompleteStore,
    NotAStore,
    StoreExists,
    StoreMismatch,
    UnsupportedFormat,
)
from softlabels.store.format import StoreMeta
from softlabels.store.v1 import densify_topk, open_store, to_torch
from softlabels.store.v1_writer import StoreWriter
from tests.conftest import make_rows, read_plain, write_store

SUFFIXES = {"hdf5": ".h5", "zarr": ".zarr", "zarr-sharded": ".zarr"}


def expected_stored(rows: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What the store must hold, computed independently of the writer."""
    out = dict(rows)
    for key in ("logits", "topk_values"):
        if key in out:
            t = torch.from_numpy(out[key])
            if dtype == "bfloat16":
                out[key] = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            else:
                out[key] = t.to(getattr(torch, dtype)).numpy()
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(list(SUFFIXES)),
    layout=st.sampled_from(["dense", "topk"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    n=st.integers(1, 60),
    c=st.integers(1, 12),
    chunk_rows=st.integers(1, 16),
    data=st.data(),
)
def test_round_trip_any_block_order(backend, layout, dtype, n, c, chunk_rows, data):
    k = data.draw(st.integers(1, c)) if layout == "topk" else None
    rows = make_rows(n, c, layout=layout, k=k, seed=data.draw(st.integers(0, 2**16)))
    # cut [0, n) into random blocks, written in random order
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6))) - {n})
    bounds = list(zip([0] + cuts, cuts + [n]))
    order = data.draw(st.permutations(bounds))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"s{SUFFIXES[backend]}"
        kw = {"shard_chunks": data.draw(st.integers(1, 3))} if backend == "zarr-sharded" else {}
        with StoreWriter.create(path, num_samples=n, num_classes=c, layout=layout, topk=k, logits_dtype=dtype,
                                chunk_rows=chunk_rows, **kw) as w:
            for a, b in order:
                w.write(a, **{key: v[a:b] for key, v in rows.items()})
        want = expected_stored(rows, dtype)
        with open_store(path) as store:
            assert store.status == "complete"
            got = store.read_rows(0, n)
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key].astype(got[key].dtype), err_msg=key)
                assert got[key].dtype == store.meta.row_arrays()[key].dtype
            for chunk in range(store.num_chunks):  # chunk reads verify checksums
                a, b = store.chunk_bounds(chunk)
                np.testing.assert_array_equal(store.read_chunk(chunk)["labels"], rows["labels"][a:b])
            if dtype == "bfloat16":  # the stored bits decode to torch's own bfloat16 rounding
                key = "logits" if layout == "dense" else "topk_values"
                t = to_torch(got, dtype)[key]
                assert t.dtype == torch.bfloat16
                assert torch.equal(t, torch.from_numpy(rows[key]).to(torch.bfloat16))
        arrays, attrs = read_plain(path)
        assert attrs["softlabels_format"] == 1 and attrs["status"] == "complete" and attrs["layout"] == layout
        assert (attrs["num_samples"], attrs["num_classes"], attrs["chunk_rows"]) == (n, c, chunk_rows)
        for key in want:
            np.testing.assert_array_equal(arrays[key], want[key].astype(arrays[key].dtype), err_msg=key)
        assert arrays["chunk_done"].tolist() == [1] * store.num_chunks


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_hand_made_store_is_read_and_inspected(tmp_path, suffix):
    """A store written with plain h5py / zarr following docs/FORMAT.md."""
    from click.testing import CliRunner

    from softlabels.cli import main
    from softlabels.store.format import chunk_checksum

    n, c, chunk = 10, 3, 4
    logits = np.arange(n * c, dtype=np.float32).reshape(n, c) % 7
    labels = np.array([0, 1, 2, -1, 0, 1, 2, -1, 0, 1], dtype=np.int64)
    ids = np.arange(n, dtype=np.int64)
    nchunks = 3
    sums = np.array([chunk_checksum({"logits": logits[i:i + chunk], "labels": labels[i:i + chunk],
                                     "sample_ids": ids[i:i + chunk]}) for i in range(0, n, chunk)], dtype=np.uint32)
    attrs = {"softlabels_format": 1, "status": "complete", "layout": "dense", "num_samples": n, "num_classes": c,
             "logits_dtype": "float32", "chunk_rows": chunk, "teacher": {"spec": "by-hand"},
             "source": {"spec": "none"}, "created_by": {"tool": "h5py"}}
    arrays = {"logits": logits, "labels": labels, "sample_ids": ids,
              "chunk_done": np.ones(nchunks, np.uint8), "checksums": sums}
    path = tmp_path / f"hand{suffix}"
    if suffix == ".h5":
        with h5py.File(path, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
            for k, v in arrays.items():
                f.create_dataset(k, data=v, chunks=(chunk,) + v.shape[1:] if v.ndim and k not in ("chunk_done", "checksums") else True)
    else:
        g = zarr.open_group(str(path), mode="w")
        g.attrs.update(attrs)
        for k, v in arrays.items():
            rows = (chunk,) if k not in ("chunk_done", "checksums") else (1,)
            a = g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=rows + v.shape[1:])
            a[...] = v
    with open_store(path) as store:
        np.testing.assert_array_equal(store.read_rows(0, n)["logits"], logits)
        assert store.verify() == []
        assert store.teacher == {"spec": "by-hand"}
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["labeled"], info["unlabeled"]) == (8, 2)
    top1 = logits.argmax(1)
    assert info["teacher_accuracy"] == pytest.approx(np.mean(top1[labels >= 0] == labels[labels >= 0]))
    p = torch.softmax(torch.from_numpy(logits), -1)
    assert info["mean_teacher_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)


def test_densify_topk_spread_and_bucket():
    rows = make_rows(5, 6, layout="topk", k=2)
    z = torch.from_numpy(make_rows(5, 6)["logits"])
    v, i, lse = (torch.from_numpy(rows[k]) for k in ("topk_values", "topk_indices", "logsumexp"))
    dense = densify_topk(v, i, lse, 6)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(5), atol=1e-6)
    logp = torch.log_softmax(z, -1)
    assert torch.allclose(dense.gather(1, i), logp.gather(1, i), atol=1e-6)
    bucket = densify_topk(v, i, lse, 6, tail="bucket")
    tail = 1 - logp.gather(1, i).exp().sum(-1)
    assert torch.allclose(bucket[:, -1].exp(), tail, atol=1e-6)
    full = make_rows(5, 6, layout="topk", k=6)
    dense_full = densify_topk(*(torch.from_numpy(full[k]) for k in ("topk_values", "topk_indices", "logsumexp")), 6)
    assert torch.allclose(dense_full, logp, atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_unfinished_store_is_refused_and_resumable(tmp_path, suffix):
    rows = make_rows(40, 4)
    path = tmp_path / f"s{suffix}"
    w = StoreWriter.create(path, num_samples=40, num_classes=4, chunk_rows=8)
    w.write(8, **{k: v[8:24] for k, v in rows.items()})   # chunks 1, 2
    w.write(30, **{k: v[30:34] for k, v in rows.items()})  # part of chunk 3: buffered, never written
    w.close()
    with pytest.raises(IncompleteStore, match=r"3 of 5 chunks missing: 0, 3, 4"):
        open_store(path)
    w = StoreWriter.resume(path)
    assert w.missing_chunks() == [0, 3, 4]
    with pytest.raises(IncompleteStore):
        w.finish()
    for a in (0, 24, 32):
        w.write(a, **{k: v[a:a + 8] for k, v in rows.items()})
    w.finish()
    w.close()
    with open_store(path) as store:
        np.testing.assert_array_equal(store.read_rows(0, 40)["logits"], rows["logits"])


def test_resume_with_other_settings_and_existing_path_are_refused(tmp_path):
    path = write_store(tmp_path / "s.h5", make_rows(10, 3), num_classes=3, finish=False)
    other = StoreMeta(layout="dense", num_samples=10, num_classes=5, chunk_rows=8)
    with pytest.raises(StoreMismatch, match="num_classes: 5 != 3"):
        StoreWriter.resume(path, expect=other)
    with pytest.raises(StoreExists):
        StoreWriter.create(path, num_samples=10, num_classes=3)
    StoreWriter.create(path, num_samples=4, num_classes=2, overwrite=True).close()
    assert open_store(path, allow_partial=True).num_samples == 4


_KILL_CHILD = r"""
import sys, time, numpy as np
from softlabels.store.v1_writer import StoreWriter
path, pause = sys.argv[1], float(sys.argv[2])
n, c = 64, 5
rng = np.random.default_rng(0)
z = rng.standard_normal((n, c)).astype(np.float32)
w = StoreWriter.create(path, num_samples=n, num_classes=c, chunk_rows=4)
for start in range(0, n, 4):
    w.write(start, logits=z[start:start + 4], labels=np.zeros(4, np.int64), sample_ids=np.arange(start, start + 4))
    print(start // 4, flush=True)
    time.sleep(pause)
w.finish()
"""


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_sigkilled_writer_leaves_a_refused_resumable_store(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), "0.2"], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # chunks 0..4 flagged, then kill while it sleeps
        child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with pytest.raises(IncompleteStore, match="status 'writing'"):
        open_store(path)
    with open_store(path, allow_partial=True) as store:
        done = set(range(16)) - set(store.missing_chunks())
    assert {0, 1, 2, 3, 4} <= done and done <= {0, 1, 2, 3, 4, 5}  # chunk 5 may have landed before the kill
    w = StoreWriter.resume(path)
    assert w.missing_chunks() == sorted(set(range(16)) - done)
    w.close()
    # every chunk flagged done holds exactly what was written
    z = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    store = open_store(path, allow_partial=True)
    for c in done:
        np.testing.assert_array_equal(store.read_chunk(c)["logits"], z[4 * c:4 * c + 4])


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_sigkill_at_random_moments_never_flags_bad_chunks(tmp_path, suffix):
    z = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    for delay in (0.05, 0.3, 0.6):
        path = tmp_path / f"s{delay}{suffix}"
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), "0"], stdout=subprocess.DEVNULL)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        if not path.exists():
            continue
        try:
            store = open_store(path, allow_partial=True)
        except (NotAStore, CorruptStore):
            continue  # killed before the layout existed: nothing was claimed
        for c in set(range(store.num_chunks)) - set(store.missing_chunks()):
            np.testing.assert_array_equal(store.read_chunk(c)["logits"], z[4 * c:4 * c + 4])


def test_unknown_version_and_bad_attrs(tmp_path):
    path = write_store(tmp_path / "s.zarr", make_rows(10, 3), num_classes=3)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["softlabels_format"] = 99
    with pytest.raises(UnsupportedFormat, match="version 99"):
        open_store(path)
    g.attrs["softlabels_format"] = 1
    g.attrs["layout"] = "sparse"
    with pytest.raises(CorruptStore, match="layout 'sparse'"):
        open_store(path)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(flags=st.lists(st.integers(0, 1), min_size=1, max_size=40), sums=st.data(), start=st.integers(0, 40))
def test_zarr_bookkeeping_read_from_files_equals_zarr(tmp_path_factory, flags, sums, start):
    """chunk_done/checksums come from the chunk files present; the values equal plain zarr's read."""
    from softlabels.store.backend import open_backend

    path = tmp_path_factory.mktemp("book") / "s.zarr"
    n = len(flags)
    w = StoreWriter.create(path, num_samples=n, num_classes=3, chunk_rows=1)
    w.close()
    g = zarr.open_group(str(path), mode="r+")
    written = sums.draw(st.lists(st.integers(0, n - 1), unique=True))
    values = sums.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(written), max_size=len(written)))
    for i, v in zip(written, values):  # only these chunk files exist
        g["chunk_done"][i], g["checksums"][i] = flags[i], v
    b = open_backend(path, "r")
    for name in ("chunk_done", "checksums"):
        plain = zarr.open_array(str(path / name), mode="r")[...]
        np.testing.assert_array_equal(b.read(name, min(start, n), n), plain[min(start, n):])
    b.close()
