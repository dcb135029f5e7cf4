"""Language-model students from token stores: batches, losses, masking, torchrun, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from softlabels.inputs.loader import batch_loader
from softlabels.store.layouts import make_layout
from softlabels.store.reader import UnitStore
from softlabels.student.config import TrainConfig
from softlabels.student.dataset import SoftLabelDataset
from softlabels.student.kinds.tokens import lm_loss
from softlabels.student.losses import as_target, make_soft_loss
from softlabels.student.trainer import train
from tests._lmstore import (
    PARAMS,
    ragged_data,
    teacher_logits,
    tiny_teacher,
    write_token_store,
)

V = 40
LENGTHS = [5, 1, 9, 3, 7, 2, 8, 4, 6]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    spec, data = ragged_data(tmp / "d.npz", LENGTHS, V, mask=True)
    teacher = tiny_teacher(V, 16)
    return {"spec": spec, "data": data, "teacher": teacher,
            **{layout: write_token_store(tmp / f"{layout}.h5", teacher, data, layout, spec=spec)
               for layout in ("dense", "topk", "sampled")},
            "sampled-zarr": write_token_store(tmp / "sampled.zarr", teacher, data, "sampled", spec=spec,
                                              chunk_samples=3, chunk_positions=4)}


def _plain(path: str, layout: str, sample: int) -> dict[str, np.ndarray]:
    """One sequence's stored arrays, read with h5py or zarr alone."""
    names = make_layout(layout, num_classes=V, **PARAMS[layout]).arrays()
    if path.endswith(".zarr"):
        g = zarr.open_group(path, mode="r")
        a, n = int(g["offsets"][sample]), int(g["lengths"][sample])
        return {k: np.asarray(g[k][a:a + n]) for k in names}
    with h5py.File(path, "r") as f:
        a = int(f["offsets"][sample])
        n = int(f["lengths"][sample])
        return {k: f[k][a:a + n] for k in names}


@pytest.mark.parametrize("name, batch_size, window", [("dense", 4, None), ("topk", 4, None), ("sampled", 4, None),
                                                      ("sampled-zarr", 4, None), ("sampled-zarr", 2, 1),
                                                      ("sampled-zarr", 1, 1)])
def test_batches_equal_plain_reads(stores, name, batch_size, window):
    """Every batch against h5py/zarr reads; batches are built in groups (window 1: a group stops at 2 units)."""
    layout = name.removesuffix("-zarr")
    ds = SoftLabelDataset([(UnitStore(stores[name]), stores["data"])], batch_size=batch_size, seed=1,
                          window_chunks=window)
    lay = make_layout(layout, num_classes=V, **PARAMS[layout])
    seen, count = [], 0
    for batch in ds:
        count += 1
        target = as_target(batch)
        width = batch["ids"].shape[1]
        start = 0
        for b, (sid, n) in enumerate(zip(batch["sample_ids"].tolist(), batch["lengths"].tolist())):
            seen.append(sid)
            tokens = stores["data"].get_batch(np.array([sid]))
            assert torch.equal(batch["ids"][b, :n], tokens.ids[0])
            assert (batch["ids"][b, n:] == 0).all()
            want = lay.decode(_plain(stores[name], layout, sid))
            for field in target.__dataclass_fields__:
                if field == "num_classes":  # the store's C, carried by a decoded target for the library's check
                    assert want.num_classes == lay.num_classes
                    continue
                got, exp = getattr(target, field), getattr(want, field)
                if isinstance(exp, torch.Tensor):
                    assert torch.equal(got[start:start + n], exp)
                else:  # the temperatures the target answers
                    assert got == exp
            assert batch["index"][start:start + n].tolist() == [b * width + t for t in range(n)]
            # position t counts iff t + 1 < n and token t + 1 is a target
            m = tokens.mask[0]
            assert batch["loss_mask"][b, :n].tolist() == [t + 1 < n and bool(m[t + 1]) for t in range(n)]
            assert batch["targets"][b, :n - 1][batch["loss_mask"][b, :n - 1]].tolist() == \
                tokens.ids[0, 1:][batch["loss_mask"][b, :n - 1]].tolist()
            start += n
        assert len(batch["index"]) == start == len(target)
    assert sorted(seen) == list(range(len(LENGTHS)))
    assert count == len(ds)


def test_ranks_and_workers_cover_each_epoch_and_equal_one_process(stores):
    store = stores["topk"]
    one = SoftLabelDataset([(UnitStore(store), stores["data"])], batch_size=4, seed=5, world_size=1, rank=0)
    one.set_epoch(2)
    whole = [b["sample_ids"].tolist() for b in one]
    halves = []
    for rank in (0, 1):
        ds = SoftLabelDataset([(UnitStore(store), stores["data"])], batch_size=2, seed=5, world_size=2, rank=rank)
        ds.set_epoch(2)
        got = [b["sample_ids"].tolist() for b in batch_loader(ds, num_workers=2)]
        assert len(got) == len(ds) == len(whole)
        halves.append(got)
    assert [a + b for a, b in zip(*halves)] == whole  # the global batches of one process, in order
    assert sorted(sum(whole, [])) == list(range(len(LENGTHS)))
    # resume after 1 batch continues the same order
    ds = SoftLabelDataset([(UnitStore(store), stores["data"])], batch_size=2, seed=5, world_size=2, rank=1)
    ds.load_state_dict({"epoch": 2, "seed": 5, "batches_done": 1})
    assert [b["sample_ids"].tolist() for b in batch_loader(ds, num_workers=2)] == halves[1][1:]


def _by_hand(layout, s, target, labels, alpha, t):
    """Dense reference: per-position CE and T^2 * forward KL over all V classes, summed."""
    ce = F.cross_entropy(s.double(), labels, reduction="sum")
    lq = torch.log_softmax(s.double() / t, -1)
    if layout == "dense":
        lp = torch.log_softmax(target.logits.double() / t, -1)
        soft = (lp.exp() * (lp - lq)).sum()
    elif layout == "topk":  # the K stored classes plus one tail bucket, at T = 1
        lp_k = target.values.double() - target.logsumexp.double()[:, None]
        lq_k = lq.gather(1, target.ids)
        tp, tq = 1 - lp_k.exp().sum(-1), 1 - lq_k.exp().sum(-1)
        soft = ((lp_k.exp() * (lp_k - lq_k)).sum(-1) + tp * (tp.log() - tq.log())).sum()
    else:  # sum_j c_j / S (log p_j - log q_j)
        lp_j = target.logits.double() - target.logsumexp.double()[:, None]
        w = target.counts.double() / target.counts.sum(-1, keepdim=True)
        soft = (w * (lp_j - lq.gather(1, target.ids))).masked_fill(target.counts == 0, 0).sum()
    return alpha * ce + (1 - alpha) * t * t * soft


@pytest.mark.parametrize("layout", ["dense", "topk", "sampled"])
def test_loss_equals_dense_reference_and_masked_positions_get_no_gradient(stores, layout):
    ds = SoftLabelDataset([(UnitStore(stores[layout]), stores["data"])], batch_size=5, shuffle=False)
    batch = next(iter(ds))
    torch.manual_seed(0)
    logits = torch.randn(*batch["ids"].shape, V, dtype=torch.float64, requires_grad=True)
    t = 2.0 if layout == "dense" else 1.0  # the sparse references below are their T = 1 forms
    soft = make_soft_loss(make_layout(layout, num_classes=V, **PARAMS[layout]).default_loss, t)
    total, hard, _ = lm_loss(logits, batch, soft, 0.3)
    keep = batch["loss_mask"].reshape(-1)
    rows = torch.nonzero(keep).reshape(-1)
    target = as_target(batch)
    real = batch["loss_mask"].reshape(-1)[batch["index"]]
    sub = target.select(real)
    s = logits.reshape(-1, V)[rows]
    want = _by_hand(layout, s, sub, batch["targets"].reshape(-1)[rows], 0.3, t)
    assert math.isclose(total.item(), want.item(), rel_tol=1e-9, abs_tol=1e-9)
    total.backward()
    grad = logits.grad.reshape(-1, V)
    assert (grad[~keep] == 0).all() and (grad[keep].abs().sum(-1) > 0).all()
    # masked positions contribute exactly nothing: changing their logits leaves the loss as it is
    other = logits.detach().clone().reshape(-1, V)
    other[~keep] = 1e3
    again, _, _ = lm_loss(other.reshape(logits.shape), batch, soft, 0.3)
    assert again.item() == total.item()


def test_length_one_very_long_and_wide_vocabulary(tmp_path):
    vocab = 70_000  # ids wider than 16 bits (3-byte ids on disk)
    spec, data = ragged_data(tmp_path / "d.npz", [1, 300, 1, 2], vocab, seed=3)
    teacher = tiny_teacher(vocab, 300)
    path = write_token_store(tmp_path / "s.h5", teacher, data, "topk", spec=spec, chunk_positions=16)
    ds = SoftLabelDataset([(UnitStore(path), data)], batch_size=4, shuffle=False)
    batch = next(iter(ds))
    assert batch["ids"].shape == (4, 300) and batch["loss_mask"].sum() == 299 + 1
    target = as_target(batch)
    want = torch.topk(teacher_logits(teacher, data, 1), 4).indices
    assert torch.equal(target.ids[1:301], want)
    assert int(target.ids.max()) >= 1 << 16  # ids above 16 bits survive the store
    soft = make_soft_loss("topk_kl", 1.0)
    total, _, _ = lm_loss(torch.zeros(4, 300, vocab, requires_grad=True), batch, soft, 0.5)
    assert math.isfinite(total.item())


def _config(tmp_path, store, name, **kw):
    return TrainConfig(student="gpt-tiny", stores=(store,), out=str(tmp_path / name), epochs=2, batch_size=4,
                       lr=3e-3, device="cpu", progress=False, **kw)


def test_resume_equals_uninterrupted(stores, tmp_path):
    full = train(_config(tmp_path, stores["sampled"], "full", alpha=0.2))

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, stores["sampled"], "cut", alpha=0.2), on_epoch_end=stop)
    resumed = train(_config(tmp_path, stores["sampled"], "cut", alpha=0.2, resume=True))
    assert resumed["weights_digest"] == full["weights_digest"]
    assert full["steps"] == resumed["steps"] == 6  # 9 sequences in batches of 4: 3 steps per epoch


def test_torchrun_two_processes_equal_one(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SGD: Adam's m / sqrt(v) turns rounding noise in near-zero gradients into whole steps of size lr
    common = ["train", "--student", "gpt-tiny", "--store", stores["dense"], "--epochs", "2", "--lr", "0.5",
              "--optimizer", "sgd", "--device", "cpu", "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                          "-m", "softlabels", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "softlabels", *common, "--batch-size", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:  # equal up to the order of float sums (DDP's gradient mean, the position count's split)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    from softlabels.teacher.lm import build_lm

    init = build_lm("gpt-tiny", V, max(LENGTHS), seed=0).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-2  # trained, not trivially equal
    rec = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 6 and rec[-1]["positions"] == int(stores["data"].get_batch(
        np.arange(len(LENGTHS))).mask[:, 1:].sum())


def test_cli_train_and_eval(stores, tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "run"
    r = run_cli(*["train", "--student", "gpt-tiny", "--store", stores["topk"], "--epochs", "2", "--batch-size", "3",
                 "--loss", "jsd", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = run_cli(*["eval", "--checkpoint", str(out), "--data", stores["spec"], "--store", stores["topk"], "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["positions"] > 0 and math.isclose(m["perplexity"], math.exp(m["loss"]))
    assert 0 <= m["agreement"] <= 1 and m["kl_to_teacher"] >= 0 and 0 <= m["ece"] <= 1
    r = run_cli(*["eval", "--checkpoint", str(out), "--data", stores["spec"]])
    assert r.exit_code == 0 and "perplexity" in r.output


def test_student_of_another_vocabulary_is_refused(stores, tmp_path):
    from tests.conftest import run_cli

    mod = tmp_path / "wide_lm.py"
    mod.write_text("from softlabels.teacher.lm import GPT, GPTConfig\n"
                   "def make():\n    return GPT(GPTConfig(41, 16, 1, 2, 16))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        r = run_cli(*["train", "--student", "wide_lm:make", "--store", stores["dense"], "--device", "cpu",
                     "--out", str(tmp_path / "r")])
    finally:
        sys.path.remove(str(tmp_path))
    assert r.exit_code == 2 and "cross-tokenizer distillation is not supported" in r.output


def test_an_empty_batch_has_every_key_and_no_rows(stores):
    """A rank's slice of the last global batch may be empty: built alone, it still has the batch's keys."""
    ds = SoftLabelDataset([(UnitStore(stores["sampled"]), stores["data"])], batch_size=4, seed=1)
    full = next(iter(ds))
    held = ds.kind.holder(ds._load, keep=2, sizes=ds._sizes)
    none = np.empty(0, np.int64)
    empty = next(ds.kind.batches(held, iter([(none, none)]), ds._source, ds.stores, ds.data))
    assert empty.keys() == full.keys()
    assert all(len(v) == 0 and v.dtype == full[k].dtype for k, v in empty.items() if isinstance(v, torch.Tensor))
    assert all(v == full[k] for k, v in empty.items() if not isinstance(v, torch.Tensor))  # the temperatures
