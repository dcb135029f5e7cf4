"""Reading format-2 stores: the streaming dataset, views replay in training, train/eval/inspect via the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from _v2stores import SHAPE, Teacher, make_images, write_v2
from conftest import read_plain, run_cli

from softlabels.inputs.spec import resolve_data
from softlabels.store.layouts import make_layout
from softlabels.store.positions.views import choose_views
from softlabels.store.reader import UnitStore, open_store
from softlabels.student.dataset import SoftLabelDataset
from softlabels.student.losses import as_target

V = 3
SEED = 11


def _plain(path: Path) -> dict[str, np.ndarray]:
    """Every array, read with plain h5py / zarr."""
    if path.suffix == ".zarr":
        g = zarr.open_group(str(path), mode="r")
        return {name: a[...] for name, a in g.arrays()}
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}


def _expected(path: Path, positions: str, layout: str, epoch: int) -> dict[int, dict[str, np.ndarray]]:
    """sample id -> the arrays of its row (its chosen view for a views store), from the plain read."""
    arrays = _plain(path)
    lay = make_layout(layout, num_classes=4, **{"dense": {}, "topk": {"k": 2}, "sampled": {"samples": 8, "seed": 3}}[layout])
    ids = arrays["sample_ids"]
    rows = np.arange(len(ids))
    out: dict[int, dict[str, np.ndarray]] = {}
    view = choose_views(SEED, ids, epoch, V) if positions == "views" else None
    for k in lay.arrays():
        a = arrays[k] if view is None else arrays[k][rows, view]
        for r, i in enumerate(ids):
            out.setdefault(int(i), {})[k] = a[r]
    for r, i in enumerate(ids):
        out[int(i)]["labels"] = arrays["labels"][r]
        if view is not None:
            out[int(i)]["view"] = view[r]
            out[int(i)]["view_params"] = arrays["view_params"][r, view[r]]
    return out, lay


@pytest.mark.parametrize("backend", ["h5", "zarr"])
@pytest.mark.parametrize("positions,layout", [("sample", "dense"), ("sample", "topk"), ("views", "sampled"),
                                              ("views", "dense"), ("views", "topk"), ("sample", "sampled")])
def test_batches_equal_a_plain_read_decoded_by_the_layout(tmp_path, backend, positions, layout):
    spec = make_images(tmp_path)
    path = tmp_path / f"s.{backend}"
    write_v2(path, spec, positions=positions, layout=layout, dtype="float16" if layout == "topk" else "float32")
    data = resolve_data(spec)
    ds = SoftLabelDataset([(path, data)], batch_size=7, seed=SEED)
    for epoch in (0, 1, 4):
        ds.set_epoch(epoch)
        want, lay = _expected(path, positions, layout, epoch)
        seen = []
        for b in ds:
            target = as_target(b)
            for r, i in enumerate(b["sample_ids"].tolist()):
                seen.append(i)
                row = want[i]
                one = lay.decode({k: row[k][None] for k in lay.arrays()})
                for f in one.__dataclass_fields__:
                    if f == "num_classes":  # the store's C, carried by a decoded target for the library's check
                        assert getattr(one, f) == lay.num_classes
                        continue
                    got, exp = getattr(target, f), getattr(one, f)
                    if isinstance(exp, torch.Tensor):
                        assert torch.equal(got[r], exp[0]), (i, f)
                    else:  # the temperatures a target answers: Python numbers
                        assert got == exp, (i, f)
                assert b["labels"][r] == row["labels"]
                if positions == "views":
                    assert b["view"][r] == row["view"]
                    assert torch.equal(b["view_params"][r], torch.from_numpy(row["view_params"]))
            assert torch.equal(b["x"], data.get_batch(b["sample_ids"].numpy())[0])
        assert sorted(seen) == list(range(len(data)))


def test_views_coverage_ranks_workers_and_resume(tmp_path):
    spec = make_images(tmp_path, n=45)
    path = tmp_path / "v.zarr"
    write_v2(path, spec, positions="views", layout="dense")
    data = resolve_data(spec)

    def epoch_batches(rank, epoch, worker, workers, state=None):
        ds = SoftLabelDataset([(path, data)], batch_size=4, seed=SEED, rank=rank, world_size=2, window_chunks=2)
        ds.set_epoch(epoch)
        if state is not None:
            ds.load_state_dict(state)
        return list(ds._iter_worker(worker, workers))

    uses = Counter()
    for epoch in range(V):  # every view of every sample exactly once in V epochs, across 2 ranks x 2 workers
        ids = []
        for rank in range(2):
            for worker in range(2):
                for b in epoch_batches(rank, epoch, worker, 2):
                    ids += b["sample_ids"].tolist()
                    assert torch.equal(b["view"], torch.from_numpy(choose_views(SEED, b["sample_ids"].numpy(),
                                                                                epoch, V)))
                    uses.update(zip(b["sample_ids"].tolist(), b["view"].tolist()))
        assert sorted(ids) == list(range(45))
    assert set(uses) == {(i, v) for i in range(45) for v in range(V)} and set(uses.values()) == {1}
    # resume after 3 batches (one worker: the round-robin order is the batch order)
    full = epoch_batches(1, 2, 0, 1)
    ds = SoftLabelDataset([(path, data)], batch_size=4, seed=SEED, rank=1, world_size=2, window_chunks=2)
    ds.set_epoch(2)
    rest = epoch_batches(1, 2, 0, 1, ds.state_dict(batches_done=3))
    assert len(rest) == len(full) - 3
    for g, w in zip(rest, full[3:]):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


def _train(tmp_path, store, out, *, teacher=None, epochs=3, on_epoch_end=None, **kw):
    from softlabels.student.trainer import TrainConfig, train

    cfg = TrainConfig(stores=[str(store)], student="linear", epochs=epochs, batch_size=8, lr=0.05, seed=3,
                      out=str(tmp_path / out), progress=False, **kw)
    train(cfg, teacher=teacher, on_epoch_end=on_epoch_end)
    return torch.load(tmp_path / out / "model.pt", weights_only=True)


def test_offline_views_store_equals_online_kd_exactly(tmp_path):
    """A float32 views store with V >= epochs trains the same weights, bit for bit, as the teacher in the loop."""
    spec = make_images(tmp_path)
    store = tmp_path / "v.h5"
    write_v2(store, spec, positions="views", layout="dense", views=4)
    offline = _train(tmp_path, store, "off", epochs=4)
    online = _train(tmp_path, store, "on", teacher=Teacher(), epochs=4)
    assert offline.keys() == online.keys()
    assert all(torch.equal(offline[k], online[k]) for k in offline)
    # and the views matter: the un-augmented teacher (a sample store) trains other weights
    plain = tmp_path / "s.h5"
    write_v2(plain, spec, positions="sample", layout="dense")
    other = _train(tmp_path, plain, "plain", epochs=4)
    assert not all(torch.equal(offline[k], other[k]) for k in offline)


def test_v2_sample_store_trains_like_the_same_v1_store(tmp_path):
    """The same rows in a format-1 store (the plain writer) and a v2 sample store: identical weights."""
    from _v1stores import write_v1

    spec = make_images(tmp_path)
    v2 = tmp_path / "s.zarr"
    arrays = write_v2(v2, spec, positions="sample", layout="dense", chunk=8)
    meta = open_store(v2).meta
    v1 = write_v1(tmp_path / "v1.zarr", arrays, num_classes=4, chunk_rows=8, teacher=meta.teacher, source=meta.source)
    a, b = _train(tmp_path, v1, "v1"), _train(tmp_path, v2, "v2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_open_store_opens_either_version(tmp_path):
    from _v1stores import write_v1

    from softlabels.store.v1 import V1Store

    spec = make_images(tmp_path)
    write_v2(tmp_path / "s.h5", spec)
    assert isinstance(open_store(tmp_path / "s.h5"), UnitStore)
    rows = {"logits": np.zeros((2, 4), np.float32), "labels": np.zeros(2, np.int64), "sample_ids": np.arange(2)}
    store = open_store(write_v1(tmp_path / "v1.h5", rows, num_classes=4, chunk_rows=2))
    assert isinstance(store, V1Store) and store.format_version == 1 and store.meta.positions == "sample"


@pytest.mark.parametrize("backend", ["h5", "zarr"])
@pytest.mark.parametrize("positions,layout,loss", [("sample", "topk", None), ("views", "dense", "jsd"),
                                                   ("views", "sampled", None), ("sample", "sampled", "reverse_kl")])
def test_cli_train_eval_inspect_on_v2_stores(tmp_path, backend, positions, layout, loss):
    spec = make_images(tmp_path)
    store = tmp_path / f"s.{backend}"
    write_v2(store, spec, positions=positions, layout=layout, views=V)
    args = ["train", "--store", str(store), "--student", "linear", "--epochs", "2", "--batch-size", "8",
            "--out", str(tmp_path / "run")] + (["--loss", loss] if loss else [])
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["loss"] == (loss or {"dense": "kl", "topk": "topk_kl", "sampled": "sampled_kl"}[layout])
    assert summary["config"]["input_shape"] == list(SHAPE)
    r = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--data", spec, "--store", str(store), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["n"] == 40
    r = run_cli("inspect", str(store), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    arrays, _ = read_plain(store)
    views = V if positions == "views" else 1
    lay = make_layout(layout, num_classes=4, **info["layout_params"])
    assert info["num_positions"] == 40 * views and info["bytes_per_position"] == lay.bytes_per_position
    assert (info["labeled"], info["unlabeled"]) == (40, 0)
    flat = {k: arrays[k].reshape(40 * views, *arrays[k].shape[1 + (views > 1 or positions == "views"):])
            for k in lay.arrays()}
    target = lay.decode(flat)
    labels = np.repeat(arrays["labels"], views)
    assert info["teacher_accuracy"] == pytest.approx(float((target.top1().numpy() == labels).mean()))
    stats = {k: float(v.double().mean()) for k, v in lay.inspect(target).items()}
    assert info["mean_teacher_entropy"] == pytest.approx(stats.pop("entropy", None))
    assert info["teacher_stats"] == pytest.approx(stats)
    if positions == "views":
        assert info["views"]["count"] == V and info["bytes_per_view"] == lay.bytes_per_position + 4 * 3
        r = run_cli("inspect", str(store))
        assert "V=3" in r.output and "crop(6,padding=1)+flip" in r.output


def test_loss_check_per_layout(tmp_path):
    from softlabels.student.classifier import valid_losses

    assert valid_losses("dense") == ["kl", "soft_ce", "mse", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"]
    assert valid_losses("topk") == ["topk_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"]
    assert valid_losses("sampled") == ["sampled_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"]
    spec = make_images(tmp_path)
    store = tmp_path / "s.h5"
    write_v2(store, spec, layout="topk")
    for loss in ("reverse_kl", "skew_kl", "skew_reverse_kl", "jsd", "topk_kl"):
        r = run_cli("train", "--store", str(store), "--student", "linear", "--epochs", "1", "--loss", loss,
                    "--out", str(tmp_path / loss))
        assert r.exit_code == 0, r.output


def test_resumed_views_run_equals_an_uninterrupted_one(tmp_path):
    """Killed after epoch 1 and resumed: the views of epochs 2 and 3 are the ones an uninterrupted run uses."""
    spec = make_images(tmp_path)
    store = tmp_path / "v.zarr"
    write_v2(store, spec, positions="views", layout="topk", views=3)
    straight = _train(tmp_path, store, "a", epochs=3)

    def crash(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, store, "b", epochs=3, on_epoch_end=crash)
    resumed = _train(tmp_path, store, "b", epochs=3, resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_inspect_on_a_token_store_counts_tokens(tmp_path):
    """inspect on a `tokens` store: every token is a position, and sequences carry no labels."""
    from _v2stores import write_tokens

    write_tokens(tmp_path / "t.h5", make_images(tmp_path))
    r = run_cli("inspect", str(tmp_path / "t.h5"), "--verify", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert info["num_positions"] == int(f["lengths"][:].sum()) == 8
    assert (info["positions"], info["labeled"], info["unlabeled"]) == ("tokens", 0, 4)
    assert info["teacher_accuracy"] is None and info["nonfinite_rows"] == 0


@pytest.mark.parametrize("k", [2, 3])
def test_views_per_sample_batches_coverage_ranks_workers_and_resume(tmp_path, k):
    """k views per input read: each row is the epoch's k chosen views, read back equal to a plain read; every
    sample once per epoch across 2 ranks x 2 workers; all V views used in ceil(V / k) epochs; resume."""
    spec = make_images(tmp_path, n=45)
    path = tmp_path / "v.h5"
    write_v2(path, spec, positions="views", layout="topk", views=V)
    data, plain = resolve_data(spec), _plain(path)
    row_of = {int(i): r for r, i in enumerate(plain["sample_ids"])}

    def epoch_batches(rank, epoch, worker, workers, state=None):
        ds = SoftLabelDataset([(path, data)], batch_size=4, seed=SEED, rank=rank, world_size=2, window_chunks=2,
                              views_per_sample=k)
        ds.set_epoch(epoch)
        if state is not None:
            ds.load_state_dict(state)
        return list(ds._iter_worker(worker, workers))

    uses = {i: [] for i in range(45)}
    for epoch in range(-(-V // k)):
        ids = []
        for rank in range(2):
            for worker in range(2):
                for b in epoch_batches(rank, epoch, worker, 2):
                    sid = b["sample_ids"].numpy()
                    ids += sid.tolist()
                    view = choose_views(SEED, sid, epoch, V, per_epoch=k)
                    assert torch.equal(b["view"], torch.from_numpy(view))
                    rows = np.array([row_of[i] for i in sid])[:, None]
                    for key in ("topk_values", "topk_indices", "view_params"):
                        assert np.array_equal(b[key].numpy(), plain[key][rows, view].astype(b[key].numpy().dtype))
                    np.testing.assert_allclose(as_target(b).logsumexp.numpy(), plain["logsumexp"][rows, view],
                                               rtol=1e-6)
                    assert torch.equal(b["x"], data.get_batch(sid)[0])  # the input once per sample
                    for i, v in zip(sid.tolist(), view.tolist()):
                        uses[i] += v
        assert sorted(ids) == list(range(45))
    assert all(sorted(u[:V]) == list(range(V)) for u in uses.values())  # every view before any repeats
    full = epoch_batches(0, 1, 0, 1)
    ds = SoftLabelDataset([(path, data)], batch_size=4, seed=SEED, rank=0, world_size=2, window_chunks=2,
                          views_per_sample=k)
    ds.set_epoch(1)
    rest = epoch_batches(0, 1, 0, 1, ds.state_dict(batches_done=2))
    assert len(rest) == len(full) - 2
    for g, w in zip(rest, full[2:]):
        assert g.keys() == w.keys() and all(_same(g[key], w[key]) for key in w)


def test_views_per_sample_1_is_the_default_batches(tmp_path):
    spec = make_images(tmp_path)
    path = tmp_path / "v.zarr"
    write_v2(path, spec, positions="views", layout="sampled")
    data = resolve_data(spec)
    for epoch in (0, 2):
        a, b = (SoftLabelDataset([(path, data)], batch_size=7, seed=SEED, **kw) for kw in ({}, {"views_per_sample": 1}))
        a.set_epoch(epoch), b.set_epoch(epoch)
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys() and all(_same(x[key], y[key]) for key in x)


def _same(a, b) -> bool:
    """Equal batch items: tensors element for element, a target's temperatures as numbers."""
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_views_per_sample_offline_equals_online_kd_and_resumes(tmp_path):
    """k = 2 views per input: the store's targets belong to the replayed views (the teacher in the loop on the
    same views trains the same weights, bit for bit), k = 1 trains what the default does, and a resumed run
    equals an uninterrupted one."""
    spec = make_images(tmp_path)
    store = tmp_path / "v.h5"
    write_v2(store, spec, positions="views", layout="dense", views=4)
    offline = _train(tmp_path, store, "off", epochs=2, views_per_sample=2)
    online = _train(tmp_path, store, "on", teacher=Teacher(), epochs=2, views_per_sample=2)
    assert all(torch.equal(offline[key], online[key]) for key in offline)
    one = _train(tmp_path, store, "one", epochs=2, views_per_sample=1)
    default = _train(tmp_path, store, "default", epochs=2)
    assert all(torch.equal(one[key], default[key]) for key in one)
    assert not all(torch.equal(one[key], offline[key]) for key in one)

    def crash(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, store, "b", epochs=2, on_epoch_end=crash, views_per_sample=2)
    resumed = _train(tmp_path, store, "b", epochs=2, resume=True, views_per_sample=2)
    assert all(torch.equal(offline[key], resumed[key]) for key in offline)
