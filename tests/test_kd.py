"""KD divergences for every layout against plain numpy float64 references, and fused paths against plain ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softlabels.errors import ConfigError, ModelMismatch
from softlabels.store.layouts import (
    DenseTarget,
    SampledTarget,
    TopKTarget,
    make_layout,
    to_numpy,
)
from softlabels.student import kd
from softlabels.student.losses import (
    LOSSES,
    DistillationLoss,
    SampledKL,
    make_soft_loss,
)

KINDS = {"forward_kl": "kl", "reverse_kl": "reverse_kl", "skew_kl": "skew_kl",
         "skew_reverse_kl": "skew_reverse_kl", "jsd": "jsd"}


def np_softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = x / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    with np.errstate(divide="ignore"):  # q = 0 where p > 0: an infinite divergence, as it should be
        return np.where(p > 0, p * (np.log(safe) - np.log(np.where(p > 0, q, 1.0))), 0.0).sum(-1)


def np_div(kind: str, p: np.ndarray, q: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """The divergences as DistiLLM (Ko et al. 2024) and the JSD define them, on probabilities."""
    if kind == "forward_kl":
        return np_kl(p, q)
    if kind == "reverse_kl":
        return np_kl(q, p)
    if kind == "skew_kl":
        return np_kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return np_kl(q, (1 - alpha) * p + alpha * q)
    m = 0.5 * (p + q)
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


GRID = (0.5, 1.0, 2.0, 3.0)  # the tail temperatures of the top-k targets made here


def topk_target(t: torch.Tensor, k: int) -> TopKTarget:
    """A top-k target with exact float64 tails on :data:`GRID` (what the layout stores, in float64)."""
    values, ids = t.topk(k, -1)
    rest = t.scatter(1, ids, -torch.inf)
    return TopKTarget(values, ids, torch.stack([torch.logsumexp(rest / g, -1) for g in GRID], -1), GRID)


def sampled_target(t: torch.Tensor, samples: int, seed: int = 0, temperature: float = 1.0) -> SampledTarget:
    layout = make_layout("sampled", num_classes=t.shape[1], samples=samples, seed=seed, temperature=temperature)
    block = layout.encode(t.float(), sample_ids=torch.arange(len(t)), positions=torch.zeros(len(t), dtype=torch.long))
    target = layout.decode({k: to_numpy(v) for k, v in block.items()})
    # float64 logits of the drawn ids, straight from the teacher, for exact references
    return SampledTarget(target.ids, target.counts, t.gather(1, target.ids), (t / temperature).logsumexp(-1),
                         temperature)


def np_buckets(s: np.ndarray, t: np.ndarray, ids: list[np.ndarray], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and student probabilities at T over each row's stored ids plus one tail bucket (module doc of kd)."""
    pb, qb = [], []
    for r, idx in enumerate(ids):
        p = np_softmax(t[r], temperature)
        pb.append(np.append(p[idx], max(0.0, 1 - p[idx].sum())))
        q = np_softmax(s[r], temperature)
        qb.append(np.append(q[idx], max(0.0, 1 - q[idx].sum())))
    width = max(len(x) for x in pb)
    pad = lambda rows: np.array([np.concatenate([x[:-1], np.zeros(width - len(x)), x[-1:]]) for x in rows])  # noqa: E731
    return pad(pb), pad(qb)


# -- dense: exact -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_divergences_equal_numpy(kind: str, temperature: float) -> None:
    s, t = logits(6, 11, seed=1), logits(6, 11, seed=2)
    t[0, 3] = -torch.inf  # a class the teacher rules out
    got = make_soft_loss(KINDS[kind], temperature)(s, DenseTarget(t))
    p, q = np_softmax(t.numpy(), temperature), np_softmax(s.numpy(), temperature)
    want = temperature**2 * np_div(kind, p, q)
    if kind in ("reverse_kl",):  # q > 0 where p = 0: infinite, as it should be
        assert torch.isinf(got[0]) or got[0] > 1e30
        got, want = got[1:], want[1:]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


# -- sparse: the documented bucket approximation ----------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("layout", ["topk", "sampled"])
def test_sparse_divergences_equal_numpy_buckets(kind: str, temperature: float, layout: str) -> None:
    s, t = logits(8, 15, seed=3), logits(8, 15, seed=4)
    target = topk_target(t, 4) if layout == "topk" else sampled_target(t, 6, temperature=temperature)
    if layout == "sampled" and kind == "forward_kl":
        pytest.skip("the sampled layout's forward KL is its own estimator (tested below)")
    ids = [target.ids[r][: int((target.counts[r] > 0).sum())].numpy() if layout == "sampled" else target.ids[r].numpy()
           for r in range(8)]
    got = kd.divergence(kind, s, target, temperature)
    pb, qb = np_buckets(s.numpy(), t.numpy(), ids, temperature)
    np.testing.assert_allclose(got.numpy(), np_div(kind, pb, qb), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_topk_with_k_equal_c_equals_dense(kind: str, temperature: float) -> None:
    s, t = logits(5, 9, seed=5).requires_grad_(), logits(5, 9, seed=6)
    dense = kd.divergence(kind, s, DenseTarget(t), temperature)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    sparse = kd.divergence(kind, s, topk_target(t, 9), temperature)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_buckets_are_a_lower_bound_at_t1(kind: str) -> None:
    """Data processing inequality: lumping classes never increases an f-divergence."""
    s, t = logits(32, 40, seed=7), logits(32, 40, seed=8)
    dense = kd.divergence(kind, s, DenseTarget(t), 1.0)
    for k in (1, 5, 20):
        assert (kd.divergence(kind, s, topk_target(t, k), 1.0) <= dense + 1e-12).all()


# -- sampled forward KL ---------------------------------------------------------------------------------
def test_sampled_kl_at_t1_is_the_count_weighted_estimate() -> None:
    s, t = logits(6, 12, seed=9), logits(6, 12, seed=10)
    target = sampled_target(t, 10)
    got = kd.sampled_kl(s, target, 1.0)
    lp, lq = torch.log_softmax(t, -1).gather(1, target.ids), torch.log_softmax(s, -1).gather(1, target.ids)
    want = (target.counts.double() / 10 * (lp - lq)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sampled_kl_is_unbiased_at_t1_value_and_gradient() -> None:
    c, samples, seeds = 20, 8, 300
    s = logits(1, c, seed=11).requires_grad_()
    t = logits(1, c, seed=12)
    dense = kd.divergence("forward_kl", s, DenseTarget(t), 1.0)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    values, grads = [], []
    for seed in range(seeds):
        est = kd.sampled_kl(s, sampled_target(t, samples, seed), 1.0)
        (g,) = torch.autograd.grad(est.sum(), s)
        values.append(est.item())
        grads.append(g[0])
    values, grads = torch.tensor(values, dtype=torch.float64), torch.stack(grads)
    z = (values.mean() - dense.item()) / (values.std() / seeds**0.5)
    assert abs(z) < 4
    # the gradient is q - counts / S: its standard error follows from the multinomial variance
    p = torch.softmax(t[0], -1)
    se = (p * (1 - p) / (samples * seeds)).sqrt()
    assert ((grads.mean(0) - g_dense[0]).abs() <= 4 * se).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_kl_at_the_draw_t_is_exact_with_expected_counts(temperature: float) -> None:
    """At the draw temperature, with counts = S p_Td (their expectation), the estimate equals dense KL at Td."""
    s, t = logits(4, 30, seed=13, scale=1.5), logits(4, 30, seed=14, scale=1.5)
    dense = kd.divergence("forward_kl", s, DenseTarget(t), temperature)
    ids = torch.arange(30).expand(4, 30)
    expected = SampledTarget(ids, 1000 * torch.softmax(t / temperature, -1), t, (t / temperature).logsumexp(-1),
                             temperature)
    torch.testing.assert_close(kd.sampled_kl(s, expected, temperature), dense, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match=f"was drawn at T = {temperature:g} and answers only that T exactly"):
        kd.sampled_kl(s, expected, 1.0 if temperature != 1 else 2.0)


# -- fused paths equal the plain computation -----------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 0.7])
def test_gather_lse_in_blocks_equals_plain(temperature: float) -> None:
    s = logits(7, 13, seed=15).requires_grad_()
    cols = torch.randint(0, 13, (7, 4), generator=torch.Generator().manual_seed(0))
    g, lse, *lse1 = kd.gather_lse(s, cols, temperature, block=13 * 2, with_t1=True)  # two rows per block
    lse1 = lse1[0] if temperature != 1 else lse
    dg, dl, d1 = logits(7, 4, seed=16), logits(7, seed=17), logits(7, seed=18)
    (got,) = torch.autograd.grad((g * dg).sum() + (lse * dl).sum() + (lse1 * d1).sum(), s)
    g2, lse2 = s.gather(1, cols) / temperature, torch.logsumexp(s / temperature, -1)
    (want,) = torch.autograd.grad((g2 * dg).sum() + (lse2 * dl).sum() + (torch.logsumexp(s, -1) * d1).sum(), s)
    torch.testing.assert_close((g, lse, lse1), (g2, lse2, torch.logsumexp(s, -1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_fused_dense_kl_and_ce_equal_plain(temperature: float, with_labels: bool, chunked: bool) -> None:
    s, t = logits(9, 10, seed=18).requires_grad_(), logits(9, 10, seed=19)
    t[2, 4] = -torch.inf
    labels = torch.tensor([0, 3, -1, 9, 2, -1, 5, 5, 1]) if with_labels else None
    kl, ce = kd.dense_kl_and_ce(s, DenseTarget(t), labels, temperature, block=25, chunked=chunked)
    dk, dc = logits(9, seed=20), logits(9, seed=21)
    (got,) = torch.autograd.grad((kl * dk).sum() + (ce * dc).sum(), s)
    lq = F.log_softmax(s / temperature, -1)
    lp = F.log_softmax(t / temperature, -1)
    kl2 = (lp.exp() * (lp.clamp_min(-1e300) - lq)).sum(-1)  # 0 log 0 = 0 at the -inf teacher logit
    ce2 = F.cross_entropy(s, labels, ignore_index=-1, reduction="none") if with_labels else torch.zeros(9, dtype=s.dtype)
    (want,) = torch.autograd.grad((kl2 * dk).sum() + (ce2 * dc).sum(), s)
    torch.testing.assert_close((kl, ce), (kl2, ce2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.25, 0.5, 2.0, 4.0, 0.7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_kl_and_ce_bit_identical_to_division(temperature: float, dtype: torch.dtype) -> None:
    """A power-of-two T multiplies by 1 / T: values and gradients keep every bit of the plain ops' x / T."""
    s0, t = logits(64, 100, seed=30, dtype=dtype), logits(64, 100, seed=31, dtype=torch.float16)
    t[3, 7] = -torch.inf
    labels = torch.randint(-1, 100, (64,), generator=torch.Generator().manual_seed(32))
    s = s0.clone().requires_grad_()
    kl, ce = kd.dense_kl_and_ce(s, DenseTarget(t), labels, temperature)
    (got,) = torch.autograd.grad(kl.sum() * 0.3 + ce.sum(), s)
    s2 = s0.clone().requires_grad_()
    x = s2.float()
    lq = F.log_softmax(x / temperature, -1)
    lp = F.log_softmax(t.float() / temperature, -1).clamp_min(torch.finfo(torch.float32).min)
    kl2 = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    ce2 = F.nll_loss(F.log_softmax(x, -1), labels, ignore_index=-1, reduction="none")
    (want,) = torch.autograd.grad(kl2.sum() * 0.3 + ce2.sum(), s2)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16}
    assert torch.equal(kl.view(torch.int32), kl2.view(torch.int32))
    assert torch.equal(ce.view(torch.int32), ce2.view(torch.int32))
    assert got.dtype == dtype and torch.equal(got.view(bits[dtype]), want.view(bits[dtype]))


def batch_for(name: str, t: torch.Tensor, temperature: float = 1.0) -> dict:
    target = {"topk_kl": lambda: topk_target(t, 3),
              "sampled_kl": lambda: sampled_target(t, 8, temperature=temperature)}.get(
        name, lambda: DenseTarget(t))()
    return {"labels": torch.tensor([1, -1, 0, 4, 4, -1]), "target": target}


@pytest.mark.parametrize("name", ["kl", "topk_kl", "sampled_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_fused_equals_separate_terms(name: str, temperature: float) -> None:
    s, t = logits(6, 7, seed=22).requires_grad_(), logits(6, 7, seed=23)
    batch, alpha = batch_for(name, t, temperature), 0.3
    soft = make_soft_loss(name, temperature)
    total = DistillationLoss(soft, alpha)(s, batch)
    (got,) = torch.autograd.grad(total, s)
    ce = F.cross_entropy(s, batch["labels"], ignore_index=-1, reduction="none")
    want_total = alpha * ce.mean() + (1 - alpha) * soft(s, batch["target"]).mean()
    (want,) = torch.autograd.grad(want_total, s)
    torch.testing.assert_close(total, want_total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["kl", "topk_kl", "sampled_kl"])
def test_half_student_gives_float32_loss_and_half_gradient(name: str) -> None:
    s = logits(6, 7, seed=24, dtype=torch.bfloat16).requires_grad_()
    batch = batch_for(name, logits(6, 7, seed=25, dtype=torch.float32), 2.0)
    loss = DistillationLoss(make_soft_loss(name, 2.0), 0.5)(s, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()


# -- errors -------------------------------------------------------------------------------------------
def test_layout_mismatch_names_the_right_loss() -> None:
    s, t = logits(6, 7), logits(6, 7, seed=1)
    with pytest.raises(ConfigError, match="has the sampled layout; use --loss sampled_kl"):
        make_soft_loss("kl", 1.0)(s, {"target": sampled_target(t, 4)})
    with pytest.raises(ConfigError, match="needs a sampled batch but the batch has the top-k layout; use --loss topk_kl"):
        SampledKL(1.0)(s, {"target": topk_target(t, 2)})
    with pytest.raises(ConfigError, match="dense"):
        SampledKL(1.0)(s, {"logits": t})
    with pytest.raises(ModelMismatch, match="sampled batch shapes"):
        SampledKL(1.0)(logits(5, 7), {"target": sampled_target(t, 4)})
    with pytest.raises(ConfigError, match="alpha must lie strictly between 0 and 1"):
        LOSSES["skew_kl"](1.0, alpha=1.0)


def test_store_array_batches_still_work() -> None:
    s, t = logits(4, 9, seed=2), logits(4, 9, seed=3)
    target = sampled_target(t, 5, temperature=2.0)
    batch = {"sampled_ids": target.ids, "sampled_counts": target.counts, "sampled_logits": target.logits,
             "logsumexp": target.logsumexp, "sample_temperature": 2.0}
    torch.testing.assert_close(SampledKL(2.0)(s, batch), SampledKL(2.0)(s, target))
