"""The library seam: with_targets + collate + kd_loss in a user's own loop, checked against plain reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import softlabels as sl
from softlabels.errors import ConfigError, DataError, FingerprintMismatch, ModelMismatch
from softlabels.store.layouts import decode_ids
from tests.conftest import read_plain

N, C = 50, 10
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("lib")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 12)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int64)
    np.savez(d / "data.npz", x=x, y=y)
    out = {"x": x, "y": y, "dir": d}
    for layout, kw in {"dense": {}, "topk": {"topk": 3}, "sampled": {"samples": 6}}.items():
        out[layout] = str(d / f"{layout}.h5")
        sl.generate(teacher="mlp", data=str(d / "data.npz"), out=out[layout], random_teacher=True, layout=layout,
                    chunk_rows=16, num_classes=C, progress=False, **kw)
    return out


def _user(stores):
    return TensorDataset(torch.from_numpy(stores["x"]), torch.from_numpy(stores["y"]))


def _plain(path, i):
    """Sample id i's stored arrays, read with h5py alone."""
    arrays, _ = read_plain(Path(path))
    row = int(np.flatnonzero(arrays["sample_ids"] == i)[0])
    return {k: v[row] for k, v in arrays.items() if len(v) == N}


@pytest.mark.parametrize("layout", ["dense", "topk", "sampled"])
def test_items_are_the_users_and_targets_the_stored_rows(stores, layout):
    ds = sl.with_targets(_user(stores), stores[layout])
    for i in (0, 17, N - 1):
        (x, y), t = ds[i]
        assert torch.equal(x, torch.from_numpy(stores["x"][i])) and int(y) == stores["y"][i]
        plain = _plain(stores[layout], i)
        if layout == "dense":
            np.testing.assert_array_equal(t.logits.numpy(), plain["logits"])
        elif layout == "topk":
            np.testing.assert_array_equal(t.values.numpy(), plain["topk_values"])
            np.testing.assert_array_equal(t.ids.numpy(), decode_ids(plain["topk_indices"]).numpy())
        else:
            np.testing.assert_array_equal(t.counts.numpy(), plain["sampled_counts"].astype(np.int32))
            np.testing.assert_array_equal(t.logsumexp.numpy(), plain["logsumexp"])


def test_dataloader_with_workers_shuffle_and_a_distributed_sampler(stores):
    ds = sl.with_targets(_user(stores), stores["dense"])
    logits = read_plain(Path(stores["dense"]))[0]
    by_id = dict(zip(read_plain(Path(stores["dense"]))[0]["sample_ids"].tolist(), logits["logits"]))
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, collate_fn=sl.collate)
        for (x, y), t in loader:
            assert isinstance(t, sl.DenseTarget) and t.logits.shape == (len(x), C)
            for xi, ti in zip(x, t.logits):
                i = int(np.flatnonzero((stores["x"] == xi.numpy()).all(1))[0])
                np.testing.assert_array_equal(ti.numpy(), by_id[i])
                seen.append(i)
    assert sorted(set(seen)) == list(range(N))
    assert len(seen) == N


def test_ids_by_column_function_and_hf_datasets(stores):
    datasets = pytest.importorskip("datasets")
    order = np.arange(N)[::-1].copy()
    rows = [{"x": stores["x"][i], "id": int(i), "label": int(stores["y"][i])} for i in order]
    hf = datasets.Dataset.from_list(rows).with_format("torch")
    by_col = sl.with_targets(hf, stores["dense"], ids="id")
    by_fn = sl.with_targets(rows, stores["dense"], ids=lambda i: int(order[i]))
    plain = _plain(stores["dense"], int(order[5]))["logits"]
    np.testing.assert_array_equal(by_col[5][1].logits.numpy(), plain)
    np.testing.assert_array_equal(by_fn[5][1].logits.numpy(), plain)
    batch, t = sl.collate([by_col[i] for i in range(4)])
    assert batch["x"].shape == (4, 12) and t.logits.shape == (4, C)


def test_refusals_name_the_argument(stores):
    user = _user(stores)
    with pytest.raises(DataError, match=r"dataset= has 49 items but .* holds 50 samples; .*ids="):
        sl.with_targets(torch.utils.data.Subset(user, range(49)), stores["dense"])
    with pytest.raises(DataError, match=r"2 of the dataset's 3 sample ids are not in .*first: id 50 of item 1"):
        sl.with_targets([user[0]] * 3, stores["dense"], ids=[0, 50, 99])
    swapped = TensorDataset(torch.from_numpy(stores["x"]), torch.from_numpy((stores["y"] + 1) % C))
    with pytest.raises(FingerprintMismatch, match="item 0 of dataset= has label"):
        sl.with_targets(swapped, stores["dense"])
    other = sl.resolve_data(str(stores["dir"] / "data.npz"))
    sl.with_targets(other, stores["dense"])  # its own InputDataset: the fingerprint matches
    np.savez(stores["dir"] / "other.npz", x=stores["x"] + 1, y=stores["y"])
    with pytest.raises(FingerprintMismatch, match="is not the data"):
        sl.with_targets(sl.resolve_data(str(stores["dir"] / "other.npz")), stores["dense"])
    with pytest.raises(ConfigError, match="view_transform= is for views stores"):
        sl.with_targets(user, stores["dense"], view_transform="replay")


def _batch(stores, layout, n=8):
    ds = sl.with_targets(_user(stores), stores[layout])
    return sl.collate([ds[i] for i in range(n)])


def test_kd_loss_is_the_papers_formula(stores):
    (x, y), t = _batch(stores, "dense")
    s = torch.randn(len(x), C, requires_grad=True)
    temp, alpha = 2.0, 0.3
    p = F.softmax(t.logits / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    want = alpha * F.cross_entropy(s, y) + (1 - alpha) * kl
    got = sl.kd_loss(s, t, temperature=temp, alpha=alpha, labels=y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sl.KDLoss(temperature=temp, alpha=alpha)(s, t, y), want)
    torch.testing.assert_close(sl.kl_loss(s, t, temperature=temp), kl)
    torch.testing.assert_close(t.probs(temp), p)


def test_the_cli_trainers_loss_equals_the_librarys_on_one_batch(stores):
    """softlabels train's classifier loss (DistillationLoss on a SoftLabelDataset batch) vs kd_loss."""
    from softlabels.student.losses import DistillationLoss, make_soft_loss

    for layout, loss in (("dense", "kl"), ("topk", "topk_kl"), ("sampled", "sampled_kl"), ("topk", "jsd")):
        data = sl.resolve_data(str(stores["dir"] / "data.npz"))
        batch = next(iter(sl.SoftLabelDataset([(stores[layout], data)], batch_size=16, seed=0, shuffle=False)))
        ids = batch["sample_ids"].numpy()
        mine = sl.with_targets(_user(stores), stores[layout])
        (x, y), t = sl.collate([mine[int(i)] for i in ids])
        assert torch.equal(x, batch["x"]) and torch.equal(y[batch["labels"] >= 0], batch["labels"][batch["labels"] >= 0])
        s = torch.randn(len(ids), C)
        temp = 2.0 if layout == "dense" else 1.0  # a sparse store answers the temperatures it records
        cli = DistillationLoss(make_soft_loss(loss, temp), 0.5)(s, batch)
        lib = sl.kd_loss(s, t, temperature=temp, loss=loss, alpha=0.5, labels=batch["labels"])
        torch.testing.assert_close(lib, cli, rtol=0, atol=0)


def test_loss_refusals_name_python_arguments(stores):
    (_, y), t = _batch(stores, "topk")
    s = torch.randn(len(y), C)
    with pytest.raises(ConfigError, match=r"loss='kl' does not take TopKTarget targets; pass loss='topk_kl'"):
        sl.kd_loss(s, t, temperature=2, loss="kl")
    with pytest.raises(ConfigError, match=r"temperature must be a finite number > 0, got 0; pass e.g. temperature=2"):
        sl.kd_loss(s, t, temperature=0)
    with pytest.raises(ConfigError, match=r"alpha=0.5 mixes in the hard-label cross-entropy; pass labels="):
        sl.kd_loss(s, t, temperature=2, alpha=0.5)
    with pytest.raises(ConfigError, match=r"not T = 3; pass temperature=1, 2 or 4, or regenerate it with"):
        t.probs(3.0)
    with pytest.raises(ModelMismatch, match=r"student_logits= has shape"):
        sl.kd_loss(s[None], t, temperature=2)
    torch.testing.assert_close(t.probs(1.0), t.log_probs().exp())


def test_probs_are_the_dense_teachers_at_every_temperature_the_target_answers(stores):
    """probs(T) of a top-k (each T of its tail grid) or sampled (its draw T) target is softmax(z / T) of the
    same teacher's dense logits at the stored ids; any other T is refused, never answered at another T."""
    _, dense = _batch(stores, "dense")
    _, topk = _batch(stores, "topk")
    _, sampled = _batch(stores, "sampled")
    for temp in topk.temperatures:
        want = F.softmax(dense.logits.float() / temp, -1).gather(1, topk.ids)
        torch.testing.assert_close(topk.probs(temp), want, rtol=0, atol=2e-3)
    want = F.softmax(dense.logits.float() / sampled.temperature, -1).gather(1, sampled.ids) * sampled.valid
    torch.testing.assert_close(sampled.probs(), want, rtol=0, atol=2e-3)
    hot = dataclasses.replace(sampled, temperature=2.0)  # the same draws, said to be at T = 2
    with pytest.raises(ConfigError, match=r"this sampled target was drawn at T = 2 .* not T = 1; pass temperature=2"):
        hot.probs(1.0)


def test_labels_and_class_counts_are_checked_as_class_ids(stores):
    """uint8 labels are class ids (not wrapped at 256); a student whose width is not the store's C is refused
    even when a batch's stored ids happen to fit it."""
    (_, y), t = _batch(stores, "topk")
    s = torch.randn(len(y), C)
    torch.testing.assert_close(sl.kd_loss(s, t, temperature=1, alpha=0.5, labels=y.to(torch.uint8)),
                               sl.kd_loss(s, t, temperature=1, alpha=0.5, labels=y))
    assert t.num_classes == C
    narrow = dataclasses.replace(t, ids=t.ids.clamp(max=1))  # ids a 2-class student could index
    for width in (2, C + 3):
        with pytest.raises(ModelMismatch, match=rf"targets= come from a store of {C} classes but student_logits= "
                                                rf"has {width}"):
            sl.kd_loss(torch.randn(len(y), width), narrow, temperature=1)


def test_views_hand_the_transform_the_stored_parameters(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((20, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "img.npz", x=x, y=rng.integers(0, 4, 20))
    store = str(tmp_path / "views.h5")
    sl.generate(teacher="mlp", data=str(tmp_path / "img.npz"), out=store, random_teacher=True, views=3,
                augment="flip", layout="dense", num_classes=4, progress=False)
    user = TensorDataset(torch.from_numpy(x))
    with pytest.raises(ConfigError, match="holds 3 augmented views per sample"):
        sl.with_targets(user, store)
    got = []
    ds = sl.with_targets(user, store, view_transform=lambda item, params: (got.append(params), item)[1], epoch=2)
    arrays, _ = read_plain(Path(store))
    from softlabels.store.positions.views import choose_views

    for i in (0, 7):
        _, t = ds[i]
        row = int(np.flatnonzero(arrays["sample_ids"] == i)[0])
        v = int(choose_views(ds.store.positions.seed, np.array([i]), 2, 3)[0])
        assert got[-1] == dict(zip(ds.store.positions.param_names, arrays["view_params"][row, v].astype(float)))
        np.testing.assert_array_equal(t.logits.numpy(), arrays["logits"][row, v])
        replayed = sl.with_targets(user, store, view_transform="replay", epoch=2)
        (flipped,), _ = replayed[i]
        want = x[i][..., ::-1] if next(iter(got[-1].values())) else x[i]
        np.testing.assert_array_equal(flipped.numpy(), want)
        ((batch,), t2) = sl.collate(replayed.__getitems__([5, i]))
        np.testing.assert_array_equal(batch[1].numpy(), want)
        np.testing.assert_array_equal(t2.logits[1].numpy(), arrays["logits"][row, v])


def test_token_targets_align_with_input_ids(tmp_path):
    from tests._lmstore import (
        ragged_data,
        teacher_logits,
        tiny_teacher,
        write_token_store,
    )

    _, data = ragged_data(tmp_path / "tok.npz", [5, 3, 7, 4], vocab=11)
    teacher = tiny_teacher(11, 8)
    store = write_token_store(tmp_path / "tok.h5", teacher, data, "dense")
    seqs = [{"input_ids": data.get_batch(np.array([i])).ids[0]} for i in range(4)]
    ds = sl.with_targets(seqs, store)
    item, t = ds[2]
    assert item is seqs[2]  # the user's item, unchanged
    torch.testing.assert_close(t.logits.float(), teacher_logits(teacher, data, 2))
    pad = [{"input_ids": F.pad(s["input_ids"], (0, 7 - len(s["input_ids"])))} for s in seqs]
    lengths = [5, 3, 7, 4]
    batch, targets = sl.collate([(p, ds[i][1]) for i, p in enumerate(pad)])
    assert isinstance(targets, sl.TokenTargets) and targets.lengths.tolist() == lengths
    assert batch["input_ids"].shape == (4, 7)
    logits = torch.randn(4, 7, 11)
    want, count = 0.0, 0
    for b, n in enumerate(lengths):  # mean over positions whose next token is in the sequence
        tl = teacher_logits(teacher, data, b)[: n - 1]
        want += F.kl_div(F.log_softmax(logits[b, : n - 1], -1), F.log_softmax(tl, -1), log_target=True,
                         reduction="sum")
        count += n - 1
    torch.testing.assert_close(sl.kd_loss(logits, targets, temperature=1.0), want / count, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="item 1 of dataset= has 4 tokens but .* holds 3 positions"):
        sl.with_targets([seqs[0], {"input_ids": torch.zeros(4, dtype=torch.long)}, *seqs[2:]], store)[1]
    with pytest.raises(ModelMismatch, match="student_logits= has 6 positions per sequence but the store holds 7"):
        sl.kd_loss(logits[:, :6], targets, temperature=1.0)


@pytest.mark.parametrize("cache_mib", [256, 1e-6])  # the whole store in memory, or one unit at a time
def test_batched_fetch_equals_item_by_item(stores, cache_mib):
    ds = sl.with_targets(_user(stores), stores["topk"], cache_mib=cache_mib)
    order = [int(i) for i in np.random.default_rng(5).permutation(N)[:20]]
    (x, y), t = sl.collate(ds.__getitems__(order))
    (x1, y1), t1 = sl.collate([ds[i] for i in order])
    assert torch.equal(x, x1) and torch.equal(y, y1)
    for a, b in zip((t.values, t.ids, t.logsumexp), (t1.values, t1.ids, t1.logsumexp)):
        assert torch.equal(a, b)
    pairs = ds.__getitems__(order)
    assert torch.equal(pairs[3][1].ids, ds[order[3]][1].ids)  # any collate_fn sees the same pairs


def test_every_public_name_is_documented():
    """Each name softlabels exports from the library seam has a docstring and a place in docs/LIBRARY.md."""
    from softlabels.library import batches, losses, pairing

    page = (Path(__file__).resolve().parents[1] / "docs" / "LIBRARY.md").read_text()
    names = [*pairing.__all__, *batches.__all__, *losses.__all__, "DenseTarget", "TopKTarget", "SampledTarget"]
    for name in names:
        obj = getattr(sl, name)
        assert name in sl.__all__ and (obj.__doc__ or "").strip(), name
        assert f"`{name}" in page, f"docs/LIBRARY.md does not mention {name}"
    for cls in (sl.DenseTarget, sl.TopKTarget, sl.SampledTarget, sl.TokenTargets):
        assert cls.probs.__doc__ and cls.to.__doc__
    assert "with_targets" in (sl.__doc__ or "")  # help(softlabels) points at the seam


def test_the_cli_lm_loss_equals_the_librarys_on_one_batch(tmp_path):
    """softlabels train's language-model loss (lm_loss on a SoftLabelDataset batch) vs kd_loss on token targets."""
    from softlabels.student.kinds.tokens import lm_loss
    from softlabels.student.losses import make_soft_loss
    from tests._lmstore import ragged_data, tiny_teacher, write_token_store

    _, data = ragged_data(tmp_path / "tok.npz", [5, 3, 7, 4, 6], vocab=13)
    store = write_token_store(tmp_path / "tok.h5", tiny_teacher(13, 8), data, "topk")
    batch = next(iter(sl.SoftLabelDataset([(store, data)], batch_size=5, seed=0, shuffle=False)))
    b, seq = batch["ids"].shape
    logits = torch.randn(b, seq, 13)
    cli, _, _ = lm_loss(logits, batch, make_soft_loss("topk_kl", 1.0), 0.5)
    cli = cli / batch["loss_mask"].sum()
    seqs = [{"input_ids": data.get_batch(np.array([i])).ids[0]} for i in range(5)]
    mine = sl.with_targets(seqs, store)
    pairs = [mine[int(i)] for i in batch["sample_ids"]]
    _, targets = sl.collate([({"n": len(p["input_ids"])}, t) for p, t in pairs])
    labels = torch.full((b, seq), -100)
    for row, (p, _) in enumerate(pairs):
        labels[row, : len(p["input_ids"])] = p["input_ids"]
    lib = sl.kd_loss(logits, targets, temperature=1.0, loss="topk_kl", alpha=0.5, labels=labels)
    torch.testing.assert_close(lib, cli, rtol=1e-6, atol=1e-7)


def test_views_replay_in_spawned_workers(tmp_path):
    """The pairing (store, replay) pickles: workers started with spawn give what the main process gives."""
    x = np.random.default_rng(3).random((16, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(16) % 4)
    store = str(tmp_path / "views.h5")
    sl.generate(teacher="mlp", data=str(tmp_path / "img.npz"), out=store, random_teacher=True, views=2,
                augment="crop(6,padding=1)+flip", layout="dense", num_classes=4, progress=False)
    ds = sl.with_targets(TensorDataset(torch.from_numpy(x)), store, view_transform="replay", epoch=1)
    spawned = DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="spawn", collate_fn=sl.collate)
    here = DataLoader(ds, batch_size=8, collate_fn=sl.collate)
    for ((a,), ta), ((b,), tb) in zip(spawned, here):
        assert torch.equal(a, b) and torch.equal(ta.logits, tb.logits)


def test_a_format_1_store_pairs_alike(tmp_path):
    from tests._v1stores import write_v1
    from tests.conftest import make_rows

    rows = make_rows(20, 5)
    write_v1(tmp_path / "v1.h5", rows, num_classes=5)
    ds = sl.with_targets(list(range(20)), tmp_path / "v1.h5")
    _, t = sl.collate(ds.__getitems__([3, 7, 1]))
    want = [rows["logits"][int(np.flatnonzero(rows["sample_ids"] == i)[0])] for i in (3, 7, 1)]
    np.testing.assert_array_equal(t.logits.numpy(), np.stack(want))
