"""Ensembles of teachers: combined targets against plain numpy, EnsembleStore, merge bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.errors import ConfigError, StoreMismatch
from softlabels.store.ensemble import (
    Combination,
    EnsembleStore,
    check_temperature,
    combine,
)
from softlabels.store.layouts import make_layout, to_numpy
from softlabels.store.positions import TokenPositions, UnitGeometry
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from tests.conftest import run_cli, write_store

C = 9


def _softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def _targets(layout: str, logits: list[np.ndarray], **params):
    lay = make_layout(layout, num_classes=logits[0].shape[1], **params)
    rows = torch.arange(len(logits[0]))
    out = []
    for z in logits:
        enc = lay.encode(torch.from_numpy(z), sample_ids=rows, positions=rows)
        out.append(lay.decode({k: to_numpy(v) for k, v in enc.items()}))
    return out


def _teachers(n=3, b=6, c=C, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((b, c)) * 2.5).astype(np.float32) for _ in range(n)]


# -- combined targets == direct computation ------------------------------------------------------
@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("weights", [None, (2.0, 1.0, 1.0)])
def test_dense_equals_numpy(t, weights):
    zs = _teachers()
    w = np.array(weights or (1, 1, 1), float)
    w /= w.sum()
    arith = combine(_targets("dense", zs), Combination("arithmetic", weights, t), C)
    want = sum(wi * _softmax(z.astype(float), t) for wi, z in zip(w, zs))
    np.testing.assert_allclose(_softmax(arith.logits.double().numpy(), t), want, atol=1e-6)
    geo = combine(_targets("dense", zs), Combination("geometric", weights, t), C)
    np.testing.assert_allclose(geo.logits.numpy(), sum(wi * z for wi, z in zip(w, zs)), atol=1e-5)
    for t2 in (1.0, 3.0):  # the geometric mean of the softened teachers, at every T
        g = np.exp(sum(wi * np.log(_softmax(z.astype(float), t2)) for wi, z in zip(w, zs)))
        np.testing.assert_allclose(_softmax(geo.logits.double().numpy(), t2), g / g.sum(-1, keepdims=True), atol=1e-6)


def _buckets_at(target, t: float) -> np.ndarray:
    """What the top-k losses see at T: the stored classes' probabilities (the tail is the rest)."""
    return target.bucket_log_probs(t, C, torch.float64).exp()[:, :-1].numpy()


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
@pytest.mark.parametrize("k,t", [(C, 2.0), (3, 1.0), (3, 2.0), (2, 4.0)])
def test_topk_equals_direct_computation(mode, k, t):
    zs = _teachers()
    w = np.array([0.5, 0.3, 0.2])
    got = combine(_targets("topk", zs, k=k, tail_temperatures=[1, 2, 4]), Combination(mode, tuple(w), t), C)
    tt = t if mode == "arithmetic" else 1.0
    # reference over all C classes: each teacher's bucket probabilities at tt, its tail spread evenly
    per = []
    for z in zs:
        z = z.astype(float)
        top = np.argsort(-z, 1, kind="stable")[:, :k]
        lse = np.log(np.exp(z).sum(-1))
        v = np.take_along_axis(z, top, 1)
        if k < C:  # the exact bucket probabilities of p at tt: the stored classes, and the rest as one
            pt = _softmax(z, tt)
            b = np.concatenate([np.take_along_axis(pt, top, 1), 1 - np.take_along_axis(pt, top, 1).sum(-1,
                                                                                              keepdims=True)], 1)
            p = np.repeat((b[:, -1] / (C - k))[:, None], C, 1)
        else:
            b = _softmax(v, tt)
            p = np.zeros_like(z)
        np.put_along_axis(p, top, b[:, :k], 1)
        per.append(p)
    if mode == "arithmetic":
        ref = sum(wi * p for wi, p in zip(w, per))
    else:
        g = np.exp(sum(wi * np.log(p) for wi, p in zip(w, per)))
        ref = g / g.sum(-1, keepdims=True)
    ids = got.ids.numpy()
    assert ids.shape[1] == min(3 * k, C) and all(len(set(r)) == len(r) for r in ids)
    union = [set(np.argsort(-z, 1, kind="stable")[r, :k]) for z in zs for r in range(len(z))]
    for r in range(len(ids)):  # the union of the teachers' ids is always kept
        assert set().union(*union[r::len(ids)]) <= set(ids[r])
    np.testing.assert_allclose(_buckets_at(got, tt), np.take_along_axis(ref, ids, 1), atol=2e-6)
    assert (np.diff(got.values.numpy(), axis=1) <= 0).all()  # descending, top1 first
    if k == C:  # nothing outside: equals the dense combination exactly
        dense = combine(_targets("dense", zs), Combination(mode, tuple(w), t), C)
        full = np.zeros((len(ids), C))
        np.put_along_axis(full, ids, _buckets_at(got, tt), 1)  # a combined target answers the T it was made at
        np.testing.assert_allclose(full, _softmax(dense.logits.double().numpy(), tt), atol=2e-6)


@pytest.mark.parametrize("weights", [None, (2, 1, 1)])
def test_sampled_pools_draws(weights):
    zs = _teachers()
    ts = _targets("sampled", zs, samples=16, seed=3)
    got = combine(ts, Combination("arithmetic", weights, 1.0), C)
    m = np.array(weights or (1, 1, 1))
    w = m / m.sum()
    assert got.counts.shape[1] == 16 * m.sum()
    for r in range(len(zs[0])):
        counts, mix = {}, np.zeros(C)
        for wi, mi, t, z in zip(w, m, ts, zs):
            ok = t.counts[r].numpy() > 0
            ids = t.ids[r].numpy()[ok]
            for i, c in zip(ids, t.counts[r].numpy()[ok]):
                counts[int(i)] = counts.get(int(i), 0) + int(c) * int(mi)
            p = _softmax(z[r].astype(float))
            rest = np.setdiff1d(np.arange(C), ids)
            q = np.zeros(C)
            q[ids] = p[ids]
            q[rest] = (1 - p[ids].sum()) / len(rest) if len(rest) else 0
            mix += wi * q
        ok = got.counts[r].numpy() > 0
        gi, gc = got.ids[r].numpy()[ok], got.counts[r].numpy()[ok]
        assert dict(zip(gi.tolist(), gc.tolist())) == counts
        assert list(gc) == sorted(gc, reverse=True)
        np.testing.assert_allclose(got.logits[r].numpy()[ok], np.log(mix[gi]), atol=1e-5)
        assert (got.counts[r].numpy()[~ok] == 0).all() and (got.logits[r].numpy()[~ok] == 0).all()


def test_refusals_in_the_library():
    ts = _targets("sampled", _teachers(), samples=4)
    with pytest.raises(ConfigError, match="geometric mean has no estimator"):
        Combination("geometric").check(3, "sampled")
    with pytest.raises(ConfigError, match="whole numbers"):
        Combination("arithmetic", (1.5, 1, 1)).check(3, "sampled")
    with pytest.raises(ConfigError, match="temperature 1 only"):
        Combination("arithmetic", None, 2.0).check(3, "sampled")
    with pytest.raises(ConfigError, match="one layout"):
        combine([ts[0], _targets("dense", _teachers())[0]], Combination(), C)
    meta = type("M", (), {"teacher": {"ensemble": {"mode": "arithmetic", "temperature": 4.0}}})()
    check_temperature(meta, 4.0, "m")
    with pytest.raises(ConfigError, match="combined at T = 4 and answers only that T exactly, not T = 2"):
        check_temperature(meta, 2.0, "m")


# -- stores ---------------------------------------------------------------------------------------
def _v2(path: Path, positions: str, layout: str, z: np.ndarray, *, n: int, params: dict, chunk: int = 4,
        lengths=None, views: int = 2, per_sample: dict | None = None) -> Path:
    g = UnitGeometry(n, chunk, 1, 1)
    extra = {}
    if positions == "views":
        extra["views"] = {"count": views, "param_names": ["top", "flip"], "augment": "crop(8)+flip", "seed": 0}
    if positions == "tokens":
        extra["tokens"] = TokenPositions(g, lengths, chunk_positions=4).to_attrs()["tokens"]
    meta = StoreMetaV2(positions=positions, layout=layout, num_samples=n, num_classes=z.shape[1], chunk_samples=chunk,
                       layout_params=params, **extra)
    lay = meta.layout_obj()
    rows = torch.arange(len(z))
    enc = lay.encode(torch.from_numpy(z), sample_ids=rows, positions=rows)
    lead = (n, views) if positions == "views" else (len(z),)
    arrays = {k: to_numpy(v).reshape(*lead, *lay.arrays()[k].shape) for k, v in enc.items()}
    with UnitWriter.create(path, meta, lengths=lengths) as w:
        w.write(0, **arrays, **per_sample)
    return path


def _stores(tmp: Path, positions: str, layout: str, params: dict, n: int = 10, teachers: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, n) if positions == "tokens" else None
    rows = {"sample": n, "views": 2 * n, "tokens": int(lengths.sum()) if lengths is not None else 0}[positions]
    per_sample = {"labels": rng.integers(-1, C, n), "sample_ids": rng.permutation(n)}
    if positions == "views":
        per_sample["view_params"] = rng.integers(0, 3, (n, 2, 2)).astype(np.float32)
    zs = [(rng.standard_normal((rows, C)) * 2).astype(np.float32) for _ in range(teachers)]
    paths = [_v2(tmp / f"t{i}.zarr", positions, layout, z, n=n, params=params, lengths=lengths, per_sample=per_sample)
             for i, z in enumerate(zs)]
    return paths, zs, per_sample


CASES = [("sample", "dense", {}), ("views", "topk", {"k": 3, "tail_temperatures": [1.0, 3.0]}),
         ("tokens", "sampled", {"samples": 6, "seed": 1}), ("views", "dense", {}),
         ("tokens", "topk", {"k": 2, "tail_temperatures": [1.0, 3.0]}),
         ("sample", "sampled", {"samples": 4, "seed": 0})]


@pytest.mark.parametrize("positions,layout,params", CASES)
def test_ensemble_store_combines_each_unit_and_merge_is_bit_identical(tmp_path, positions, layout, params):
    paths, zs, per_sample = _stores(tmp_path, positions, layout, params)
    mode, t = ("arithmetic", 1.0) if layout == "sampled" else ("geometric", 1.0) if positions == "views" \
        else ("arithmetic", 3.0)
    ens = EnsembleStore(paths, mode=mode, temperature=t)
    assert len(ens) == 10 and ens.meta.num_units == 3 and ens.missing_units() == []
    members = [UnitStore(p) for p in paths]
    lay = ens.meta.layout_obj()
    for u in range(ens.meta.num_units):
        block = ens.read_unit(u)
        for k in ("labels", "sample_ids", "view_params", "offsets", "lengths"):
            if k in per_sample or k in block:
                np.testing.assert_array_equal(block[k], members[0].read_unit(u)[k])
        # the same as combining the members' decoded targets directly
        tg = []
        for m in members:
            mb, ml = m.read_unit(u), m.meta.layout_obj()
            tg.append(ml.decode({k: mb[k].reshape(-1, *spec.shape) for k, spec in ml.arrays().items()}))
        want = combine(tg, Combination(mode, None, t), C)
        got = lay.decode({k: block[k].reshape(-1, *spec.shape) for k, spec in lay.arrays().items()})
        for f in want.__dataclass_fields__:
            if not isinstance(getattr(want, f), torch.Tensor):  # the temperatures the target answers
                assert getattr(got, f) == getattr(want, f)
                continue
            np.testing.assert_array_equal(getattr(got, f).numpy(), getattr(want, f).numpy().astype(
                getattr(got, f).numpy().dtype))
    out = tmp_path / "merged.h5"
    args = ["merge", *[x for p in paths for x in ("--store", str(p))], "--out", str(out), "--mode", mode,
            "--temperature", str(t)]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    merged = UnitStore(out)
    assert merged.meta.layout == ens.meta.layout and merged.meta.layout_params == ens.meta.layout_params
    assert merged.meta.teacher == ens.meta.teacher and merged.verify() == []
    for u in range(ens.meta.num_units):
        a, b = merged.read_unit(u), ens.read_unit(u)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_a_version_1_and_a_version_2_store_and_dense_values(tmp_path):
    from _v1stores import write_v1

    rng = np.random.default_rng(1)
    ids, labels = rng.permutation(20), rng.integers(-1, C, 20)
    zs = [(rng.standard_normal((20, C)) * 2).astype(np.float32) for _ in range(2)]
    paths = [write(tmp_path / f"s{i}.h5", {"logits": z, "labels": labels, "sample_ids": ids}, num_classes=C)
             for i, (write, z) in enumerate(zip((write_v1, write_store), zs))]
    ens = EnsembleStore(paths, weights=(3, 1), temperature=2.0)
    got = np.concatenate([ens.read_unit(u)["logits"] for u in range(ens.meta.num_units)])
    want = 0.75 * _softmax(zs[0].astype(float), 2) + 0.25 * _softmax(zs[1].astype(float), 2)
    np.testing.assert_allclose(_softmax(got.astype(float), 2), want, atol=1e-6)
    assert ens.meta.teacher["ensemble"]["weights"] == [0.75, 0.25]


def test_stores_of_other_data_are_refused_by_name(tmp_path):
    paths, _, _ = _stores(tmp_path, "sample", "dense", {})
    rng = np.random.default_rng(5)
    other = _v2(tmp_path / "other.zarr", "sample", "dense", rng.standard_normal((10, C)).astype(np.float32), n=10,
                params={}, per_sample={"labels": rng.integers(0, C, 10), "sample_ids": np.arange(10)})
    with pytest.raises(StoreMismatch, match="hold different sample ids"):
        EnsembleStore([paths[0], other])


@pytest.mark.parametrize("positions,layout,params", [CASES[2], CASES[1]])
def test_producer_pieces_cut_across_units_write_the_same_store(tmp_path, positions, layout, params):
    """The runner hands a producer spans cut anywhere; the pieces must write the same bytes."""
    from softlabels.teacher.producer import StoreProducer

    paths, _, _ = _stores(tmp_path, positions, layout, params)
    ens = EnsembleStore(paths, temperature=1.0)
    producer = StoreProducer(ens, ens.meta)
    with UnitWriter.create(tmp_path / "pieces.zarr", producer.meta(), lengths=producer.lengths()) as w:
        for start, arrays in producer.batches([(0, 3), (3, 7), (7, 10)]):
            w.write(start, **arrays)
    out = UnitStore(tmp_path / "pieces.zarr")
    for u in range(ens.meta.num_units):
        a, b = out.read_unit(u), ens.read_unit(u)
        assert all(a[k].tobytes() == b[k].tobytes() for k in b)


def test_config_modes_are_the_library_modes():
    from softlabels.store.ensemble import MODES
    from softlabels.teacher.config import ENSEMBLE_MODES

    assert ENSEMBLE_MODES == MODES


def test_train_distils_from_an_ensemble(tmp_path):
    """``train --ensemble`` hands an EnsembleStore to the dataset as its store (needs the format-2 reader)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((24, 5)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    paths = [write_store(tmp_path / f"t{i}.h5", {"logits": rng.standard_normal((24, 3)).astype(np.float32),
                                                 "labels": y, "sample_ids": np.arange(24)}, num_classes=3)
             for i in range(2)]
    r = run_cli("train", "--student", "linear", "--ensemble", str(paths[0]), "--ensemble", str(paths[1]),
                "--data", str(tmp_path / "d.npz"), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
