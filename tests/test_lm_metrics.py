"""Next-token CE and LM metrics against numpy loops over positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softlabels.errors import ConfigError, ModelMismatch
from softlabels.student.lm_metrics import (
    LMEvalAccumulator,
    next_token_ce,
    next_token_targets,
)

B, L, V = 4, 9, 11


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make(seed: int = 0, teacher: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64)
    t_logits = 3 * torch.randn(B, L, V, generator=g, dtype=torch.float64) if teacher else None
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < 0.7
    lengths = torch.tensor([L, 1, 5, 2])
    return logits, ids, mask, lengths, t_logits


def counted(mask: torch.Tensor, lengths: torch.Tensor) -> list[tuple[int, int]]:
    """Positions (b, t) whose prediction counts: t + 1 inside the sequence and a target."""
    return [(b, t) for b in range(B) for t in range(L - 1) if t + 1 < lengths[b] and mask[b, t + 1]]


def test_targets_shift_and_mask():
    _, ids, mask, lengths, _ = make()
    targets, valid = next_token_targets(ids, mask, lengths)
    want = set(counted(mask, lengths))
    for b in range(B):
        for t in range(L):
            assert bool(valid[b, t]) == ((b, t) in want)
            assert int(targets[b, t]) == (int(ids[b, t + 1]) if (b, t) in want else -100)
    _, plain = next_token_targets(ids)
    assert plain[:, :-1].all() and not plain[:, -1].any()


def test_next_token_ce_against_numpy():
    logits, ids, mask, lengths, _ = make()
    logp = np_log_softmax(logits.numpy())
    pos = counted(mask, lengths)
    want = -np.mean([logp[b, t, ids[b, t + 1]] for b, t in pos])
    logits.requires_grad_(True)
    got = next_token_ce(logits, ids, mask, lengths)
    assert math.isclose(got.item(), want, rel_tol=1e-12)
    assert math.isclose(next_token_ce(logits, ids, mask, lengths, reduction="sum").item(), want * len(pos), rel_tol=1e-12)
    got.backward()
    touched = {(b, t) for b in range(B) for t in range(L) if logits.grad[b, t].abs().sum() > 0}
    assert touched == set(pos)  # masked, padded and last positions get no gradient
    none = next_token_ce(logits, ids, torch.zeros_like(mask))
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ConfigError):
        next_token_ce(logits, ids, reduction="none")
    with pytest.raises(ModelMismatch):
        next_token_ce(logits[:, :-1], ids)


def np_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    total = 0.0
    for b in range(n_bins):
        in_bin = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if in_bin.any():
            total += in_bin.sum() / len(conf) * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def reference(logits, ids, mask, lengths, t_logits, n_bins=15) -> dict[str, float]:
    pos = counted(mask, lengths)
    s, t = np_log_softmax(logits.numpy()), np_log_softmax(t_logits.numpy())
    y = np.array([int(ids[b, k + 1]) for b, k in pos])
    sp, tp = np.stack([s[b, k] for b, k in pos]), np.stack([t[b, k] for b, k in pos])
    loss, t_loss = -sp[np.arange(len(y)), y].mean(), -tp[np.arange(len(y)), y].mean()
    correct = (sp.argmax(-1) == y).astype(float)
    return {
        "positions": len(pos), "loss": loss, "perplexity": np.exp(loss), "accuracy": correct.mean(),
        "ece": np_ece(np.exp(sp.max(-1)), correct, n_bins),
        "agreement": (sp.argmax(-1) == tp.argmax(-1)).mean(),
        "kl_to_teacher": (np.exp(tp) * (tp - sp)).sum(-1).mean(),
        "teacher_loss": t_loss, "teacher_perplexity": np.exp(t_loss),
    }


def test_accumulator_against_numpy_and_batch_split():
    logits, ids, mask, lengths, t_logits = make(1)
    want = reference(logits, ids, mask, lengths, t_logits)
    whole = LMEvalAccumulator()
    whole.update(logits, ids, mask, lengths, t_logits)
    halves = LMEvalAccumulator()
    for part in (slice(0, 1), slice(1, B)):
        halves.update(logits[part], ids[part], mask[part], lengths[part], t_logits[part])
    for acc in (whole, halves):
        got = acc.compute()
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_masked_positions_are_ignored_and_teacher_log_probs_work():
    logits, ids, mask, lengths, t_logits = make(2)
    base = LMEvalAccumulator()
    base.update(logits, ids, mask, lengths, t_logits)
    _, valid = next_token_targets(ids, mask, lengths)
    noisy = logits.clone()
    noisy[~valid] = 100 * torch.randn(int((~valid).sum()), V, dtype=torch.float64)
    other = LMEvalAccumulator()
    other.update(noisy, ids, mask, lengths, torch.log_softmax(t_logits, -1))  # log-probs: same target
    for key, value in base.compute().items():
        assert other.compute()[key] == pytest.approx(value, rel=1e-6), key


def test_accumulator_without_teacher_or_positions():
    acc = LMEvalAccumulator()
    assert acc.compute() == {"positions": 0, "loss": None, "perplexity": None, "accuracy": None, "ece": None}
    logits, ids, mask, lengths, _ = make(3, teacher=False)
    acc.update(logits, ids, mask, lengths)
    assert "agreement" not in acc.compute() and acc.compute()["positions"] == len(counted(mask, lengths))
    with pytest.raises(ModelMismatch, match="vocabulary must match"):
        acc.update(logits, ids, teacher_logits=logits[..., :-1])
    with pytest.raises(ConfigError):
        LMEvalAccumulator(0)
