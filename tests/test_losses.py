"""Losses against plain numpy formulas, error handling, masking and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softlabels.errors import ConfigError
from softlabels.store.layouts import make_layout, to_numpy
from softlabels.student.losses import (
    LOSSES,
    DistillationLoss,
    KLDivergence,
    LogitsMSE,
    SoftCrossEntropy,
    TopKKL,
    make_soft_loss,
)


def np_softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = x / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    safe_p = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - np.log(q)), 0.0).sum(-1)


def np_bucketed_kl(student: np.ndarray, teacher: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Exact KL between teacher and student probs lumped into the top-k classes plus the rest (T = 1)."""
    p, q = np_softmax(teacher), np_softmax(student)
    pk, qk = np.take_along_axis(p, idx, 1), np.take_along_axis(q, idx, 1)
    pb = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    return np_kl(np.clip(pb, 0, None), qb)


def logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


GRID = (0.5, 1.0, 2.0, 3.0, 4.0)


def topk_batch(teacher: torch.Tensor, k: int, index_dtype: torch.dtype = torch.int64,
               grid: tuple[float, ...] = GRID) -> dict:
    """A top-k batch as a store gives it: the tail's logsumexp at each T of ``grid``."""
    values, indices = teacher.topk(k, -1)
    rest = teacher.scatter(1, indices, -torch.inf)
    return {
        "labels": torch.full((len(teacher),), -1),
        "topk_values": values,
        "topk_indices": indices.to(index_dtype),
        "tail_logsumexp": torch.stack([torch.logsumexp(rest / t, -1) for t in grid], -1),
        "tail_temperatures": grid,
    }


def legacy_topk_batch(teacher: torch.Tensor, k: int) -> dict:
    """A top-k batch of a store written before tails were recorded per T: the logsumexp over all C at T = 1."""
    values, indices = teacher.topk(k, -1)
    return {"labels": torch.full((len(teacher),), -1), "topk_values": values, "topk_indices": indices,
            "logsumexp": teacher.logsumexp(-1)}


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_t_squared_times_numpy_kl_of_softened_probs(temperature: float) -> None:
    s, t = logits(8, 10, seed=1), logits(8, 10, seed=2)
    got = KLDivergence(temperature)(s, {"logits": t})
    kl_soft = np_kl(np_softmax(f64(t), temperature), np_softmax(f64(s), temperature))
    assert got.shape == (8,)
    np.testing.assert_allclose(f64(got), temperature**2 * kl_soft, rtol=1e-5, atol=1e-6)
    if temperature != 1.0:  # guard against a missing or linear T factor
        assert not np.allclose(f64(got), kl_soft, rtol=1e-3)
        assert not np.allclose(f64(got), temperature * kl_soft, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_teacher_is_upcast(dtype: torch.dtype) -> None:
    s, t = logits(4, 7, seed=3), logits(4, 7, seed=4).to(dtype)
    got = KLDivergence(2.0)(s, {"logits": t})
    assert got.dtype == torch.float32
    np.testing.assert_allclose(f64(got), 4 * np_kl(np_softmax(f64(t), 2), np_softmax(f64(s), 2)), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_ce_minus_kl_is_t_squared_teacher_entropy(temperature: float) -> None:
    s, t = logits(6, 9, seed=5), logits(6, 9, seed=6)
    batch = {"logits": t}
    diff = SoftCrossEntropy(temperature)(s, batch) - KLDivergence(temperature)(s, batch)
    p = np_softmax(f64(t), temperature)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(f64(diff), temperature**2 * entropy, rtol=1e-5, atol=1e-5)


def test_mse_matches_numpy_and_ignores_temperature() -> None:
    s, t = logits(5, 4, seed=7), logits(5, 4, seed=8)
    expected = ((f64(s) - f64(t)) ** 2).mean(-1)
    np.testing.assert_allclose(f64(LogitsMSE()(s, {"logits": t})), expected, rtol=1e-6)
    np.testing.assert_allclose(f64(make_soft_loss("mse", 4.0)(s, {"logits": t})), expected, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_topk_with_k_equal_c_equals_dense_kl(temperature: float) -> None:
    s, t = logits(16, 12, seed=9), logits(16, 12, seed=10)
    batch = topk_batch(t, 12)
    dense = KLDivergence(temperature)(s, {"logits": t})
    torch.testing.assert_close(TopKKL(temperature)(s, batch), dense, rtol=1e-5, atol=1e-6)
    # Bucket order does not matter: shuffle (value, index) columns together.
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = {**batch, "topk_values": batch["topk_values"][:, perm], "topk_indices": batch["topk_indices"][:, perm]}
    torch.testing.assert_close(TopKKL(temperature)(s, shuffled), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_at_t1_is_exact_bucketed_kl(k: int) -> None:
    s, t = logits(10, 20, seed=11), logits(10, 20, seed=12)
    batch = topk_batch(t, k, torch.int32)
    expected = np_bucketed_kl(f64(s), f64(t), batch["topk_indices"].long().numpy())
    np.testing.assert_allclose(f64(TopKKL(1.0)(s, batch)), expected, rtol=1e-4, atol=1e-6)


def test_topk_at_other_t_matches_numpy_bucket_formula() -> None:
    """At a grid T the teacher's buckets are exact: p_T of each stored class and the true tail of p_T."""
    s, t, temperature, k = logits(6, 15, seed=13), logits(6, 15, seed=14), 3.0, 4
    batch = topk_batch(t, k)
    sn, tn, idx = f64(s), f64(t), batch["topk_indices"].numpy()
    p = np_softmax(tn, temperature)
    pk = np.take_along_axis(p, idx, 1)
    teacher_p = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], 1)
    rest = np.ones_like(sn, dtype=bool)
    np.put_along_axis(rest, idx, False, 1)
    student_tail = np.log(np.where(rest, np.exp(sn / temperature), 0).sum(-1))
    student_b = np.concatenate([np.take_along_axis(sn, idx, 1) / temperature, student_tail[:, None]], 1)
    expected = temperature**2 * np_kl(teacher_p, np_softmax(student_b))
    np.testing.assert_allclose(f64(TopKKL(temperature)(s, batch)), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_topk_no_nan_when_teacher_tail_underflows(k: int) -> None:
    t = logits(4, 5, seed=15)
    t[:, 0] = 1e4  # tail mass exp(-1e4) underflows to exactly 0
    s = logits(4, 5, seed=16).requires_grad_()
    loss = TopKKL(2.0)(s, topk_batch(t, k))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def test_topk_k_equal_c_tolerates_inconsistent_logsumexp() -> None:
    # A stored lse a little below the top-k lse (rounding) must not create a tail.
    s, t = logits(4, 6, seed=17).requires_grad_(), logits(4, 6, seed=18)
    for shift in (-1e-4, 1e-4):
        batch = legacy_topk_batch(t, 6)
        batch["logsumexp"] = batch["logsumexp"] + shift
        loss = TopKKL(1.0)(s, batch)
        torch.testing.assert_close(loss, KLDivergence(1.0)(s, {"logits": t}), rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert torch.isfinite(grad).all()


def test_bad_loss_name_and_temperature_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="kl, soft_ce, mse, topk_kl"):
        make_soft_loss("kld", 1.0)
    for bad in (0, -1.0, math.nan, math.inf, "two"):
        with pytest.raises(ConfigError, match="temperature"):
            make_soft_loss("kl", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        make_soft_loss("nope", 0.0)
    assert len(info.value.problems) == 2 and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        TopKKL(-2.0)
    assert set(LOSSES) == {"kl", "soft_ce", "mse", "topk_kl", "sampled_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"}


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_alpha_out_of_range_raises(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        DistillationLoss(KLDivergence(1.0), alpha)


@pytest.mark.parametrize("name", ["kl", "soft_ce", "mse"])
def test_dense_loss_given_topk_batch_names_the_fix(name: str) -> None:
    batch = topk_batch(logits(3, 5), 2)
    with pytest.raises(ConfigError, match="use --loss topk_kl"):
        make_soft_loss(name, 1.0)(logits(3, 5), batch)


def test_topk_loss_given_dense_batch_or_no_teacher_raises() -> None:
    with pytest.raises(ConfigError, match="dense"):
        TopKKL(1.0)(logits(3, 5), {"logits": logits(3, 5)})
    with pytest.raises(ConfigError, match="none"):
        TopKKL(1.0)(logits(3, 5), {"labels": torch.zeros(3, dtype=torch.int64)})


def mixed_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    s = logits(6, 5, seed=19).requires_grad_()
    batch = {"labels": torch.tensor([-1, 2, 0, -1, 4, 1]), "logits": logits(6, 5, seed=20)}
    return s, batch


def np_ce_rows(s: np.ndarray, labels: np.ndarray) -> np.ndarray:
    log_q = np.log(np_softmax(s))
    return np.where(labels >= 0, -log_q[np.arange(len(s)), np.maximum(labels, 0)], 0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_mixing_and_unlabeled_masking(alpha: float) -> None:
    s, batch = mixed_batch()
    t = 2.0
    loss_fn = DistillationLoss(KLDivergence(t), alpha)
    total = loss_fn(s, batch)
    ce = np_ce_rows(f64(s), batch["labels"].numpy())
    kl = t * t * np_kl(np_softmax(f64(batch["logits"]), t), np_softmax(f64(s), t))
    expected = (alpha * ce + (1 - alpha) * kl).mean()
    assert total.shape == ()
    np.testing.assert_allclose(total.item(), expected, rtol=1e-5)
    parts = loss_fn.parts()
    np.testing.assert_allclose(parts["hard"], alpha * ce.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(parts["hard"] + parts["soft"], expected, rtol=1e-5)


def test_alpha_one_skips_soft_loss_and_averages_over_all_rows() -> None:
    s, batch = mixed_batch()
    del batch["logits"]  # the soft loss would raise if it ran
    total = DistillationLoss(KLDivergence(1.0), 1.0)(s, batch)
    ce = np_ce_rows(f64(s), batch["labels"].numpy())
    np.testing.assert_allclose(total.item(), ce.sum() / 6, rtol=1e-5)


def test_hard_only_averages_over_labeled_rows() -> None:
    s, batch = mixed_batch()
    total = DistillationLoss(None, 0.5)(s, {"labels": batch["labels"]})
    ce = np_ce_rows(f64(s), batch["labels"].numpy())
    np.testing.assert_allclose(total.item(), ce.sum() / 4, rtol=1e-5)


def test_hard_only_all_unlabeled_is_zero_with_grad() -> None:
    s = logits(3, 4).requires_grad_()
    total = DistillationLoss(None, 0.5)(s, {"labels": torch.full((3,), -1)})
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("soft", [None, "kl"])
def test_ce_gradient_is_zero_on_unlabeled_rows(soft: str | None) -> None:
    s, batch = mixed_batch()
    DistillationLoss(soft and KLDivergence(1.0), 1.0)(s, batch).backward()
    unlabeled = batch["labels"] < 0
    assert torch.equal(s.grad[unlabeled], torch.zeros_like(s.grad[unlabeled]))
    assert (s.grad[~unlabeled].abs().sum(-1) > 0).all()


def test_unlabeled_rows_get_only_the_soft_gradient() -> None:
    s, batch = mixed_batch()
    alpha = 0.3
    DistillationLoss(KLDivergence(2.0), alpha)(s, batch).backward()
    (soft_grad,) = torch.autograd.grad(KLDivergence(2.0)(s, batch).sum(), s)
    unlabeled = batch["labels"] < 0
    torch.testing.assert_close(s.grad[unlabeled], (1 - alpha) / 6 * soft_grad[unlabeled])


shapes = st.tuples(st.integers(1, 8), st.integers(2, 20))


@settings(max_examples=50, deadline=None)
@given(shape=shapes, temperature=st.floats(0.25, 8.0), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_kl_is_nonnegative_and_zero_for_identical_logits(
    shape: tuple[int, int], temperature: float, seed: int, scale: float
) -> None:
    s, t = logits(*shape, seed=seed, scale=scale), logits(*shape, seed=seed + 1, scale=scale)
    loss = KLDivergence(temperature)
    assert (loss(s, {"logits": t}) >= -1e-5).all()
    assert loss(t, {"logits": t}).abs().max() < 1e-5


@settings(max_examples=50, deadline=None)
@given(shape=shapes, temperature=st.floats(0.25, 8.0), seed=st.integers(0, 2**16))
def test_topk_full_k_equals_dense_kl_property(shape: tuple[int, int], temperature: float, seed: int) -> None:
    s, t = logits(*shape, seed=seed), logits(*shape, seed=seed + 1)
    torch.testing.assert_close(
        TopKKL(temperature)(s, topk_batch(t, shape[1], grid=(temperature,))),
        KLDivergence(temperature)(s, {"logits": t}),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_run_on_cuda_without_host_syncs(name: str) -> None:
    s, t = logits(32, 50).cuda().requires_grad_(), logits(32, 50, seed=1).cuda()
    batch = topk_batch(t, 5) if name == "topk_kl" else {"logits": t.half()}
    if name == "sampled_kl":
        layout = make_layout("sampled", num_classes=50, samples=8)
        ids = torch.arange(32, device="cuda")
        batch = {"target": layout.decode({k: to_numpy(v.cpu()) for k, v in
                                          layout.encode(t, sample_ids=ids, positions=ids * 0).items()}).to("cuda")}
    batch["labels"] = torch.arange(32, device="cuda") % 7 - 1
    loss_fn = DistillationLoss(make_soft_loss(name, 2.0), 0.5)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(s, batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(s.grad).all()


def test_kl_with_minus_inf_teacher_logits_is_finite_and_exact():
    """A masked class (teacher logit -inf, p = 0) contributes 0, not NaN."""
    t = torch.tensor([[2.0, float("-inf"), 0.5, -1.0]])
    s = torch.tensor([[0.3, 1.2, -0.4, 0.0]], requires_grad=True)
    T = 2.0
    loss = KLDivergence(T)(s, {"logits": t, "labels": torch.tensor([-1])})
    p = np.exp(t.numpy()[0] / T - np.logaddexp.reduce(t.numpy()[0] / T))
    log_q = s.detach().numpy()[0] / T - np.logaddexp.reduce(s.detach().numpy()[0] / T)
    keep = p > 0
    want = T * T * np.sum(p[keep] * (np.log(p[keep]) - log_q[keep]))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()
