"""SoftLabelDataset / SoftLabelMapDataset: coverage, order, joins, resume, errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from softlabels.errors import (
    ConfigError,
    CorruptStore,
    DataError,
    FingerprintMismatch,
    IncompleteStore,
    StoreMismatch,
)
from softlabels.inputs.arrays import ArrayDataset
from softlabels.inputs.fingerprints import fingerprint
from softlabels.store.reader import open_store
from softlabels.store.reader import UnitStore
from softlabels.student import order as _order
from softlabels.student.dataset import SoftLabelDataset, SoftLabelMapDataset
from softlabels.student.losses import as_target
from tests._student import write_logits
from tests.conftest import read_plain

BACKENDS = {"hdf5": ".h5", "zarr": ".zarr"}
N, C, CHUNK, BATCH, WINDOW = 103, 6, 8, 10, 3  # N is a multiple of neither CHUNK nor BATCH


def make_store(path: Path, n: int = N, c: int = C, *, chunk_rows: int = CHUNK, layout: str = "dense",
               dtype: str = "float32", k: int | None = None, seed: int = 0, labeled: bool = True,
               data: ArrayDataset | None = None, finish: bool = True) -> Path:
    """A store whose sample ids are a permutation of range(n)."""
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((n, c)).astype(np.float32) * 3)
    labels, ids = rng.integers(0, c, n) if labeled else np.full(n, -1), rng.permutation(n)
    source = {"spec": f"test:{seed}", "fingerprint": fingerprint(data)} if data is not None else {}
    return write_logits(path, z, labels, ids, layout=layout, k=k, dtype=dtype, chunk_rows=chunk_rows, source=source,
                        finish=finish)


def make_data(n: int = N, seed: int = 0) -> ArrayDataset:
    x = np.random.default_rng(seed + 100).standard_normal((n, 2, 3)).astype(np.float32)
    return ArrayDataset(x, np.random.default_rng(seed).integers(0, C, n))


@pytest.fixture(scope="module", params=list(BACKENDS))
def dense(request, tmp_path_factory):
    """(path, data, plain arrays) of a dense float32 store joined with inputs."""
    data = make_data()
    path = make_store(tmp_path_factory.mktemp("d") / f"s{BACKENDS[request.param]}", data=data)
    return path, data, read_plain(path)[0]


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b["sample_ids"].numpy() for b in batches]) if batches else np.empty(0, np.int64)


def round_robin(streams: list[list]) -> list:
    """The order a DataLoader delivers worker streams: 0, 1, .., W-1, skipping exhausted ones."""
    out, j = [], 0
    while any(j < len(s) for s in streams):
        out += [s[j] for s in streams if j < len(s)]
        j += 1
    return out


def stream_batches(sizes: np.ndarray, **kw) -> list[np.ndarray]:
    """The global row ids of every batch of ``order.chunk_batches``: the plan the reads follow."""
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    return [starts[chunk] + row for chunk, row in _order.chunk_batches(sizes, **kw)]


def rank_batches(ds: SoftLabelDataset, workers: int) -> list[dict]:
    """A rank's epoch as a DataLoader with ``workers`` workers delivers it (simulated in-process)."""
    if workers == 0:
        return list(ds)
    return round_robin([list(ds._iter_worker(w, workers)) for w in range(workers)])


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key


# -- coverage and order -------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks_and_workers(dense, world):
    path, data, arrays = dense
    store = open_store(path)
    for workers in (0, 1, 2, 3):
        for epoch in range(3):
            per_rank = []
            for rank in range(world):
                ds = SoftLabelDataset([(store, data)], batch_size=BATCH, window_chunks=WINDOW, rank=rank,
                                      world_size=world)
                ds.set_epoch(epoch)
                batches = rank_batches(ds, workers)
                assert len(batches) == len(ds)
                assert all(1 <= len(b["labels"]) <= BATCH for b in batches)
                assert sum(len(b["labels"]) < BATCH for b in batches) <= 1  # one short batch per rank
                # the real reads follow the pure plan exactly
                ref = round_robin([stream_batches(
                    np.diff(np.r_[0:N:CHUNK, N]), batch_size=BATCH, window_chunks=WINDOW, seed=0, epoch=epoch,
                    shuffle=True, rank=rank, world=world, worker=w, workers=max(workers, 1))
                    for w in range(max(workers, 1))])
                assert [b["sample_ids"].tolist() for b in batches] == [arrays["sample_ids"][r].tolist() for r in ref]
                per_rank.append(ids_of(batches))
            assert sorted(np.concatenate(per_rank).tolist()) == list(range(N))
            sizes = [len(r) for r in per_rank]
            assert max(sizes) - min(sizes) <= 1


def _loaders():
    from softlabels.inputs.loader import batch_loader

    return {"DataLoader": lambda ds, w: DataLoader(ds, batch_size=None, num_workers=w),
            "batch_loader": lambda ds, w: batch_loader(ds, num_workers=w)}


@pytest.mark.parametrize("transport", ["DataLoader", "batch_loader"])
@pytest.mark.parametrize("world", [1, 2])
def test_real_dataloader_workers_match_simulation(dense, world, transport):
    path, data, _ = dense
    got_ids = []
    for rank in range(world):
        ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=WINDOW, rank=rank, world_size=world)
        ds.set_epoch(1)
        loader = _loaders()[transport](ds, 2)
        real = list(loader)
        assert len(loader) == len(ds) == len(real)
        assert_same_batches(real, rank_batches(ds, 2))
        got_ids.append(ids_of(real))
    assert sorted(np.concatenate(got_ids).tolist()) == list(range(N))


def test_epochs_seeds_and_store_order(dense):
    path, data, arrays = dense

    def order(epoch, seed=0, shuffle=True, rank=0, world=1):
        ds = SoftLabelDataset([(path, data)], batch_size=BATCH, seed=seed, shuffle=shuffle, rank=rank,
                              world_size=world)
        ds.set_epoch(epoch)
        return ids_of(list(ds)).tolist()

    e0 = order(0)
    assert e0 == order(0)  # same seed and epoch, fresh dataset
    assert e0 != order(1) and order(1) != order(2) and e0 != order(0, seed=1)
    assert order(0, shuffle=False) == arrays["sample_ids"].tolist() == order(5, shuffle=False)
    halves = order(0, shuffle=False, rank=0, world=2) + order(0, shuffle=False, rank=1, world=2)
    assert halves == arrays["sample_ids"].tolist()


# -- values --------------------------------------------------------------------------------------
def test_joined_inputs_and_logits_match_plain_reads(dense):
    path, data, arrays = dense
    row_of = np.argsort(arrays["sample_ids"])  # sample id -> row
    ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2)
    batches = list(ds)
    for b in batches:
        assert set(b) == {"labels", "sample_ids", "source", "x", "logits"}
        ids = b["sample_ids"].numpy()
        rows = row_of[ids]
        assert b["x"].dtype == torch.float32 and b["x"].shape == (len(ids), 2, 3)
        assert torch.equal(b["x"], data.get_batch(ids)[0])
        np.testing.assert_array_equal(b["x"].numpy(), data._x[ids])
        assert b["logits"].dtype == torch.float32
        np.testing.assert_array_equal(b["logits"].numpy(), arrays["logits"][rows])
        np.testing.assert_array_equal(b["labels"].numpy(), arrays["labels"][rows])
        assert b["labels"].dtype == b["sample_ids"].dtype == b["source"].dtype == torch.int64
        assert (b["source"] == 0).all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bfloat16_bit_exact_and_float16(tmp_path, backend):
    for dtype in ("bfloat16", "float16"):
        path = make_store(tmp_path / f"{dtype}{BACKENDS[backend]}", dtype=dtype, seed=3)
        arrays = read_plain(path)[0]
        row_of = np.argsort(arrays["sample_ids"])
        for b in SoftLabelDataset([(path, None)], batch_size=BATCH):
            assert "x" not in b
            rows = row_of[b["sample_ids"].numpy()]
            assert b["logits"].dtype == getattr(torch, dtype)
            bits = b["logits"].view(torch.int16).numpy().view(arrays["logits"].dtype)
            np.testing.assert_array_equal(bits, arrays["logits"][rows])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_topk_store_dtypes_and_values(tmp_path, backend):
    path = make_store(tmp_path / f"k{BACKENDS[backend]}", layout="topk", k=3, dtype="float16", seed=4)
    arrays = read_plain(path)[0]
    row_of = np.argsort(arrays["sample_ids"])
    ds = SoftLabelDataset([(path, None)], batch_size=BATCH, rank=1, world_size=2)
    seen = []
    for b in ds:
        # a store without a tail grid: its logsumexp becomes the tail's at T = 1, the one T it answers
        assert set(b) == {"labels", "sample_ids", "source", "topk_values", "topk_indices", "tail_logsumexp",
                          "tail_temperatures"}
        assert b["topk_indices"].dtype == torch.int64 and b["tail_logsumexp"].dtype == torch.float32
        assert b["tail_temperatures"] == (1.0,)
        assert b["topk_values"].dtype == torch.float16
        rows = row_of[b["sample_ids"].numpy()]
        np.testing.assert_array_equal(b["topk_indices"].numpy(), arrays["topk_indices"][rows])
        np.testing.assert_array_equal(b["topk_values"].numpy(), arrays["topk_values"][rows])
        # float16 values a little above the stored logsumexp leave the tail at its floor: within the values' rounding
        np.testing.assert_allclose(as_target(b).logsumexp.numpy(), arrays["logsumexp"][rows], rtol=1e-3)
        seen.append(b["sample_ids"])
    assert len(torch.cat(seen)) == N - N // 2


# -- resumption ----------------------------------------------------------------------------------
def test_resume_yields_exactly_the_remaining_batches(dense):
    path, data, _ = dense
    for workers in (0, 2):
        ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2, rank=1, world_size=2)
        ds.set_epoch(2)
        full = rank_batches(ds, workers)
        for k in (0, 1, 3, 4, len(full) - 1, len(full)):
            again = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2, rank=1, world_size=2)
            again.load_state_dict(ds.state_dict(batches_done=k))
            assert again.epoch == 2
            assert_same_batches(rank_batches(again, workers), full[k:])


@pytest.mark.parametrize("transport", ["DataLoader", "batch_loader"])
def test_resume_with_real_workers(dense, transport):
    path, data, _ = dense
    loader = _loaders()[transport]
    ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2, seed=7)
    ds.set_epoch(1)
    full = list(loader(ds, 2))
    for k in (3, 6):
        state = ds.state_dict(batches_done=k)
        assert state == {"epoch": 1, "seed": 7, "batches_done": k}
        again = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2)  # seed comes from the state
        again.load_state_dict(state)
        again.set_epoch(1)  # same epoch: the resume point holds
        assert_same_batches(list(loader(again, 2)), full[k:])
    again.set_epoch(2)  # another epoch: starts from its beginning
    assert len(list(again)) == len(again)


def test_one_batch_loader_across_epochs_resumes_and_broken_epochs(dense):
    """batch_loader keeps its workers across epochs: each epoch, a resume point and a new seed reach them,
    and an epoch left unfinished (slots still taken) gives way to fresh workers."""
    from softlabels.inputs.loader import batch_loader

    path, data, _ = dense
    ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2, seed=3)
    ref = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2, seed=3)
    loader = batch_loader(ds, num_workers=2)

    def expect() -> list[dict]:
        ref.seed, ref.epoch, ref._resume = ds.seed, ds.epoch, ds._resume
        return rank_batches(ref, 2)

    for epoch in (0, 1, 1, 4):
        ds.set_epoch(epoch)
        assert_same_batches(list(loader), expect())
    workers = loader._live.loader._iterator._workers
    ds.load_state_dict({"epoch": 5, "seed": 9, "batches_done": 3})
    assert_same_batches(list(loader), expect())
    assert loader._live.loader._iterator._workers == workers  # the same processes served every epoch
    ds.set_epoch(6)
    for i, _ in enumerate(loader):  # stop early: this epoch's workers are not reused
        if i == 2:
            break
    ds.set_epoch(7)
    assert_same_batches(list(loader), expect())
    assert loader._live.loader._iterator._workers != workers


def test_resume_reads_only_the_units_of_the_batches_to_come(dense, monkeypatch):
    path, data, _ = dense
    reads: list[int] = []
    original = UnitStore.read_unit

    def counting(self, unit, **kw):
        reads.append(unit)
        return original(self, unit, **kw)

    monkeypatch.setattr(UnitStore, "read_unit", counting)
    ds = SoftLabelDataset([(path, data)], batch_size=BATCH, window_chunks=2)
    sizes = np.diff(np.r_[0:N:CHUNK, N])
    for workers in (1, 2):
        counts = _order.worker_batch_counts(N, BATCH, 0, 1, workers)
        full = [stream_batches(sizes, batch_size=BATCH, window_chunks=2, seed=0, epoch=0,
                               shuffle=True, rank=0, world=1, worker=w, workers=workers)
                for w in range(workers)]
        for k in range(len(ds) + 1):
            ds.load_state_dict({"epoch": 0, "seed": 0, "batches_done": k})
            done, due = _order.resume_point(counts, k)
            for p in range(workers):
                reads.clear()
                list(ds._iter_worker(p, workers))
                w = (due + p) % workers
                # each unit holding a row still to come, read once, in the order the batches first need it
                units = [u for b in full[w][int(done[w]):] for u in (b // CHUNK).tolist()]
                assert reads == list(dict.fromkeys(units))
    ds.load_state_dict({"epoch": 0, "seed": 0, "batches_done": len(ds)})
    reads.clear()
    assert list(ds) == [] and reads == []


def test_state_validation(dense):
    path, data, _ = dense
    ds = SoftLabelDataset([(path, data)], batch_size=BATCH)
    with pytest.raises(ConfigError, match="batches_done"):
        ds.state_dict(batches_done=len(ds) + 1)
    with pytest.raises(ConfigError, match="batches_done"):
        ds.load_state_dict({"epoch": 0, "seed": 0, "batches_done": len(ds) + 1})
    with pytest.raises(ConfigError, match="lacks"):
        ds.load_state_dict({"epoch": 0})


# -- several sources and errors ------------------------------------------------------------------
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_labeled_and_unlabeled_sources_each_once(tmp_path, backend):
    suffix = BACKENDS[backend]
    da, db = make_data(50, seed=1), make_data(37, seed=2).without_labels()
    a = make_store(tmp_path / f"a{suffix}", 50, data=da, seed=1)
    b = make_store(tmp_path / f"b{suffix}", 37, chunk_rows=5, labeled=False, data=db, seed=2)
    seen = []
    for rank in range(2):
        ds = SoftLabelDataset([(a, da), (b, db)], batch_size=7, window_chunks=2, rank=rank, world_size=2)
        assert ds.num_samples == 87 and ds.num_classes == C and ds.layout == "dense" and len(ds.stores) == 2
        for batch in ds:
            src, ids = batch["source"].numpy(), batch["sample_ids"].numpy()
            assert (batch["labels"].numpy()[src == 1] == -1).all()
            for s, d in ((0, da), (1, db)):
                np.testing.assert_array_equal(batch["x"].numpy()[src == s], d.get_batch(ids[src == s])[0].numpy())
            seen += list(zip(src.tolist(), ids.tolist()))
    assert sorted(seen) == sorted([(0, i) for i in range(50)] + [(1, i) for i in range(37)])


def test_mismatched_stores_and_data_are_refused(tmp_path):
    data = make_data()
    base = make_store(tmp_path / "base.h5", data=data)
    other_c = make_store(tmp_path / "c.h5", c=C + 1)
    topk = make_store(tmp_path / "k.zarr", layout="topk", k=2)
    with pytest.raises(StoreMismatch, match="num_classes"):
        SoftLabelDataset([(base, None), (other_c, None)], batch_size=4)
    with pytest.raises(StoreMismatch, match="layout"):
        SoftLabelDataset([(base, None), (topk, None)], batch_size=4)
    with pytest.raises(FingerprintMismatch) as err:
        SoftLabelDataset([(base, make_data(seed=9))], batch_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "base.h5" in msg and "--data" in msg and msg.count("sha256:") == 2
    assert fingerprint(data)[:19] in msg
    SoftLabelDataset([(base, make_data(seed=9))], batch_size=4, check_fingerprint=False)  # allowed when asked
    with pytest.raises(DataError, match="sample id"):  # checked batch by batch: reading them all costs a pass
        list(SoftLabelDataset([(base, make_data(N - 1))], batch_size=4, check_fingerprint=False))
    with pytest.raises(ConfigError, match="every source or for none"):
        SoftLabelDataset([(base, data), (base, None)], batch_size=4)
    with pytest.raises(ConfigError) as err:
        SoftLabelDataset([(base, None)], batch_size=0, window_chunks=0, rank=2, world_size=2)
    assert len(err.value.problems) == 3
    partial = make_store(tmp_path / "p.h5", finish=False)
    with pytest.raises(IncompleteStore):
        SoftLabelDataset([(partial, None)], batch_size=4)
    with pytest.raises(IncompleteStore):
        SoftLabelDataset([(UnitStore(partial, allow_partial=True), None)], batch_size=4)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_corrupt_chunk_surfaces_during_iteration(tmp_path, backend):
    path = make_store(tmp_path / f"bad{BACKENDS[backend]}")
    if backend == "hdf5":
        with h5py.File(path, "r+") as f:
            f["logits"][2 * CHUNK + 1] += 1
    else:
        a = zarr.open_array(str(path), path="logits", mode="r+")
        a[2 * CHUNK + 1] = a[2 * CHUNK + 1] + 1
    ds = SoftLabelDataset([(path, None)], batch_size=BATCH)  # construction reads no chunk
    with pytest.raises(CorruptStore, match="unit 2"):
        list(ds)
    assert len(ids_of(list(SoftLabelDataset([(path, None)], batch_size=BATCH, verify=False)))) == N


# -- map-style -----------------------------------------------------------------------------------
def test_map_dataset_rows_and_cache(dense):
    path, data, arrays = dense
    ds = SoftLabelMapDataset(path, data, cache_chunks=2)
    assert len(ds) == N and ds.num_classes == C
    for i in np.random.default_rng(0).permutation(N)[:40].tolist() + [-1]:
        item = ds[i]
        np.testing.assert_array_equal(item["logits"].numpy(), arrays["logits"][i])
        assert int(item["sample_ids"]) == arrays["sample_ids"][i] and int(item["labels"]) == arrays["labels"][i]
        assert torch.equal(item["x"], data[int(item["sample_ids"])][0])
        assert (ds.held.unit_in >= 0).sum() <= 2  # units kept
    with pytest.raises(IndexError):
        ds[N]
    batch = next(iter(DataLoader(ds, batch_size=16, num_workers=2)))
    np.testing.assert_array_equal(batch["logits"].numpy(), arrays["logits"][:16])
    assert set(batch) == {"labels", "sample_ids", "source", "x", "logits"}


def test_map_dataset_rows_of_a_sparse_store_keep_their_temperatures(tmp_path):
    path = make_store(tmp_path / "k.h5", layout="topk", k=3, seed=4)
    arrays = read_plain(path)[0]
    ds = SoftLabelMapDataset(path)
    for i in (0, 7, N - 1):
        item = ds[i]
        assert item["tail_temperatures"] == (1.0,)  # the store's grid, not its first entry
        np.testing.assert_array_equal(item["topk_values"].numpy(), arrays["topk_values"][i])
        target = as_target({k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in item.items()})
        np.testing.assert_array_equal(target.ids[0].numpy(), arrays["topk_indices"][i])
        assert target.temperatures == (1.0,)


# -- the pure ordering math ----------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.data())
def test_order_property(draw):
    d = draw.draw
    sizes = np.concatenate([np.diff(np.r_[0:n:r, n]) for n, r in d(st.lists(
        st.tuples(st.integers(1, 120), st.integers(1, 20)), min_size=1, max_size=3))])  # 1-3 sources
    total = int(sizes.sum())
    world, workers, batch = d(st.integers(1, 4)), d(st.integers(1, 4)), d(st.integers(1, 25))
    kw = dict(batch_size=batch, window_chunks=d(st.integers(1, 5)), seed=d(st.integers(0, 3)),
              epoch=d(st.integers(0, 3)), shuffle=d(st.booleans()))
    seen, rank_rows = [], []
    for rank in range(world):
        streams = [stream_batches(sizes, rank=rank, world=world, worker=w, workers=workers, **kw)
                   for w in range(workers)]
        flat = [b for s in streams for b in s]
        assert all(1 <= len(b) <= batch for b in flat)
        assert sum(len(b) < batch for b in flat) <= 1
        counts = _order.worker_batch_counts(total, batch, rank, world, workers)
        assert [len(s) for s in streams] == counts.tolist() and max(counts) - min(counts) <= 1
        rank_rows.append(sum(map(len, flat)))
        seen += [np.concatenate(flat)] if flat else []
        # resuming after k delivered batches continues the DataLoader's round-robin order
        delivered = round_robin(streams)
        k = d(st.integers(0, len(delivered)))
        done, due = _order.resume_point(counts, k)
        logical = [(due + p) % workers for p in range(workers)]  # what the resumed loader's workers serve
        rest = round_robin([stream_batches(sizes, rank=rank, world=world, worker=w, workers=workers,
                                                  skip_batches=int(done[w]), **kw) for w in logical])
        assert len(rest) == len(delivered) - k
        assert all(np.array_equal(a, b) for a, b in zip(rest, delivered[k:]))
    got = np.sort(np.concatenate(seen)) if seen else np.empty(0)
    np.testing.assert_array_equal(got, np.arange(total))
    assert max(rank_rows) - min(rank_rows) <= 1
    if not kw["shuffle"]:
        np.testing.assert_array_equal(np.concatenate(seen) if seen else got, np.arange(total))
