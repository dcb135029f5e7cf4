"""Next-token cross-entropy and token-level evaluation metrics for causal LMs, and the confidence bins
that the classifier metrics (:mod:`softlabels.student.metrics`) share.

The prediction at position ``t`` is for token ``t + 1``; it counts when ``t + 1`` is inside the
sequence and ``mask[t + 1]`` is set, so the last position and padding never count.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from softlabels.errors import ConfigError, ModelMismatch

__all__ = ["next_token_targets", "next_token_ce", "CalibrationBins", "Sums", "LMEvalAccumulator", "IGNORE"]

IGNORE = -100
"""Target id of positions that do not count (PyTorch's and Hugging Face's ``ignore_index``)."""


def next_token_targets(ids: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Shifted targets for ids [B, L]: ``targets[b, t] = ids[b, t + 1]`` where ``valid``, else :data:`IGNORE`
    (``mask`` [B, L]: token is a target; ``lengths`` [B]: real tokens, the rest is padding)."""
    b, length = ids.shape
    valid = torch.zeros((b, length), dtype=torch.bool, device=ids.device)
    valid[:, :-1] = True if mask is None else mask[:, 1:].to(torch.bool)
    if lengths is not None:
        valid &= torch.arange(length, device=ids.device) + 1 < lengths.to(ids.device)[:, None]
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.masked_fill_(~valid, IGNORE), valid


def _check_logits(logits: Tensor, ids: Tensor) -> None:
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise ModelMismatch(f"logits {tuple(logits.shape)} do not fit token ids {tuple(ids.shape)}; the model must "
                            "return [B, L, V] for ids [B, L]")


def next_token_ce(logits: Tensor, ids: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None,
                  *, reduction: str = "mean") -> Tensor:
    """Hard next-token cross-entropy of logits [B, L, V] against ids [B, L], masked and shifted: the mean
    over the positions that count (0 when none does, keeping the graph), or their ``"sum"``."""
    _check_logits(logits, ids)
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}; pass one of them")
    targets, valid = next_token_targets(ids, mask, lengths)
    # ignore_index skips the masked rows without gathering a [P, V] copy of the logits.
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


class CalibrationBins:
    """Per-bin [count, correct, confidence] sums over ``n_bins`` equal-width confidence bins closed on the right."""

    def __init__(self, n_bins: int) -> None:
        self.edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
        self.sums = torch.zeros(3, n_bins, dtype=torch.float64)

    def add(self, conf: Tensor, correct: Tensor) -> None:
        """Add top-1 confidences and whether each prediction was right (float64 [N], on the CPU)."""
        idx = torch.bucketize(conf, self.edges[1:-1])  # bin i holds edge_i < c <= edge_{i+1}
        self.sums.index_add_(1, idx, torch.stack([torch.ones_like(conf), correct, conf]))

    def ece(self) -> float | None:
        """``sum_b |B_b|/n |acc_b - conf_b|`` (None before any row)."""
        count, correct, conf = self.sums
        n = float(count.sum())
        return float((correct - conf).abs().sum()) / n if n else None

    def reliability(self) -> dict[str, list]:
        """Per bin: ``bin_lower``, ``bin_upper``, ``count`` and the mean ``accuracy`` and ``confidence`` (None
        for an empty bin)."""
        count, correct, conf = self.sums
        return {"bin_lower": self.edges[:-1].tolist(),
                "bin_upper": self.edges[1:].tolist(),
                "count": [int(c) for c in count.tolist()],
                "accuracy": [a / c if c else None for a, c in zip(correct.tolist(), count.tolist())],
                "confidence": [f / c if c else None for f, c in zip(conf.tolist(), count.tolist())]}


class Sums(defaultdict):
    """Running float64 sums by name (0 until added to); tensors are read as Python floats."""

    def __init__(self) -> None:
        super().__init__(float)

    def add(self, **values: Tensor | float) -> None:
        """Add each value to its sum."""
        for key, value in values.items():
            self[key] += float(value)


class LMEvalAccumulator:
    """Accumulates next-token metrics: ``positions`` (that count), ``loss`` (mean CE, nats), ``perplexity``,
    ``accuracy`` and ``ece`` (:class:`CalibrationBins`); with teacher logits
    also ``agreement``, ``kl_to_teacher`` (at T = 1), ``teacher_loss`` and ``teacher_perplexity``.

    Per-position values are computed where the logits are (float32); only [P]-sized vectors move to
    the CPU (float64 sums), so V = 128k costs no host copy of the logits.
    """

    def __init__(self, n_bins: int = 15) -> None:
        if not (isinstance(n_bins, int) and n_bins >= 1):
            raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}; the usual choice is 15")
        self.n_bins = n_bins
        self._sums = Sums()
        self._bins = CalibrationBins(n_bins)

    def update(self, logits: Tensor, ids: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None,
               teacher_logits: Tensor | None = None) -> None:
        """Add a batch: student logits [B, L, V], ids [B, L], optional mask/lengths, and
        optional dense teacher logits [B, L, V] (raw logits or log-probabilities)."""
        _check_logits(logits, ids)
        if teacher_logits is not None and teacher_logits.shape != logits.shape:
            raise ModelMismatch(f"student logits have shape {tuple(logits.shape)} but teacher logits "
                                f"{tuple(teacher_logits.shape)}; the student's vocabulary must match the teacher's")
        targets, valid = next_token_targets(ids, mask, lengths)
        with torch.no_grad():
            logp = F.log_softmax(logits.detach()[valid].float(), dim=-1)  # [P, V]
            y = targets[valid]
            nll = -logp.gather(1, y[:, None])[:, 0]
            conf, pred = logp.max(-1)
            correct = (pred == y).double().cpu()
            self._sums.add(n=y.numel(), nll=nll.double().sum(), correct=correct.sum())
            self._bins.add(conf.exp().double().cpu(), correct)
            if teacher_logits is not None:
                t_logp = F.log_softmax(teacher_logits.detach()[valid].float(), dim=-1)
                kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
                self._sums.add(n_teacher=y.numel(), teacher_nll=-t_logp.gather(1, y[:, None]).double().sum(),
                          agree=(t_logp.argmax(-1) == pred).sum(), kl=kl.double().sum())

    def compute(self) -> dict[str, float | int | None]:
        """The metrics so far (None where nothing counted yet)."""
        s = self._sums
        n, nt = int(s["n"]), int(s["n_teacher"])
        out: dict[str, float | int | None] = {"positions": n}
        loss = s["nll"] / n if n else None
        out.update(loss=loss,
                   perplexity=math.exp(loss) if loss is not None else None,
                   accuracy=s["correct"] / n if n else None,
                   ece=self._bins.ece())
        if nt:
            teacher_loss = s["teacher_nll"] / nt
            out.update(agreement=s["agree"] / nt, kl_to_teacher=s["kl"] / nt,
                       teacher_loss=teacher_loss, teacher_perplexity=math.exp(teacher_loss))
        return out
