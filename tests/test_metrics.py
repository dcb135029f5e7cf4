"""EvalAccumulator against hand computations in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softlabels.errors import ConfigError, DataError, ModelMismatch
from softlabels.student.metrics import EvalAccumulator


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(-1), probs.argmax(-1)
    total = 0.0
    for b in range(n_bins):
        in_bin = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if in_bin.any():
            total += in_bin.sum() / len(conf) * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return total


def np_mean_corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]))


def data(b: int = 24, c: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, t = 2 * torch.randn(b, c, generator=g), 2 * torch.randn(b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    labels[::4] = -1
    return s, t, labels


def test_dense_metrics_match_hand_computation() -> None:
    s, t, y = data()
    acc = EvalAccumulator(6, n_bins=10)
    acc.update(s, y, {"logits": t, "labels": y})
    got = acc.compute()
    sn, tn, yn = s.double().numpy(), t.double().numpy(), y.numpy()
    lab = yn >= 0
    assert got["n"] == 24 and got["n_labeled"] == 18
    assert got["accuracy"] == pytest.approx((sn.argmax(-1) == yn)[lab].mean())
    assert got["teacher_accuracy"] == pytest.approx((tn.argmax(-1) == yn)[lab].mean())
    assert got["agreement"] == pytest.approx((sn.argmax(-1) == tn.argmax(-1)).mean())
    assert got["kl_to_teacher"] == pytest.approx(np_kl(np_softmax(tn), np_softmax(sn)).mean(), rel=1e-6)
    assert got["correlation"] == pytest.approx(np_mean_corr(sn, tn), rel=1e-6)
    assert got["ece"] == pytest.approx(np_ece(np_softmax(sn[lab]), yn[lab], 10), rel=1e-6)
    assert got["teacher_ece"] == pytest.approx(np_ece(np_softmax(tn[lab]), yn[lab], 10), rel=1e-6)


def test_topk_metrics_match_hand_computation() -> None:
    s, t, y = data(seed=1)
    values, indices = t.topk(3, -1)
    acc = EvalAccumulator(6)
    acc.update(s, y, {"topk_values": values, "topk_indices": indices.int(), "logsumexp": t.logsumexp(-1)})
    got = acc.compute()
    sn, tn, yn, idx = s.double().numpy(), t.double().numpy(), y.numpy(), indices.numpy()
    lab = yn >= 0
    p, q = np_softmax(tn), np_softmax(sn)
    pk, qk = np.take_along_axis(p, idx, 1), np.take_along_axis(q, idx, 1)
    pb = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    assert got["teacher_accuracy"] == pytest.approx((idx[:, 0] == yn)[lab].mean())
    assert got["agreement"] == pytest.approx((sn.argmax(-1) == idx[:, 0]).mean())
    assert got["kl_to_teacher"] == pytest.approx(np_kl(pb, qb).mean(), rel=1e-5)
    assert got["correlation"] == pytest.approx(np_mean_corr(np.take_along_axis(sn, idx, 1), values.numpy()), rel=1e-5)
    assert "teacher_ece" not in got


def test_streaming_equals_one_big_update() -> None:
    s, t, y = data(b=40, seed=2)
    whole, parts = EvalAccumulator(6), EvalAccumulator(6)
    whole.update(s, y, {"logits": t})
    for chunk in (slice(0, 3), slice(3, 17), slice(17, 40)):
        parts.update(s[chunk], y[chunk], {"logits": t[chunk]})
    got, expected = parts.compute(), whole.compute()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    rp, rw = parts.reliability(), whole.reliability()
    assert rp["count"] == rw["count"]
    for key in ("accuracy", "confidence"):
        assert [v is None for v in rp[key]] == [v is None for v in rw[key]]
        assert [v for v in rp[key] if v is not None] == pytest.approx([v for v in rw[key] if v is not None], rel=1e-12)


def two_class_rows(confidence: float, n: int, n_correct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows predicting class 0 with the given confidence, the first ``n_correct`` labeled 0."""
    row = torch.tensor([math.log(confidence), math.log(1 - confidence)], dtype=torch.float64)
    labels = torch.tensor([0] * n_correct + [1] * (n - n_correct))
    return row.repeat(n, 1), labels


def calibration_case(correct_at_07: int, correct_at_09: int) -> EvalAccumulator:
    acc = EvalAccumulator(2)
    for conf, n_correct in ((0.7, correct_at_07), (0.9, correct_at_09)):
        s, y = two_class_rows(conf, 10, n_correct)
        acc.update(s, y, {"logits": s})
    return acc


def test_ece_is_zero_when_calibrated() -> None:
    got = calibration_case(7, 9).compute()
    assert got["ece"] == pytest.approx(0.0, abs=1e-12)
    assert got["teacher_ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_miscalibrated_case_and_reliability() -> None:
    acc = calibration_case(4, 10)
    # Half the rows at conf 0.7 with accuracy 0.4, half at 0.9 with accuracy 1.0.
    assert acc.compute()["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    rel = acc.reliability()
    assert len(rel["count"]) == 15 and sum(rel["count"]) == 20
    b07, b09 = int(0.7 * 15), int(0.9 * 15)  # 0.7 in (10/15, 11/15], 0.9 in (13/15, 14/15]
    assert rel["bin_lower"][b07] < 0.7 <= rel["bin_upper"][b07]
    assert (rel["count"][b07], rel["count"][b09]) == (10, 10)
    assert rel["accuracy"][b07] == pytest.approx(0.4) and rel["accuracy"][b09] == pytest.approx(1.0)
    assert rel["confidence"][b07] == pytest.approx(0.7) and rel["confidence"][b09] == pytest.approx(0.9)
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None
    assert acc.reliability(teacher=True) == rel


def test_bins_are_closed_on_the_right() -> None:
    acc = EvalAccumulator(2, n_bins=2)
    acc.update(*two_class_rows(0.5, 4, 3))  # softmax([0, 0]) is exactly 0.5, the edge between the bins
    assert acc.reliability()["count"] == [4, 0]


def test_single_bin_ece_is_gap_of_means() -> None:
    acc = EvalAccumulator(2, n_bins=1)
    for conf, n_correct in ((0.7, 4), (0.9, 10)):
        acc.update(*two_class_rows(conf, 10, n_correct))
    assert acc.compute()["ece"] == pytest.approx(abs(0.7 - 0.8))


def test_keys_absent_or_none_when_not_computable() -> None:
    s, _, _ = data(b=5)
    acc = EvalAccumulator(6)
    acc.update(s, torch.full((5,), -1), None)
    got = acc.compute()
    assert got == {"n": 5, "n_labeled": 0, "accuracy": None, "ece": None}
    # K = 1 leaves nothing to correlate; a top-k teacher has no teacher_ece.
    values, indices = s.topk(1, -1)
    top1 = {"topk_values": values, "topk_indices": indices, "logsumexp": s.logsumexp(-1)}
    acc.update(s, torch.full((5,), -1), top1)
    got = acc.compute()
    assert got["teacher_accuracy"] is None and "correlation" not in got and "teacher_ece" not in got
    assert math.isfinite(got["kl_to_teacher"])


def test_accepts_half_precision_inputs() -> None:
    s, t, y = data(seed=3)
    acc = EvalAccumulator(6)
    acc.update(s.half(), y, {"logits": t.bfloat16()})
    assert all(v is None or math.isfinite(v) for v in acc.compute().values())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError) as info:
        EvalAccumulator(0, n_bins=0)
    assert len(info.value.problems) == 2
    s, _, y = data()
    with pytest.raises(ModelMismatch):
        EvalAccumulator(5).update(s, y)
    with pytest.raises(DataError):
        EvalAccumulator(6).update(s, y + 6)


def test_sampled_targets_get_agreement_and_a_kl_bound() -> None:
    """A sampled teacher: its most drawn class as top-1, and KL over the drawn ids plus the tail (<= the full KL)."""
    from softlabels.store.layouts import make_layout

    s, t, y = data(seed=4)
    lay = make_layout("sampled", num_classes=6, samples=8, seed=3)
    pos = torch.arange(len(t))
    target = lay.decode({k: v.numpy() for k, v in lay.encode(t, sample_ids=pos, positions=pos).items()})
    sampled, dense = EvalAccumulator(6), EvalAccumulator(6)
    sampled.update(s, y, target)
    dense.update(s, y, {"logits": t})
    got, full = sampled.compute(), dense.compute()
    top = target.ids[:, 0].numpy()  # counts descend: the first id is the most drawn
    assert got["agreement"] == pytest.approx((s.numpy().argmax(-1) == top).mean())
    assert 0 <= got["kl_to_teacher"] <= full["kl_to_teacher"] + 1e-9
    assert "correlation" not in got and "teacher_ece" not in got
